"""Memory-lean solves of the symmetric positive definite systems of the weight update.

MEMIT's / PMET's update solves ``(λC + KᵀK) X = B`` (MEMIT eq. 14, PMET eq. 10) and AlphaEdit's
projected update an equivalent symmetric system (:func:`pmet_lens.editing.nullspace.projected_solve`).
Both matrices are ``[d_k, d_k]`` (``d_k = d_mlp``, 14,336 on Llama-3-8B: 0.82 GB per copy in float32,
1.64 GB in float64). :func:`spd_solve` solves such a system without building it in float64:

1. the matrix is built once in float32 and factorised in place by a Cholesky decomposition
   (``torch.linalg.cholesky_ex``): one ``d_k²`` float32 buffer;
2. the solution is refined (mixed-precision iterative refinement, as LAPACK's ``dsposv``): each
   step forms the residual ``r = B − A X`` in float64 from the matrix's parts, in row blocks
   (``A X`` is ``λ C X + Kᵀ(K X)``, never ``A`` itself in float64), and adds the float32 Cholesky
   solve of ``r``. It stops when ``max|r| ≤ max|X| · ‖A‖∞ · ε64 · √d_k`` (``dsposv``'s test), so the
   result equals the float64 solve up to float64 rounding (its difference from
   ``torch.linalg.solve`` in float64 is of the order of ``cond(A) · ε64 · √d_k``);
3. when the float32 factorisation fails (the matrix is not positive definite in float32) or the
   refinement does not converge in ``max_refinements`` steps (``cond(A) · ε32`` near 1 or above),
   the system is built in float64 (one ``d_k²`` float64 buffer), factorised in place (Cholesky,
   or LU if that fails) and solved; the fallback is logged.

:class:`SolveOptions` chooses the mode (``"mixed"``, or ``"float64"`` for the in-place float64
solve only) and where float64 work runs (``float64_device="cpu"`` keeps it off a GPU that runs
float64 slowly, e.g. consumer cards at 1/64 of their float32 rate).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Callable

import torch

from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["SolveOptions", "matmul64", "spd_solve"]

_EPS64 = float(torch.finfo(torch.float64).eps)


@dataclass(frozen=True)
class SolveOptions:
    """How the weight update's ``[d_k, d_k]`` systems are solved.

    Attributes:
        mode: ``"mixed"`` (default): float32 Cholesky with float64 iterative refinement, float64
            fallback (see the module docstring); ``"float64"``: the float64 in-place solve only.
        float64_device: where the float64 fallback (or ``mode="float64"``) runs: ``None`` (default)
            on the device of the keys, ``"cpu"`` (or any device) there instead. Choose ``"cpu"``
            on a GPU with slow float64 arithmetic; the result is moved back to the keys' device.
        max_refinements: most refinement steps before the float64 fallback (LAPACK ``dsposv``: 30).
        block_bytes: size of the float64 row blocks of the refinement's residual products.
    """

    mode: str = "mixed"
    float64_device: str | torch.device | None = None
    max_refinements: int = 30
    block_bytes: int = 2**27

    def __post_init__(self) -> None:
        if self.mode not in ("mixed", "float64"):
            raise ValueError(f"SolveOptions.mode must be 'mixed' or 'float64', got {self.mode!r}")
        if isinstance(self.max_refinements, bool) or not isinstance(self.max_refinements, int) or self.max_refinements < 1:
            raise ValueError(f"SolveOptions.max_refinements must be an int >= 1, got {self.max_refinements!r}")
        if isinstance(self.block_bytes, bool) or not isinstance(self.block_bytes, int) or self.block_bytes < 1:
            raise ValueError(f"SolveOptions.block_bytes must be a positive int, got {self.block_bytes!r}")


def matmul64(M: torch.Tensor, X: torch.Tensor, block_bytes: int = 2**27) -> torch.Tensor:
    """``M @ X`` in float64 on ``X``'s device, with ``M`` (any dtype, any device, e.g. a CPU-resident
    ``[d, d]`` statistic) moved and converted one block of rows at a time, so no float64 copy of
    ``M`` is made. ``X``: float64 ``[d, m]``."""
    rows = max(1, block_bytes // (8 * max(1, M.shape[1])))
    out = torch.empty(M.shape[0], X.shape[1], dtype=torch.float64, device=X.device)
    for i in range(0, M.shape[0], rows):
        out[i:i + rows] = M[i:i + rows].to(device=X.device, dtype=torch.float64) @ X  # [rows, d] @ [d, m]
    return out


def spd_solve(
    build32: Callable[[], torch.Tensor],
    apply64: Callable[[torch.Tensor], torch.Tensor],
    build64: Callable[[torch.device], torch.Tensor],
    rhs: torch.Tensor,
    options: SolveOptions | None = None,
    *,
    what: str = "the weight update",
) -> torch.Tensor:
    """X with ``A X = rhs`` for a symmetric positive definite ``A`` given by its parts.

    Args:
        build32: returns a new float32 ``A`` on ``rhs``'s device (it is factorised in place).
        apply64: ``X -> A X`` in float64 (on ``X``'s device), without a float64 ``[d, d]`` copy of A.
        build64: ``device -> A`` in float64 on that device (the fallback's one ``[d, d]`` buffer).
        rhs: float64 ``[d, m]``.
        options: :class:`SolveOptions` (default ``SolveOptions()``).
        what: the system's name in log messages and errors.

    Returns:
        float64 ``[d, m]`` on ``rhs``'s device.

    Raises:
        EditError: the matrix or the right-hand side is not finite, or no solve gives finite values.
    """
    opts = options if options is not None else SolveOptions()
    if not math.isfinite(float(rhs.sum())):
        raise EditError(f"non-finite keys, residuals or statistics in {what}")
    if opts.mode == "mixed":
        X = _refined(build32, apply64, rhs, opts, what)
        if X is not None:
            return X
    return _float64_solve(build64, rhs, opts, what)


def _refined(build32: Callable[[], torch.Tensor], apply64: Callable[[torch.Tensor], torch.Tensor], rhs: torch.Tensor,
             opts: SolveOptions, what: str) -> torch.Tensor | None:
    """Float32 Cholesky + float64 iterative refinement; ``None`` when it fails (logged)."""
    A = build32()
    total = float(A.sum(dtype=torch.float64))  # a reduction: NaN/inf anywhere shows, no [d, d] mask
    if not math.isfinite(total):
        raise EditError(f"non-finite keys, residuals or statistics in {what}")
    norm_inf = _inf_norm(A)
    d = A.shape[0]
    info = torch.empty((), dtype=torch.int32, device=A.device)
    L, _ = torch.linalg.cholesky_ex(A, out=(A, info))  # in place: A's buffer now holds L
    if int(info) != 0:
        logger.warning("%s: the float32 Cholesky factorisation failed (minor %d not positive definite); "
                       "solving in float64", what, int(info))
        return None
    X = torch.cholesky_solve(rhs.float(), L).double()
    bound = norm_inf * _EPS64 * math.sqrt(d)
    for _ in range(opts.max_refinements):
        r = rhs - apply64(X)
        x_max = float(X.abs().max()) if X.numel() else 0.0
        r_max = float(r.abs().max()) if r.numel() else 0.0
        if not (math.isfinite(x_max) and math.isfinite(r_max)):
            break
        if r_max <= x_max * bound:
            return X
        X += torch.cholesky_solve(r.float(), L).double()
    logger.warning("%s: float32 Cholesky with float64 refinement did not converge in %d steps; solving in float64",
                   what, opts.max_refinements)
    return None


def _inf_norm(A: torch.Tensor) -> float:
    """``max_i Σ_j |A_ij|`` in row blocks (no full-size temporary)."""
    rows = max(1, 2**24 // max(1, A.shape[1]))
    return max(float(A[i:i + rows].abs().sum(1).max()) for i in range(0, A.shape[0], rows))


def _float64_solve(build64: Callable[[torch.device], torch.Tensor], rhs: torch.Tensor, opts: SolveOptions,
                   what: str) -> torch.Tensor:
    """The float64 solve with one ``[d, d]`` buffer: Cholesky in place, LU in place if that fails."""
    device = torch.device(opts.float64_device) if opts.float64_device is not None else rhs.device
    A = build64(device)
    B = rhs.to(device)
    info = torch.empty((), dtype=torch.int32, device=device)
    L, _ = torch.linalg.cholesky_ex(A, out=(A, info))
    if int(info) == 0:
        X = torch.cholesky_solve(B, L)
    else:  # not positive definite in float64 either: LU with partial pivoting (A was overwritten)
        logger.warning("%s: the float64 Cholesky factorisation failed (minor %d); solving by LU", what, int(info))
        del L
        A = build64(device)
        pivots = torch.empty(A.shape[0], dtype=torch.int32, device=device)
        LU, _, _ = torch.linalg.lu_factor_ex(A, out=(A, pivots, info))
        X = torch.linalg.lu_solve(LU, pivots, B)
    if not torch.isfinite(X).all():
        raise EditError(f"the solve of {what} produced NaN/inf (a singular system?)")
    return X.to(rhs.device)
