"""The model's own read-out of residual-stream vectors: the tail of ``HookedTransformer.forward``.

Every analysis that turns a residual vector into logits (target losses, causal-trace scores,
continuation scores, the logit lens, the ``logit_lens`` variant of PMET Fig. 2) goes through
:func:`final_logits`, so they all apply the final norm, the unembedding and the logit soft-cap
exactly as the forward pass does, and only at the vectors they need.
"""

from __future__ import annotations

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer
from transformer_lens.utilities import apply_softcap

__all__ = ["final_logits"]


def final_logits(
    model: HookedTransformer, resid: Float[torch.Tensor, "*batch d_model"]
) -> Float[torch.Tensor, "*batch d_vocab"]:
    """``soft_cap(unembed(ln_final(resid)))`` for residual vectors of any leading shape.

    ``ln_final`` is skipped for models without a final norm; the soft-cap is the identity unless
    ``cfg.output_logits_soft_cap`` is set (Gemma 2).
    """
    lead = resid.shape[:-1]
    x = resid.reshape(-1, 1, resid.shape[-1])
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    logits = apply_softcap(model.unembed(x), model.cfg.output_logits_soft_cap)
    return logits.reshape(*lead, logits.shape[-1])
