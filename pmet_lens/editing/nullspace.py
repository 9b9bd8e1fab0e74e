"""AlphaEdit's null-space projection and projected least-squares update (Fang et al., ICLR 2025,
arXiv 2410.02355, eqs. 7-12 and the official ``AlphaEdit_main.py``).

Notation in TransformerLens orientation (the package keeps keys as *rows*): for one edited weight
``W`` of shape ``[d_k, d_out]`` (``W_out``: ``[d_mlp, d_model]``) a key ``k`` (``[d_k]``) outputs
``kᵀ W``. With

* ``C = E[k kᵀ]`` (``[d_k, d_k]``), the preserved-knowledge statistic MEMIT's update already uses,
* ``C = U Λ Uᵀ`` its eigendecomposition in float64, ``Û`` the eigenvectors whose eigenvalue is
  below the absolute threshold ``τ``, and ``P = Û Ûᵀ`` (``[d_k, d_k]``, symmetric, ``P² = P``),
* ``K1`` (``[u, d_k]``) this batch's keys as rows and ``R`` (``[u, d_out]``) their spread
  residuals as rows,
* ``KpKp`` (``[d_k, d_k]``) the sum ``Σ k kᵀ`` over every earlier batch's keys,

the update is ``ΔW = X`` with

    (P (K1ᵀ K1 + KpKp) + α I) X = P K1ᵀ R                        (AlphaEdit eq. 12, transposed)

which is the paper's ``Δ = R K1ᵀ P (Kp Kpᵀ P + K1 K1ᵀ P + α I)⁻¹`` with its column keys turned
into row keys (``K1_paper = K1ᵀ``) and the whole equation transposed. Any key ``k0`` with
``P k0 = 0`` (in the span of C's large directions, where the preserved keys lie) has
``k0ᵀ (P A + α I)⁻¹ = k0ᵀ / α``, so ``k0ᵀ X = k0ᵀ P K1ᵀ R / α = 0``: its output does not change.
MEMIT's ``λ C`` term does not appear; the projection replaces it.

Edge cases (documented behaviour, tested):

* ``τ = 0`` or ``τ`` at or below C's smallest eigenvalue: no direction is kept, ``P = 0`` and the
  update is exactly zero (nothing is edited; a warning is logged).
* ``τ`` above C's largest eigenvalue: ``P = I`` and the update is the unprojected ridge solve
  ``(K1ᵀK1 + KpKp + α I) X = K1ᵀ R``.

:class:`NullspaceStore` caches P per (model and layer weights hash, tokenizer, corpus, token count,
sequence length, C's dtype, τ) beside the covariance cache, as an object the caller passes in.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import torch
from jaxtyping import Float

from pmet_lens.core.cachefile import read_matrix, write_matrix
from pmet_lens.core.paths import file_lock
from pmet_lens.editing.linsolve import SolveOptions, matmul64, spd_solve
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["Projection", "NullspaceStore", "nullspace_projection", "project_keys_gram", "projected_gram", "projected_solve"]

_FORMAT = 1


@dataclass(frozen=True)
class Projection:
    """The null-space projector of one key hook.

    Attributes:
        P: ``Û Ûᵀ`` in float64, ``[d_k, d_k]``.
        dim: the null-space dimension (number of eigenvalues of C below τ), ``rank(P)``.
        threshold: τ it was made with.
    """

    P: Float[torch.Tensor, "d_k d_k"]
    dim: int
    threshold: float


def nullspace_projection(cov: Float[torch.Tensor, "d_k d_k"], threshold: float) -> Projection:
    """P = Û Ûᵀ from the eigenvectors of ``cov`` whose eigenvalue is below ``threshold`` (τ).

    The eigendecomposition is ``torch.linalg.eigh`` of the symmetrised C in float64 (the official
    code uses an SVD of C, which equals it for a symmetric positive semi-definite matrix). ``τ`` is
    absolute, on E[kkᵀ]'s scale (AlphaEdit's official code: 2e-2 for GPT2-XL, GPT-J and Llama3-8B).
    ``τ = 0`` keeps no direction (P = 0, see the module docstring).

    Raises:
        ValueError: ``cov`` not square or ``threshold`` negative / not finite.
        EditError: ``cov`` contains NaN/inf.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"cov must be a square matrix, got shape {tuple(cov.shape)}")
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"the null-space threshold τ must be a finite number >= 0, got {threshold!r}")
    C = cov.detach()
    if not math.isfinite(float(C.sum(dtype=torch.float64))):  # a reduction: no [d, d] mask
        raise EditError("the covariance C contains NaN/inf; rebuild it (delete its cache file)")
    d = C.shape[0]
    if threshold == 0:
        return Projection(P=torch.zeros(d, d, dtype=torch.float64, device=C.device), dim=0, threshold=0.0)
    sym = C.to(torch.float64)
    sym = sym + sym.T  # a new buffer (also when C was float64 already)
    sym.mul_(0.5)  # (C + Cᵀ)/2, the symmetrised C
    evals = torch.empty(d, dtype=torch.float64, device=sym.device)
    evals, evecs = torch.linalg.eigh(sym, out=(evals, sym))  # eigenvectors overwrite the symmetrised C
    keep = evals < threshold
    U_hat = evecs[:, keep]  # [d_k, dim]
    del evecs, sym
    return Projection(P=U_hat @ U_hat.T, dim=int(keep.sum()), threshold=float(threshold))


