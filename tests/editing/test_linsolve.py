"""The memory-lean solves (pmet_lens.editing.linsolve): float32 Cholesky + float64 refinement equals
the float64 solve; the float64 fallback; AlphaEdit's symmetric form equals its published form."""

from __future__ import annotations

import logging

import pytest
import torch

from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.nullspace import nullspace_projection, project_keys_gram, projected_gram, projected_solve
from pmet_lens.editing.update import solve_update

# The stated tolerance: the refined solve and torch.linalg.solve in float64 differ by float64 rounding,
# of the order of cond(A)·ε64·√d; 1e-9 relative (Frobenius) holds with a wide margin here.
RTOL = 1e-9


def _cov(d: int, decades: float, seed: int = 0) -> torch.Tensor:
    """A float32 covariance whose eigenvalues span ``decades`` orders of magnitude."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    evals = torch.logspace(0, -decades, d, dtype=torch.float64)
    return ((q * evals) @ q.T).float()


def _reference(keys, resid, cov, lam):
    K, R = keys.double(), resid.double()
    return torch.linalg.solve(lam * cov.double() + K.T @ K, K.T @ R)


def _rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("n, d_out", [(5, 12), (40, 12)])  # fewer requests than outputs (Y = A⁻¹Kᵀ), and more
def test_mixed_solve_equals_the_float64_solve(n, d_out, caplog):
    g = torch.Generator().manual_seed(1)
    cov = _cov(64, decades=4)
    keys, resid = torch.randn(n, 64, generator=g), torch.randn(n, d_out, generator=g)
    with caplog.at_level(logging.WARNING, logger="pmet_lens.editing.linsolve"):
        got = solve_update(keys, resid, cov, 3.0)
    assert "float64" not in caplog.text  # no fallback: the float32 factorisation was refined
    assert got.dtype == torch.float64 and _rel(got, _reference(keys, resid, cov, 3.0)) < RTOL
    only64 = solve_update(keys, resid, cov, 3.0, options=SolveOptions(mode="float64", float64_device="cpu"))
    assert _rel(only64, _reference(keys, resid, cov, 3.0)) < RTOL


def test_ill_conditioned_system_falls_back_to_float64(caplog):
    g = torch.Generator().manual_seed(2)
    cov = _cov(48, decades=9).double()  # cond ~1e9: beyond float32 (1/ε32 ~ 1.7e7), well within float64
    keys, resid = torch.randn(3, 48, generator=g, dtype=torch.float64), torch.randn(3, 8, generator=g, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="pmet_lens.editing.linsolve"):
        got = solve_update(keys, resid, cov, 1.0)
    assert "solving in float64" in caplog.text and "by LU" not in caplog.text
    ref = torch.linalg.solve(cov + keys.T @ keys, keys.T @ resid)
    assert _rel(got, ref) < 1e-5  # two float64 solves of a cond ~1e9 system


def test_bad_inputs_raise_before_any_solve():
    from pmet_lens.editing.validate import EditError

    keys = torch.randn(2, 8)
    with pytest.raises(EditError, match="non-finite"):
        solve_update(keys, torch.full((2, 4), float("nan")), torch.eye(8), 1.0)
    cov = torch.eye(8)
    cov[1, 2] = float("inf")
    with pytest.raises(EditError, match="non-finite"):
        solve_update(keys, torch.randn(2, 4), cov, 1.0)
    with pytest.raises(ValueError, match="mode"):
        SolveOptions(mode="float16")


def _published(keys, resid, P, l2, prev=None):
    """AlphaEdit eq. 12 transposed as published: the non-symmetric (P (K1ᵀK1 + KpKp) + αI) X = P K1ᵀ R."""
    K, R = keys.double(), resid.double()
    A = P @ (K.T @ K + (prev if prev is not None else 0)) + l2 * torch.eye(K.shape[1], dtype=torch.float64)
    return torch.linalg.solve(A, P @ K.T @ R)


@pytest.mark.parametrize("u, d_out", [(4, 10), (30, 10)])
def test_symmetric_projected_solve_equals_the_published_form(u, d_out):
    g = torch.Generator().manual_seed(3)
    cov = _cov(40, decades=3, seed=3).double()
    proj = nullspace_projection(cov, threshold=1e-2)
    assert 0 < proj.dim < 40
    k1, k2 = torch.randn(6, 40, generator=g, dtype=torch.float64), torch.randn(5, 40, generator=g, dtype=torch.float64)
    keys, resid = torch.randn(u, 40, generator=g, dtype=torch.float64), torch.randn(u, d_out, generator=g, dtype=torch.float64)
    prev = k1.T @ k1 + k2.T @ k2
    ref = _published(keys, resid, proj.P, 2.0, prev)
    gram = projected_gram(proj.P, k1) + projected_gram(proj.P, k2)
    torch.testing.assert_close(gram, proj.P @ prev @ proj.P, rtol=1e-10, atol=1e-12)
    exact = [projected_solve(keys, resid, proj.P, 2.0, prev=prev),
             projected_solve(keys, resid, proj.P, 2.0, projected_gram=gram),
             projected_solve(keys, resid, proj.P, 2.0,
                             projected_prev=project_keys_gram(proj.P, k1) + project_keys_gram(proj.P, k2)),
             projected_solve(keys, resid, proj.P, 2.0, projected_gram=gram, options=SolveOptions(mode="float64"))]
    assert max(_rel(X, ref) for X in exact) < RTOL
    assert _rel(projected_solve(keys, resid, proj.P, 2.0), _published(keys, resid, proj.P, 2.0)) < RTOL
    evals, evecs = torch.linalg.eigh(proj.P)
    k0 = evecs[:, evals < 0.5]  # keys with P k0 = 0 keep their outputs (AlphaEdit's guarantee)
    assert float((k0.T @ exact[1]).abs().max()) < 1e-12
    with pytest.raises(ValueError, match="not both"):
        projected_solve(keys, resid, proj.P, 2.0, prev=prev, projected_gram=gram)
