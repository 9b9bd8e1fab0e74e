"""Per-architecture facts, decided in one place from ``model.cfg`` (never from model names).

Every analysis and editor asks this module which hook feeds a component, where the weights it
edits live, and which layer norm produces a component's normalised input. Two block layouts
exist in TransformerLens:

* sequential (GPT-2, Llama, SmolLM2): ``resid_pre -> ln1 -> attn -> resid_mid -> ln2 -> mlp``;
* parallel (GPT-J, GPT-NeoX, ``cfg.parallel_attn_mlp``): attention and MLP both read
  ``resid_pre`` and there is no ``hook_resid_mid``. TransformerLens gives parallel blocks an
  ``ln2`` applied to ``resid_pre`` (for GPT-J a copy of its single ``ln_1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from transformer_lens import HookedTransformer
from transformer_lens.components import Unembed
from transformer_lens.components.mlps.gated_mlp import GatedMLP


@dataclass(frozen=True)
class Architecture:
    """Hook names and weight locations of one hooked model.

    Attributes:
        n_layers: number of transformer blocks.
        parallel: ``cfg.parallel_attn_mlp``: attention and FFN read the same residual stream.
        normalization_type: ``cfg.normalization_type`` ("LN", "RMS", "LNPre", "RMSPre" or None).
    """

    n_layers: int
    parallel: bool
    normalization_type: str | None

    # -- hook names ---------------------------------------------------------------------
    def check_layer(self, layer: int) -> int:
        """Return ``layer`` if it is a valid block index, else raise a clear ``ValueError``."""
        if not isinstance(layer, int) or isinstance(layer, bool):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if not 0 <= layer < self.n_layers:
            raise ValueError(
                f"layer {layer} is out of range: this model has {self.n_layers} layers "
                f"(valid: 0..{self.n_layers - 1})"
            )
        return layer

    def embed_hook(self) -> str:
        """Token embeddings before anything is added to them (ROME corrupts the subject's here)."""
        return "hook_embed"

    def resid_pre_hook(self, layer: int) -> str:
        """Residual stream entering block ``layer`` (h^{l-1}; for ``layer = 0`` the embeddings)."""
        return f"blocks.{self.check_layer(layer)}.hook_resid_pre"

    def attn_input_hook(self, layer: int) -> str:
        """Residual stream entering the MHSA of ``layer`` (h^{l-1})."""
        return self.resid_pre_hook(layer)

    def ffn_input_hook(self, layer: int) -> str:
        """Residual stream entering the FFN: ``resid_mid`` (sequential) or ``resid_pre`` (parallel)."""
        layer = self.check_layer(layer)
        return self.resid_pre_hook(layer) if self.parallel else f"blocks.{layer}.hook_resid_mid"

    def attn_out_hook(self, layer: int) -> str:
        """MHSA output a^l written to the residual stream."""
        return f"blocks.{self.check_layer(layer)}.hook_attn_out"

    def mlp_out_hook(self, layer: int) -> str:
        """FFN output m^l written to the residual stream."""
        return f"blocks.{self.check_layer(layer)}.hook_mlp_out"

    def mlp_key_hook(self, layer: int) -> str:
        """FFN key k^l: the input of ``W_out`` (post-activation, gated product for gated MLPs)."""
        return f"blocks.{self.check_layer(layer)}.mlp.hook_post"

    def attn_key_hook(self, layer: int) -> str:
        """MHSA key for ``W_O`` updates: the per-head attention output before ``W_O`` (``hook_z``)."""
        return f"blocks.{self.check_layer(layer)}.attn.hook_z"

    def attn_k_hook(self, layer: int) -> str:
        """Per-head attention keys of ``layer`` (``[batch, pos, n_key_value_heads, d_head]``, after rotary)."""
        return f"blocks.{self.check_layer(layer)}.attn.hook_k"

    def attn_v_hook(self, layer: int) -> str:
        """Per-head attention values of ``layer`` (``[batch, pos, n_key_value_heads, d_head]``)."""
        return f"blocks.{self.check_layer(layer)}.attn.hook_v"

    def attn_pattern_hook(self, layer: int) -> str:
        """Attention probabilities of ``layer`` (``[batch, n_heads, query, key]``)."""
        return f"blocks.{self.check_layer(layer)}.attn.hook_pattern"

    def resid_post_hook(self, layer: int) -> str:
        """Residual stream leaving block ``layer`` (h^l)."""
        return f"blocks.{self.check_layer(layer)}.hook_resid_post"

    def delta_hook(self, site: str, layer: int) -> str:
        """Hook where an editor adds its δ at ``layer``: ``site`` is "attn_out" (a^l, PMET's δ_a),
        "mlp_out" (m^l, PMET's δ_m) or "resid_post" (h^l, MEMIT's δ)."""
        hooks = {"attn_out": self.attn_out_hook, "mlp_out": self.mlp_out_hook, "resid_post": self.resid_post_hook}
        if site not in hooks:
            raise ValueError(f"δ site must be one of {sorted(hooks)}, got {site!r}")
        return hooks[site](layer)

    def ln_normalized_hook(self, layer: int, component: str) -> str:
        """``hook_normalized`` of the norm feeding ``component`` ("mhsa" -> ln1, "ffn" -> ln2).

        This is the normalised input BEFORE the learned scale; see :func:`apply_ln_affine`.
        """
        return f"blocks.{self.check_layer(layer)}.{_ln_name(component)}.hook_normalized"

    # -- modules and weights -------------------------------------------------------------
    def ln_module(self, model: HookedTransformer, layer: int, component: str) -> torch.nn.Module:
        """The layer-norm module feeding ``component`` at ``layer``."""
        return getattr(model.blocks[self.check_layer(layer)], _ln_name(component))

    def w_out(self, model: HookedTransformer, layer: int) -> torch.nn.Parameter:
        """FFN output weight W_out^l, TransformerLens shape [d_mlp, d_model]."""
        return cast(torch.nn.Parameter, model.blocks[self.check_layer(layer)].mlp.W_out)

    def w_o(self, model: HookedTransformer, layer: int) -> torch.nn.Parameter:
        """MHSA output weight W_O^l, TransformerLens shape [n_heads, d_head, d_model]."""
        return cast(torch.nn.Parameter, model.blocks[self.check_layer(layer)].attn.W_O)

    # -- the output weights an editor updates ("W_out" of the FFN, "W_O" of the MHSA) -----------
    def edit_param(self, model: HookedTransformer, weight: str, layer: int) -> torch.nn.Parameter:
        """The output weight ``weight`` ("W_out" or "W_O") of block ``layer``."""
        return self.w_o(model, layer) if _check_weight(weight) == "W_O" else self.w_out(model, layer)

    def edit_param_name(self, weight: str, layer: int) -> str:
        """TransformerLens parameter name of an output weight: ``blocks.{l}.mlp.W_out`` or
        ``blocks.{l}.attn.W_O`` (the names in ``model.named_parameters()`` and in saved edit files)."""
        module = "attn" if _check_weight(weight) == "W_O" else "mlp"
        return f"blocks.{self.check_layer(layer)}.{module}.{weight}"

    def parse_edit_param_name(self, name: str) -> tuple[str, int]:
        """``(weight, layer)`` of a name made by :meth:`edit_param_name` (inverse of it).

        Raises:
            ValueError: when ``name`` is not the name of an FFN or MHSA output weight of this model.
        """
        parts = name.split(".") if isinstance(name, str) else []
        weight = parts[-1] if len(parts) == 4 else ""
        if weight not in EDIT_WEIGHTS or self.edit_param_name(weight, block_index(name)) != name:
            raise ValueError(f"{name!r} is not an editable output weight (expected 'blocks.{{l}}.mlp.W_out' "
                             "or 'blocks.{l}.attn.W_O')")
        return weight, block_index(name)

    def edit_key_hook(self, weight: str, layer: int) -> str:
        """Key hook of an output weight: the input of W_out (:meth:`mlp_key_hook`) or of W_O
        (:meth:`attn_key_hook`)."""
        return self.attn_key_hook(layer) if _check_weight(weight) == "W_O" else self.mlp_key_hook(layer)

    def edit_out_hook(self, weight: str, layer: int) -> str:
        """Output hook of an output weight: what W_out (:meth:`mlp_out_hook`) or W_O
        (:meth:`attn_out_hook`) writes to the residual stream."""
        return self.attn_out_hook(layer) if _check_weight(weight) == "W_O" else self.mlp_out_hook(layer)


FFN_OUT_WEIGHT = "W_out"
"""The FFN output weight W_out ([d_mlp, d_model]), which PMET and MEMIT update."""
ATTN_OUT_WEIGHT = "W_O"
"""The MHSA output weight W_O ([n_heads, d_head, d_model]), updated in PMET Table 3's ablation."""
EDIT_WEIGHTS: tuple[str, ...] = (FFN_OUT_WEIGHT, ATTN_OUT_WEIGHT)
"""The output weights an editor updates: the FFN's W_out and the MHSA's W_O."""


INPUT_MODULES: tuple[str, ...] = ("embed", "hook_embed", "pos_embed", "hook_pos_embed")
"""The model's modules before block 0 (those it has), which sit on block 0's device."""


def block_prefix(layer: int) -> str:
    """The state-dict prefix of block ``layer``'s parameters (``"blocks.{layer}."``)."""
    return f"blocks.{layer}."


def _check_weight(weight: str) -> str:
    if weight not in EDIT_WEIGHTS:
        raise ValueError(f"weight must be one of {EDIT_WEIGHTS}, got {weight!r}")
    return weight


def _ln_name(component: str) -> str:
    if component == "mhsa":
        return "ln1"
    if component == "ffn":
        return "ln2"
    raise ValueError(f"component must be 'mhsa' or 'ffn', got {component!r}")


def block_index(name: str) -> int:
    """Block index ``l`` of a TransformerLens hook or parameter name ``blocks.{l}....``.

    Raises:
        ValueError: when ``name`` does not name something inside a transformer block.
    """
    parts = name.split(".")
    if len(parts) < 3 or parts[0] != "blocks" or not parts[1].isdigit():
        raise ValueError(f"{name!r} is not a block hook or parameter name (expected 'blocks.{{l}}....')")
    return int(parts[1])


def transposed_linear_weights(module: torch.nn.Module) -> tuple[str, ...]:
    """Weights that ``module`` multiplies as ``F.linear(x, W.T.contiguous())`` in TransformerLens 3.9.

    These are the gated MLP's ``W_in``, ``W_gate`` and ``W_out`` and the unembedding's ``W_U``;
    other modules have none. :mod:`pmet_lens.core.fastpath` stores them column-major.
    """
    return _TRANSPOSED_LINEAR_WEIGHTS.get(type(module), ())


_TRANSPOSED_LINEAR_WEIGHTS: dict[type, tuple[str, ...]] = {
    GatedMLP: ("W_in", "W_gate", "W_out"),
    Unembed: ("W_U",),
}


def optional_state_key(key: str) -> bool:
    """Whether a ``HookedTransformer.state_dict()`` key may be absent from converted weights.

    TransformerLens builds these itself (rotary tables, attention masks, ``IGNORE``, hook
    points), and the gated MLP's ``b_in`` stays zero for checkpoints without MLP biases.
    """
    return buffer_state_key(key) or key.endswith("b_in")


def buffer_state_key(key: str) -> bool:
    """Whether a ``HookedTransformer.state_dict()`` key is a buffer TransformerLens builds itself
    (rotary tables, attention masks, ``IGNORE``, hook points) rather than a weight."""
    return key.endswith(("rotary_sin", "rotary_cos", "mask", "IGNORE")) or ".hook_" in key


def feeds_layer(name: str, layer: int) -> bool:
    """Whether the parameter ``name`` can change the activations of blocks ``0..layer``: the
    embeddings and the parameters of those blocks (not later blocks, the final norm or the unembedding)."""
    if name.startswith("blocks."):
        return block_index(name) <= layer
    return name.startswith(("embed.", "pos_embed."))


def architecture(model: HookedTransformer) -> Architecture:
    """Read the architecture facts of ``model`` from its config.

    Raises:
        ValueError: for attention-only models (no FFN to analyse or edit).
    """
    cfg = model.cfg
    if cfg.attn_only:
        raise ValueError("attention-only models have no FFN: pmet-lens needs MLP layers")
    return Architecture(
        n_layers=cfg.n_layers,
        parallel=bool(cfg.parallel_attn_mlp),
        normalization_type=cfg.normalization_type,
    )


def apply_ln_affine(
    normalized: torch.Tensor, ln: torch.nn.Module
) -> torch.Tensor:
    """Apply a layer norm's learned scale (and bias, for LayerNorm) to its ``hook_normalized``.

    TransformerLens records ``hook_normalized`` before ``w`` (and ``b``); the official PMET
    notebook compares the norm's full output, i.e. ``normalized * w (+ b)``. Norms without
    learned parameters (``LNPre`` / ``RMSPre``, after weight folding) return ``normalized``.
    """
    w = getattr(ln, "w", None)
    b = getattr(ln, "b", None)
    out = normalized if w is None else normalized * w
    return out if b is None else out + b
