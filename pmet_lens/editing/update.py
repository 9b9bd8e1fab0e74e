"""Keys, residual spread and the least-squares weight update (MEMIT eqs. 14-15, Algorithm 1;
PMET eqs. 10-11).

For each l in R ascending (earlier layers already written):
    K^l  = FFN keys ``mlp.hook_post`` at the subject's last token, averaged over the context
           prefixes (MEMIT ``compute_ks``);
    r_i  = (v_i − current output at L of the bare prompt) · s(L − l + 1),
           s(n) = 1/√n (PMET eq. 11) or 1/n (MEMIT eq. 15);
    Δ^l  = (λ C^l + Kᵀ K)⁻¹ Kᵀ R   (TransformerLens orientation [d_mlp, d_model], i.e. the
           transpose of the papers' R Kᵀ (λC + K Kᵀ)⁻¹), solved with ``torch.linalg.solve``
           in float64, never an explicit inverse;
    W_out^l += Δ^l.
With ``update_attn`` (PMET Table 3) W_O^l gets the same update with keys ``attn.hook_z``
(flattened over heads) and the attention targets v^a.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture, block_index
from pmet_lens.data import Fact
from pmet_lens.editing.context import context_templates
from pmet_lens.editing.targets import Settings, site_hook
from pmet_lens.editing.validate import EditError
from pmet_lens.core.tokens import encode, pad, subject_last_position

__all__ = ["spread", "solve_update", "key_hook", "param_name", "compute_and_apply_updates"]


def spread(L: int, layer: int, kind: str) -> float:
    """Residual share of ``layer``: 1/√(L−l+1) ("sqrt", PMET eq. 11) or 1/(L−l+1) ("even", MEMIT eq. 15)."""
    n = L - layer + 1
    if n < 1:
        raise ValueError(f"layer {layer} is above L = {L}")
    return 1.0 / math.sqrt(n) if kind == "sqrt" else 1.0 / n


def solve_update(
    keys: Float[torch.Tensor, "n d_k"],
    resid: Float[torch.Tensor, "n d_out"],
    cov: Float[torch.Tensor, "d_k d_k"],
    lam: float,
) -> Float[torch.Tensor, "d_k d_out"]:
    """Δ = (λC + KᵀK)⁻¹ KᵀR in float64 via ``torch.linalg.solve`` (MEMIT eq. 14, PMET eq. 10).

    Returns float64; a zero residual gives an exactly zero Δ.

    Raises:
        EditError: when the inputs or the solution are not finite.
    """
    K = keys.to(torch.float64)
    R = resid.to(torch.float64)
    A = lam * cov.to(torch.float64) + K.T @ K
    if not (torch.isfinite(A).all() and torch.isfinite(R).all()):
        raise EditError("non-finite keys, residuals or covariance in the weight update")
    delta = torch.linalg.solve(A, K.T @ R)
    if not torch.isfinite(delta).all():
        raise EditError("the least-squares solve produced NaN/inf (singular λC + KKᵀ?)")
    return delta


def key_hook(model: HookedTransformer, site: str, layer: int) -> str:
    """Key hook of the weight a kept site updates: mlp.hook_post (W_out) or attn.hook_z (W_O)."""
    arch = architecture(model)
    return arch.attn_key_hook(layer) if site == "attn_out" else arch.mlp_key_hook(layer)


def param_name(site: str, layer: int) -> str:
    """Parameter name updated for a kept site: ``blocks.l.mlp.W_out`` or ``blocks.l.attn.W_O``."""
    return f"blocks.{layer}.attn.W_O" if site == "attn_out" else f"blocks.{layer}.mlp.W_out"


def get_param(model: HookedTransformer, name: str) -> torch.nn.Parameter:
    """The parameter ``blocks.l.mlp.W_out`` / ``blocks.l.attn.W_O`` through :mod:`pmet_lens.core.arch`."""
    arch = architecture(model)
    layer = block_index(name)
    return arch.w_o(model, layer) if name.endswith("W_O") else arch.w_out(model, layer)


def compute_and_apply_updates(
    model: HookedTransformer,
    facts: Sequence[Fact],
    targets: dict[str, torch.Tensor],
    layers: Sequence[int],
    lam: float,
    settings: Settings,
    prefixes: tuple[str, ...],
    covs: dict[str, torch.Tensor],
    on_write: Callable[[str, torch.Tensor], None],
) -> dict[str, torch.Tensor]:
    """Compute Δ^l for each l in ``layers`` (ascending) and write it (``on_write(name, Δ)`` is
    called first so the caller can keep the original). Returns {param name: Δ in param dtype}.

    Args:
        targets: kept site -> [facts, d_model] target vectors v_i at L.
        covs: key hook name -> C of that hook.
    """
    arch = architecture(model)
    L = max(layers)
    templates = context_templates(prefixes)
    P = len(templates)
    seqs, lookups = [], []
    for fact in facts:
        for tmpl in templates:
            text_tmpl = tmpl.replace("{}", fact.prompt)
            seqs.append(encode(model, text_tmpl.format(fact.subject)))
            lookups.append(subject_last_position(model, text_tmpl, fact.subject))
    batch = pad(model, seqs)
    look = torch.tensor(lookups, device=batch.tokens.device)
    rows = torch.arange(len(seqs), device=look.device)
    bare = rows[::P]
    first = min(layers)
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        resid_first = model(batch.tokens, stop_at_layer=first)  # layers < min(R) never change
        for layer in layers:
            got: dict[str, torch.Tensor] = {}

            def grab(act, hook):
                got[hook.name] = act[rows, look].reshape(len(rows), -1).clone()

            names = {site: key_hook(model, site, layer) for site in settings.kept_sites}
            outs = {site: site_hook(arch, site, L) for site in settings.kept_sites}
            with model.hooks(fwd_hooks=[(h, grab) for h in {*names.values(), *outs.values()}]):
                model(resid_first, start_at_layer=first, stop_at_layer=L + 1)
            for site in settings.kept_sites:
                keys = got[names[site]].reshape(len(facts), P, -1).mean(1)
                current = got[outs[site]][bare]
                resid = (targets[site].to(current.dtype) - current) * spread(L, layer, settings.spread)
                delta64 = solve_update(keys, resid, covs[names[site]], lam)
                name = param_name(site, layer)
                param = get_param(model, name)
                delta = delta64.to(param.dtype).reshape(param.shape)
                on_write(name, delta)
                param += delta
                deltas[name] = delta
    return deltas
