"""Where an edit writes: one output weight of one block, with the hooks that read its input and output.

An :class:`EditSite` is built only through :class:`pmet_lens.core.arch.Architecture`, which owns
every hook and parameter name; the editors, :class:`~pmet_lens.editing.result.EditResult` and the
covariance statistics read names from it instead of building or parsing strings.

The weight update of layer l (MEMIT eq. 14, PMET eq. 10) reads the site's keys k^l at
``EditSite.key_hook`` and adds Δ^l to :meth:`EditSite.param`; ΔW·k appears at
``EditSite.out_hook``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import ATTN_OUT_WEIGHT, FFN_OUT_WEIGHT, Architecture, architecture

__all__ = ["EditSite", "TARGET_WEIGHT", "edit_site", "site_of_param"]

TARGET_WEIGHT: dict[str, str] = {"mlp_out": FFN_OUT_WEIGHT, "resid_post": FFN_OUT_WEIGHT, "attn_out": ATTN_OUT_WEIGHT}
"""Which output weight the target of a δ site feeds: PMET's v^m = m^L + δ_m and MEMIT's
z = h^L + δ update the FFN's W_out; PMET's v^a = a^L + δ_a updates the MHSA's W_O (Table 3)."""


@dataclass(frozen=True)
class EditSite:
    """One editable output weight.

    Attributes:
        weight: "W_out" (FFN output weight, TransformerLens shape [d_mlp, d_model]) or "W_O" (MHSA
            output weight, [n_heads, d_head, d_model]; its keys are flattened over the heads).
        layer: the block index l.
        key_hook: hook of the weight's input k^l (:meth:`Architecture.edit_key_hook`: the FFN's
            post-activation, or the per-head attention output flattened over heads).
        out_hook: hook of what the weight writes to the residual stream (:meth:`Architecture.edit_out_hook`).
        param_name: TransformerLens parameter name, the key of ``EditResult.deltas`` and of saved files.
    """

    weight: str
    layer: int
    key_hook: str
    out_hook: str
    param_name: str

    def param(self, model: HookedTransformer) -> torch.nn.Parameter:
        """The parameter itself (through :meth:`Architecture.edit_param`)."""
        return architecture(model).edit_param(model, self.weight, self.layer)


def edit_site(arch: Architecture, weight: str, layer: int) -> EditSite:
    """The :class:`EditSite` of ``weight`` ("W_out" or "W_O") at ``layer``."""
    return EditSite(weight=weight, layer=arch.check_layer(layer), key_hook=arch.edit_key_hook(weight, layer),
                    out_hook=arch.edit_out_hook(weight, layer), param_name=arch.edit_param_name(weight, layer))


def site_of_param(arch: Architecture, name: str) -> EditSite:
    """The :class:`EditSite` of a parameter name (``EditResult.deltas`` keys, saved files).

    Raises:
        ValueError: when ``name`` is not an editable output weight of this architecture.
    """
    weight, layer = arch.parse_edit_param_name(name)
    return edit_site(arch, weight, layer)
