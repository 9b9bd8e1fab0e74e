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
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["Projection", "NullspaceStore", "nullspace_projection", "project_keys_gram", "projected_solve"]

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
    C = cov.detach().to(torch.float64)
    if not torch.isfinite(C).all():
        raise EditError("the covariance C contains NaN/inf; rebuild it (delete its cache file)")
    d = C.shape[0]
    if threshold == 0:
        return Projection(P=torch.zeros(d, d, dtype=torch.float64, device=C.device), dim=0, threshold=0.0)
    evals, evecs = torch.linalg.eigh((C + C.T) / 2)
    keep = evals < threshold
    U_hat = evecs[:, keep]  # [d_k, dim]
    return Projection(P=U_hat @ U_hat.T, dim=int(keep.sum()), threshold=float(threshold))


def projected_solve(
    keys: Float[torch.Tensor, "u d_k"],
    resid: Float[torch.Tensor, "u d_out"],
    P: Float[torch.Tensor, "d_k d_k"],
    l2: float,
    prev: Float[torch.Tensor, "d_k d_k"] | None = None,
    *,
    projected_prev: Float[torch.Tensor, "d_k d_k"] | None = None,
) -> Float[torch.Tensor, "d_k d_out"]:
    """X solving ``(P (K1ᵀK1 + KpKp) + α I) X = P K1ᵀ R`` in float64 (AlphaEdit eq. 12 transposed).

    Args:
        keys: K1, this batch's keys as rows.
        resid: R, the spread residuals as rows.
        P: the projector (:func:`nullspace_projection`).
        l2: α, the ridge weight (official "L2": 10).
        prev: KpKp = Σ k kᵀ over earlier batches' keys, or ``None`` (none yet).
        projected_prev: ``P · KpKp`` instead of ``prev`` (a session accumulates it batch by batch
            as ``P Kᵀ K``, so no ``d_k³`` product is needed per batch); at most one of the two.

    ``P K1ᵀ`` is formed first, so the batch costs ``O(d_k² u)`` besides the ``d_k × d_k`` solve.

    Returns:
        ΔW in float64 (``torch.linalg.solve``; no explicit inverse). P = 0 gives exactly 0.

    Raises:
        EditError: non-finite inputs or solution.
    """
    if not (math.isfinite(l2) and l2 > 0):
        raise ValueError(f"α (l2) must be a finite number > 0, got {l2!r}")
    if prev is not None and projected_prev is not None:
        raise ValueError("pass prev (KpKp) or projected_prev (P·KpKp), not both")
    K = keys.to(torch.float64)
    R = resid.to(torch.float64)
    P64 = P.to(device=K.device, dtype=torch.float64)
    PKt = P64 @ K.T  # [d_k, u]
    A = PKt @ K  # [d_k, d_k] = P K1 K1ᵀ in the paper's column orientation
    if prev is not None:
        A = A + P64 @ prev.to(device=K.device, dtype=torch.float64)
    elif projected_prev is not None:
        A = A + projected_prev.to(device=K.device, dtype=torch.float64)
    A = A + l2 * torch.eye(K.shape[1], dtype=torch.float64, device=K.device)
    rhs = PKt @ R  # [d_k, d_out]
    if not (torch.isfinite(A).all() and torch.isfinite(rhs).all()):
        raise EditError("non-finite keys, residuals or statistics in the projected update")
    delta = torch.linalg.solve(A, rhs)
    if not torch.isfinite(delta).all():
        raise EditError("the projected solve produced NaN/inf")
    return delta


def project_keys_gram(P: Float[torch.Tensor, "d_k d_k"], keys: Float[torch.Tensor, "u d_k"]) -> Float[torch.Tensor, "d_k d_k"]:
    """``P Kᵀ K`` in float64: one batch's contribution to ``P · KpKp`` (``O(d_k² u)``)."""
    K = keys.to(torch.float64)
    return (P.to(device=K.device, dtype=torch.float64) @ K.T) @ K  # [d_k, u] @ [u, d_k]


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
        return Projection(P=proj.P.to(cov.device), dim=proj.dim, threshold=proj.threshold)

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
