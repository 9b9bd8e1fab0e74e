"""Closed-form updates besides MEMIT's least squares, as the engine's :data:`~pmet_lens.editing.update.Solve`:
ROME's / r-ROME's rank-one update and EMMET's equality-constrained batch update.

TransformerLens orientation throughout: keys as rows (K ``[n, d_k]``), residuals as rows
(R ``[n, d_out]``), C = E[kᵀk] ``[d_k, d_k]``, the update ΔW ``[d_k, d_out]`` added to W_out, so a
key k's output changes by k ΔW. Everything runs in float64 with ``torch.linalg.solve`` (no explicit
inverse).
"""

from __future__ import annotations

import torch
from jaxtyping import Float

from pmet_lens.editing.site import EditSite
from pmet_lens.editing.validate import EditError

__all__ = ["emmet_solve", "equality_constrained_update", "rank_one_solve", "rank_one_update"]


def _finite(*tensors: torch.Tensor, what: str) -> None:
    if not all(torch.isfinite(t).all() for t in tensors):
        raise EditError(f"non-finite keys, residuals or covariance in {what}")


def rank_one_update(
    key: Float[torch.Tensor, " d_k"],
    resid: Float[torch.Tensor, " d_out"],
    cov: Float[torch.Tensor, "d_k d_k"],
    denominator_key: Float[torch.Tensor, " d_k"] | None = None,
) -> Float[torch.Tensor, "d_k d_out"]:
    """ROME's rank-one update (ROME eq. 2, ``compute_u`` / ``compute_v``) in TransformerLens orientation:

        u = C⁻¹ k̄ᵀ,   ΔW = u (v* − k_d W − b) / (k_d u)

    with ``key`` = k̄ (the averaged key), ``resid`` = v* − k_d W − b and ``denominator_key`` = k_d (ROME:
    the bare prompt's k_s; r-ROME and the default: k̄ itself). Then k_d (W + ΔW) + b = v* exactly, and
    any key k with k C⁻¹ k̄ᵀ = 0 keeps its output (k ΔW = 0).

    Returns:
        ΔW in float64.

    Raises:
        EditError: non-finite inputs, or k_d C⁻¹ k̄ᵀ = 0 (no update along u = C⁻¹ k̄ᵀ changes k_d's output).
    """
    k = key.to(torch.float64)
    r = resid.to(torch.float64)
    C = cov.to(device=k.device, dtype=torch.float64)
    kd = k if denominator_key is None else denominator_key.to(device=k.device, dtype=torch.float64)
    _finite(k, r, C, kd, what="the rank-one update")
    u = torch.linalg.solve(C, k)  # [d_k]
    denom = kd @ u
    if not torch.isfinite(u).all() or not torch.isfinite(denom) or denom.abs() <= torch.finfo(torch.float64).tiny:
        raise EditError(f"the rank-one update is undefined: k C⁻¹ k̄ᵀ = {float(denom):.3g} (singular C?)")
    return u[:, None] * (r / denom)[None, :]  # [d_k, 1] x [1, d_out] -> [d_k, d_out]


def rank_one_solve(site: EditSite, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, *,
                   bare_keys: torch.Tensor | None = None) -> torch.Tensor:
    """ROME's :data:`~pmet_lens.editing.update.Solve` for one fact: :func:`rank_one_update` of its
    averaged key ``keys[0]`` and residual ``resid[0]``, with ``bare_keys[0]`` (k_s) in the
    denominator when given (ROME; the engine passes it with ``pass_bare_keys=True``), else k̄ (r-ROME).

    Raises:
        ValueError: more than one fact (ROME edits one fact at a time).
    """
    if keys.shape[0] != 1:
        raise ValueError(f"the rank-one update takes one fact at a time, got {keys.shape[0]} keys")
    return rank_one_update(keys[0], resid[0], cov, None if bare_keys is None else bare_keys[0])


def equality_constrained_update(
    keys: Float[torch.Tensor, "n d_k"],
    resid: Float[torch.Tensor, "n d_out"],
    cov: Float[torch.Tensor, "d_k d_k"],
    alpha: float,
    emmet_lambda: float,
) -> Float[torch.Tensor, "d_k d_out"]:
    """EMMET's update (EMMET eq. 9; official ``emmet_main.py``) in TransformerLens orientation:

        C_α = α C,   D = K C_α⁻¹ Kᵀ (+ λ_E I when n > 1),   ΔW = C_α⁻¹ Kᵀ D⁻¹ R

    the minimiser of tr(ΔWᵀ C_α ΔW) under K ΔW = R, with D relaxed by λ_E (the official code adds it
    for batches of more than one fact, where K C⁻¹ Kᵀ can be ill-conditioned). So K ΔW = D₀ D⁻¹ R =
    R − λ_E D⁻¹ R with D₀ = K C_α⁻¹ Kᵀ: exact for one fact or λ_E = 0.

    Returns:
        ΔW in float64 (two ``torch.linalg.solve`` calls, no inverse).

    Raises:
        EditError: non-finite inputs or solution (singular C or D).
    """
    if not (alpha > 0):
        raise ValueError(f"α (the covariance scale) must be > 0, got {alpha!r}")
    K = keys.to(torch.float64)
    R = resid.to(torch.float64)
    C = alpha * cov.to(device=K.device, dtype=torch.float64)
    _finite(K, R, C, what="EMMET's update")
    X = torch.linalg.solve(C, K.T)  # [d_k, n] = C_α⁻¹ Kᵀ
    D = K @ X                       # [n, n]
    if K.shape[0] > 1:
        D = D + emmet_lambda * torch.eye(K.shape[0], dtype=D.dtype, device=D.device)
    delta = X @ torch.linalg.solve(D, R)  # [d_k, n] @ [n, d_out]
    if not torch.isfinite(delta).all():
        raise EditError("EMMET's solve produced NaN/inf (singular C or K C⁻¹ Kᵀ?)")
    return delta


def emmet_solve(site: EditSite, keys: torch.Tensor, resid: torch.Tensor, cov: torch.Tensor, *,
                alpha: float, emmet_lambda: float) -> torch.Tensor:
    """EMMET's :data:`~pmet_lens.editing.update.Solve`: :func:`equality_constrained_update` with the same
    α and λ_E for every site."""
    return equality_constrained_update(keys, resid, cov, alpha, emmet_lambda)