def projected_solve(
    keys: Float[torch.Tensor, "u d_k"],
    resid: Float[torch.Tensor, "u d_out"],
    P: Float[torch.Tensor, "d_k d_k"],
    l2: float,
    prev: Float[torch.Tensor, "d_k d_k"] | None = None,
    *,
    projected_prev: Float[torch.Tensor, "d_k d_k"] | None = None,
    projected_gram: Float[torch.Tensor, "d_k d_k"] | None = None,
    options: SolveOptions | None = None,
) -> Float[torch.Tensor, "d_k d_out"]:
    """X solving ``(P (K1ᵀK1 + KpKp) + α I) X = P K1ᵀ R`` (AlphaEdit eq. 12 transposed), equal to the
    float64 solve up to float64 rounding.

    Args:
        keys: K1, this batch's keys as rows.
        resid: R, the spread residuals as rows.
        P: the projector (:func:`nullspace_projection`); it may stay on the CPU.
        l2: α, the ridge weight (official "L2": 10).
        prev: KpKp = Σ k kᵀ over earlier batches' keys, or ``None`` (none yet).
        projected_prev: ``P · KpKp`` instead of ``prev``.
        projected_gram: ``P · KpKp · P`` instead of ``prev`` (what a session accumulates batch by
            batch, :func:`projected_gram`, ``O(d_k² u)`` per batch); at most one of the three.
        options: how the system is solved (:class:`~pmet_lens.editing.linsolve.SolveOptions`).

    The system is solved in its symmetric form. Applying ``I − P`` to it gives ``α (I − P) X = 0``, so
    ``X = P X`` and the system is ``(Q Qᵀ + G + α I) X = Q R`` with ``Q = P K1ᵀ`` (``[d_k, u]``) and
    ``G = P KpKp P``: symmetric positive definite, solved by
    :func:`~pmet_lens.editing.linsolve.spd_solve` (float32 Cholesky in one ``[d_k, d_k]`` buffer,
    float64 refinement from ``Q`` and ``G`` in row blocks, float64 fallback). Only ``Q`` is formed from
    ``P`` (``O(d_k² u)``); ``prev`` costs two ``d_k³`` products and ``projected_prev`` one, to form ``G``.

    Returns:
        ΔW in float64 on the keys' device (no explicit inverse). P = 0 gives exactly 0.

    Raises:
        EditError: non-finite inputs or solution.
    """
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"α (l2) must be a finite number > 0, got {l2!r}")
    if sum(x is not None for x in (prev, projected_prev, projected_gram)) > 1:
        raise ValueError("pass prev (KpKp), projected_prev (P·KpKp) or projected_gram (P·KpKp·P), not both")
    opts = options if options is not None else SolveOptions()
    K = keys.to(torch.float64)
    R = resid.to(device=K.device, dtype=torch.float64)
    if not (math.isfinite(float(K.sum())) and math.isfinite(float(R.sum()))):
        raise EditError("non-finite keys, residuals or statistics in the projected update")
    G: torch.Tensor | None = projected_gram
    if prev is not None:
        P64 = P.to(device=prev.device, dtype=torch.float64)
        G = P64 @ prev.to(torch.float64) @ P64
    elif projected_prev is not None:
        G = projected_prev.to(torch.float64) @ P.to(device=projected_prev.device, dtype=torch.float64)
    Q = matmul64(P, K.T.contiguous(), opts.block_bytes)  # [d_k, u] = P K1ᵀ
    low_rank = K.shape[0] < R.shape[1]
    rhs = Q if low_rank else Q @ R  # [d_k, u] or [d_k, d_out]

    def add_gram(A: torch.Tensor) -> torch.Tensor:
        if G is not None:
            rows = max(1, opts.block_bytes // (8 * max(1, G.shape[1])))
            for i in range(0, G.shape[0], rows):
                A[i:i + rows] += G[i:i + rows].to(device=A.device, dtype=A.dtype)
        A.diagonal().add_(l2)
        return A

    def build32() -> torch.Tensor:
        Q32 = Q.float()
        return add_gram(Q32 @ Q32.T)  # [d_k, d_k]

    def build64(device: torch.device) -> torch.Tensor:
        Qd = Q.to(device)
        return add_gram(Qd @ Qd.T)

    def apply64(X: torch.Tensor) -> torch.Tensor:
        out = Q @ (Q.T @ X)  # [d_k, u] @ [u, m]
        if G is not None:
            out += matmul64(G, X, opts.block_bytes)
        return out.add_(X, alpha=l2)

    solution = spd_solve(build32, apply64, build64, rhs, opts, what="the projected update (P·M·P + αI)")
    delta = solution @ R if low_rank else solution
    if not torch.isfinite(delta).all():
        raise EditError("the projected solve produced NaN/inf")
    return delta


def project_keys_gram(P: Float[torch.Tensor, "d_k d_k"], keys: Float[torch.Tensor, "u d_k"]) -> Float[torch.Tensor, "d_k d_k"]:
    """``P Kᵀ K`` in float64: one batch's contribution to ``P · KpKp`` (``O(d_k² u)``), on ``P``'s device."""
    K = keys.to(device=P.device, dtype=torch.float64)
    return (P.to(torch.float64) @ K.T) @ K  # [d_k, u] @ [u, d_k]


def projected_gram(P: Float[torch.Tensor, "d_k d_k"], keys: Float[torch.Tensor, "u d_k"]) -> Float[torch.Tensor, "d_k d_k"]:
    """``(P Kᵀ)(P Kᵀ)ᵀ = P Kᵀ K P`` in float64: one batch's contribution to ``P · KpKp · P``
    (``projected_gram`` of :func:`projected_solve`; ``O(d_k² u)``), on ``P``'s device."""
    K = keys.to(device=P.device, dtype=torch.float64)
    PKt = matmul64(P, K.T.contiguous())  # [d_k, u]
    return PKt @ PKt.T


class NullspaceStore:
    """Caches :class:`Projection` s in memory and on disk (``.safetensors`` beside the covariance
    cache), one per covariance cache key and τ.

    Args:
        cache_dir: directory of the cache files; ``None`` (default) uses
            ``default_cache_dir() / "nullspace"``; ``False`` disables the disk cache.
    """

    def __init__(self, cache_dir: str | Path | None | bool = None) -> None:
        if cache_dir is False:
            self.cache_dir: Path | None = None
        else:
            from pmet_lens.core.models import default_cache_dir

            self.cache_dir = (Path(cast("str | Path", cache_dir)) if cache_dir not in (None, True)
                              else default_cache_dir() / "nullspace")
        self._memory: dict[str, Projection] = {}

    def get(self, cov_key: str, cov: Float[torch.Tensor, "d_k d_k"], threshold: float) -> Projection:
        """P for the covariance named ``cov_key`` (:meth:`CovarianceStore.cache_key`, which names the
        model's and layer's weights, the tokenizer, the corpus, the token count, sequence length and
        dtype) at threshold τ; computed from ``cov`` when not cached (under a lock per entry, so
        processes sharing the cache compute it once). The null-space dimension is logged."""
        key = f"P_{cov_key}_tau{threshold!r}"
        proj = self._memory.get(key)
        if proj is None:
            proj = self._read(key, threshold)
        if proj is None and self.cache_dir is not None:
            # another process may be computing the same P: wait for its file rather than repeat the work
            with file_lock(self.cache_dir / f"{key}.lock"):
                proj = self._read(key, threshold)
                if proj is None:
                    proj = nullspace_projection(cov, threshold)
                    self._write(key, proj)
        elif proj is None:
            proj = nullspace_projection(cov, threshold)
        self._memory[key] = proj
        d = cov.shape[0]
        logger.info("null space of %s at τ=%g: dimension %d of %d", cov_key.split("_m")[0], threshold, proj.dim, d)
        if proj.dim == 0:
            logger.warning("the null space of %s at τ=%g is empty: P = 0 and this layer's update is zero; raise τ",
                           cov_key.split("_m")[0], threshold)
        return proj

    def _read(self, key: str, threshold: float) -> Projection | None:
        found = read_matrix(self.cache_dir, key, "P", _FORMAT, what="null-space", dtype=torch.float64)
        if found is None:
            return None
        P, meta = found
        dim = meta.get("dim", "")
        if not dim.isdigit():
            logger.warning("null-space cache file for %s records no dimension; rebuilding it", key)
            return None
        return Projection(P=P, dim=int(dim), threshold=threshold)

    def _write(self, key: str, proj: Projection) -> None:
        write_matrix(self.cache_dir, key, "P", _FORMAT, proj.P, {"dim": str(proj.dim)})
