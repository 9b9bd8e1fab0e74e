"""The weight update: residual spread and one least-squares solve per layer (MEMIT eqs. 14-15,
Algorithm 1; PMET eqs. 10-11), as one engine with a pluggable solve.

For each l in R ascending (earlier layers already written), for each target site:
    K^l  = keys of the requests at l (:func:`~pmet_lens.editing.keys.request_keys`);
    r_i  = (v_i − current output at L of the bare prompt) · s(L − l + 1),
           s(n) = 1/√n (PMET eq. 11) or 1/n (MEMIT eq. 15);
    Δ^l  = solve(site, K^l, R, C^l), by default (λC + KᵀK)⁻¹ KᵀR (:func:`least_squares_solve`;
           TransformerLens orientation [d_k, d_model], the transpose of the papers' R Kᵀ (λC + K Kᵀ)⁻¹);
    W^l += Δ^l.
A target site's weight is :data:`~pmet_lens.editing.site.TARGET_WEIGHT`: W_out for PMET's v^m and
MEMIT's z, W_O (keys: the per-head attention outputs, flattened over heads) for PMET's v^a (Table 3).

Another update rule is another ``solve`` with the signature of :data:`Solve`, specialised with
``functools.partial`` (e.g. ``partial(least_squares_solve, lam=600.0)``); the engine
:func:`compute_and_apply_updates` is shared.
"""

from __future__ import annotations

import math
from typing import Callable, Mapping, Sequence

import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.editing.keys import PromptRun, request_keys
from pmet_lens.editing.prepared import PreparedRequests
from pmet_lens.editing.site import TARGET_WEIGHT, EditSite, edit_site
from pmet_lens.editing.validate import EditError

__all__ = ["Solve", "compute_and_apply_updates", "least_squares_solve", "solve_update", "spread"]

Solve = Callable[[EditSite, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``solve(site, keys [n, d_k], resid [n, d_model], cov [d_k, d_k]) -> Δ [d_k, d_model]`` in float64:
the update of ``site`` (its layer is ``site.layer``) from the requests' keys, the spread residuals and
the site's second-moment statistics C = E[k kᵀ]. It must return finite values or raise :class:`EditError`."""


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


def least_squares_solve(
    site: EditSite, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, *, lam: float
) -> torch.Tensor:
    """The MEMIT / PMET :data:`Solve`: :func:`solve_update` with covariance weight λ (same for every site)."""
    return solve_update(keys, resid, cov, lam)


def compute_and_apply_updates(
    model: HookedTransformer,
    requests: PreparedRequests,
    targets: Mapping[str, torch.Tensor],
    layers: Sequence[int],
    spread_kind: str,
    covs: Mapping[str, torch.Tensor],
    solve: Solve,
    on_write: Callable[[EditSite, torch.Tensor], None] = lambda site, delta: None,
    *,
    residual_from: str = "bare",
    pass_bare_keys: bool = False,
) -> dict[str, torch.Tensor]:
    """Compute Δ^l for each l in ``layers`` (ascending) and each target site, and write it into the weights.

    Args:
        requests: the prepared requests (row i = fact i).
        targets: δ site ("mlp_out", "attn_out" or "resid_post") -> ``[facts, d_model]`` target vectors v_i
            at L = max(layers).
        spread_kind: "sqrt" (PMET eq. 11) or "even" (MEMIT eq. 15), see :func:`spread`.
        covs: key hook name (``EditSite.key_hook``) -> C of that hook.
        solve: the per-site update rule (:data:`Solve`), e.g. ``partial(least_squares_solve, lam=λ)``.
        on_write: called with ``(site, Δ)`` just before Δ is added, so the caller can keep the original.
        residual_from: the current output the residual is taken against: ``"bare"`` (MEMIT, PMET,
            ROME: the bare prompt's output at L) or ``"mean"`` (r-ROME: the output averaged over the
            templates with the keys' weights, :attr:`~pmet_lens.editing.keys.LayerReading.mean_outputs`).
        pass_bare_keys: also pass the bare prompt's keys to ``solve`` as ``bare_keys=`` (ROME's k_s,
            :func:`pmet_lens.editing.solvers.rank_one_solve`).

    Returns:
        ``{site.param_name: Δ}`` in the parameter's shape and dtype.
    """
    if residual_from not in ("bare", "mean"):
        raise ValueError(f"residual_from must be 'bare' or 'mean', got {residual_from!r}")
    arch = architecture(model)
    L = max(layers)
    out_hooks = {target: arch.delta_hook(target, L) for target in targets}
    deltas: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        run = PromptRun.build(model, requests, min(layers))  # layers < min(R) never change
        for layer in layers:
            sites = {target: edit_site(arch, TARGET_WEIGHT[target], layer) for target in targets}
            reading = request_keys(model, requests, list(sites.values()), outputs=list(out_hooks.values()),
                                   stop_layer=L + 1, run=run)
            for target, site in sites.items():
                current = (reading.outputs if residual_from == "bare" else reading.mean_outputs)[out_hooks[target]]
                resid = (targets[target].to(current.dtype) - current) * spread(L, layer, spread_kind)
                if pass_bare_keys:
                    delta64 = solve(site, reading.keys[site], resid, covs[site.key_hook],
                                    bare_keys=reading.bare_keys[site])  # type: ignore[call-arg]
                else:
                    delta64 = solve(site, reading.keys[site], resid, covs[site.key_hook])
                param = site.param(model)
                delta = delta64.to(param.dtype).reshape(param.shape)
                on_write(site, delta)
                param.add_(delta)
                deltas[site.param_name] = delta
    return deltas
