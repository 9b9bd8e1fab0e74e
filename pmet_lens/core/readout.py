"""The model's own read-out of residual-stream vectors: the tail of ``HookedTransformer.forward``.

Every analysis that turns a residual vector into logits (target losses, causal-trace scores,
continuation scores, the logit lens, the ``logit_lens`` variant of PMET Fig. 2) goes through
:func:`final_logits`, so they all apply the final norm, the unembedding and the logit soft-cap
exactly as the forward pass does, and only at the vectors they need.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.utilities import apply_softcap

__all__ = ["final_logits", "label_logprobs"]


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


def label_logprobs(
    model: HookedTransformer,
    resid: Float[torch.Tensor, "n d_model"],
    labels: Int[torch.Tensor, " k"],
    rows: Int[torch.Tensor, " k"] | None = None,
    *,
    max_logits: int = 2**24,
    readout: Callable[[HookedTransformer, torch.Tensor], torch.Tensor] = final_logits,
) -> tuple[Float[torch.Tensor, " k"], Bool[torch.Tensor, " k"]]:
    """``log P(labels[j] | resid[rows[j]])`` and whether ``labels[j]`` is the top-1 token there.

    Each residual row is read out once (:func:`final_logits`), however many labels are scored at it
    (``rows`` default ``0..n-1``, one label per row), a chunk of at most ``max_logits // d_vocab``
    rows at a time, so only one ``[chunk, d_vocab]`` block of logits exists (never
    ``[batch, pos, d_vocab]``). ``log P = logit[label] − logsumexp(logits)`` in float32 whatever the
    model's dtype. ``readout`` maps ``[chunk, d_model]`` rows to their logits (default
    :func:`final_logits`).
    """
    n = resid.shape[0]
    if rows is None:
        rows = torch.arange(n, device=labels.device)
    chunk = max(1, max_logits // model.cfg.d_vocab)
    logp = torch.zeros(labels.shape[0], dtype=torch.float32)
    top1 = torch.zeros(labels.shape[0], dtype=torch.bool)
    out_device = None
    for i in range(0, n, chunk):
        logits = readout(model, resid[i:i + chunk]).float()  # [chunk, d_vocab], on the unembedding's device
        if out_device is None:
            out_device = logits.device
            logp, top1, rows, labels = logp.to(out_device), top1.to(out_device), rows.to(out_device), labels.to(out_device)
        mine = ((rows >= i) & (rows < i + logits.shape[0])).nonzero()[:, 0]  # labels read in this chunk
        local, lab = rows[mine] - i, labels[mine]
        logp[mine] = logits[local, lab] - torch.logsumexp(logits, dim=-1)[local]
        top1[mine] = logits.argmax(-1)[local] == lab
        del logits
    return logp, top1
