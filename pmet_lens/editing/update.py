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
from pmet_lens.editing.delta import write_update
from pmet_lens.editing.keys import PromptRun, request_keys
from pmet_lens.editing.linsolve import SolveOptions, matmul64, spd_solve
from pmet_lens.editing.prepared import PreparedRequests
from pmet_lens.editing.site import TARGET_WEIGHT, EditSite, edit_site
from pmet_lens.editing.validate import EditError

__all__ = ["Solve", "compute_and_apply_updates", "least_squares_solve", "solve_update", "spread"]

Solve = Callable[[EditSite, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""``solve(site, keys [n, d_k], resid [n, d_model], cov [d_k, d_k]) -> Δ [d_k, d_model]`` in float64:
the update of ``site`` (its layer is ``site.layer``) from the requests' keys, the spread residuals and
the site's second-moment statistics C = E[k kᵀ] (on the CPU, as :class:`~pmet_lens.editing.covariance.CovarianceStore`
keeps it: a solve moves what it needs to the keys' device). It must return finite values or raise :class:`EditError`."""


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
    *,
    options: SolveOptions | None = None,
) -> Float[torch.Tensor, "d_k d_out"]:
    """Δ = (λC + KᵀK)⁻¹ KᵀR (MEMIT eq. 14, PMET eq. 10), equal to the float64 solve up to float64 rounding.

    The system is solved by :func:`~pmet_lens.editing.linsolve.spd_solve`: a float32 Cholesky
    factorisation of ``λC + KᵀK`` in one ``[d_k, d_k]`` buffer on the keys' device, refined with
    float64 residuals (``λ C X + Kᵀ(K X)`` in row blocks of ``C``, which may stay on the CPU), and a
    float64 fallback (logged) when that fails. With fewer requests than output columns it solves
    for ``Y = (λC + KᵀK)⁻¹ Kᵀ`` (``[d_k, n]``) and returns ``Y R``. ``options`` selects the mode and
    where float64 work runs (:class:`~pmet_lens.editing.linsolve.SolveOptions`).

    Returns float64 on the keys' device; a zero residual gives an exactly zero Δ.

    Raises:
        EditError: when the inputs or the solution are not finite.
    """
    opts = options if options is not None else SolveOptions()
    K = keys.to(torch.float64)
    R = resid.to(device=K.device, dtype=torch.float64)
    if not (math.isfinite(float(K.sum())) and math.isfinite(float(R.sum()))):
        raise EditError("non-finite keys, residuals or covariance in the weight update")
    low_rank = K.shape[0] < R.shape[1]
    rhs = K.T.contiguous() if low_rank else K.T @ R  # [d_k, n] or [d_k, d_out]

    def build32() -> torch.Tensor:
        A = cov.to(device=K.device, dtype=torch.float32, copy=True).mul_(lam)  # [d_k, d_k]
        K32 = K.float()
        return A.addmm_(K32.T, K32)

    def build64(device: torch.device) -> torch.Tensor:
        A = cov.to(device=device, dtype=torch.float64, copy=True).mul_(lam)
        K64 = K.to(device)
        return A.addmm_(K64.T, K64)

    def apply64(X: torch.Tensor) -> torch.Tensor:
        out = matmul64(cov, X, opts.block_bytes).mul_(lam)
        return out.addmm_(K.T, K @ X)  # [d_k, n] @ ([n, d_k] @ [d_k, m])

    solution = spd_solve(build32, apply64, build64, rhs, opts, what="the weight update (λC + KᵀK)")
    delta = solution @ R if low_rank else solution
    if not torch.isfinite(delta).all():
        raise EditError("the least-squares solve produced NaN/inf (singular λC + KKᵀ?)")
    return delta


def least_squares_solve(
    site: EditSite, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, *, lam: float,
    options: SolveOptions | None = None,
) -> torch.Tensor:
    """The MEMIT / PMET :data:`Solve`: :func:`solve_update` with covariance weight λ (same for every site)."""
    return solve_update(keys, resid, cov, lam, options=options)


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
            templates with the keys' weights, ``LayerReading.mean_outputs``).
        pass_bare_keys: also pass the bare prompt's keys to ``solve`` as ``bare_keys=`` (ROME's k_s,
            :func:`pmet_lens.editing.solvers.rank_one_solve`).

    The residuals are formed in float32 whatever the model's dtype, and each Δ is added once with
    :func:`~pmet_lens.editing.delta.write_update` (W ← round(W + Δ)).

    Returns:
        ``{site.param_name: d}``: the change applied, W_new − W_old, in the parameter's shape and in
        float32 (float64 for a float64 weight), see :mod:`pmet_lens.editing.delta`.
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
                current = current.to(torch.promote_types(current.dtype, torch.float32))  # [facts, d_model], float32 at least
                keys = reading.keys[site]
                resid = (targets[target].to(current.device, current.dtype) - current) * spread(L, layer, spread_kind)
                resid = resid.to(keys.device)  # layer l's keys live on l's device, the output at L on L's
                if pass_bare_keys:
                    delta64 = solve(site, keys, resid, covs[site.key_hook],
                                    bare_keys=reading.bare_keys[site])  # type: ignore[call-arg]
                else:
                    delta64 = solve(site, keys, resid, covs[site.key_hook])
                param = site.param(model)
                update = delta64.reshape(param.shape)  # [d_k, d_model] -> the parameter's shape (W_O: [heads, d_head, d_model])
                on_write(site, update)
                deltas[site.param_name] = write_update(param, update)  # written once, on the parameter's device
    return deltas
