"""AlphaEdit's null-space projection and projected solve (pmet_lens.editing.nullspace)."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.editing.nullspace import NullspaceStore, nullspace_projection, projected_solve


def _low_rank_cov(d: int = 24, rank: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A covariance E[kkᵀ] of keys spanning a ``rank``-dimensional subspace (plus tiny noise), and
    a basis of that subspace as columns."""
    g = torch.Generator().manual_seed(seed)
    basis, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    keys = torch.randn(500, rank, generator=g, dtype=torch.float64) @ basis.T  # [500, d] in span(basis)
    keys = keys + 1e-4 * torch.randn(500, d, generator=g, dtype=torch.float64)
    return keys.T @ keys / keys.shape[0], basis


def test_projector_is_orthogonal_projection_onto_small_eigendirections():
    cov, basis = _low_rank_cov()
    proj = nullspace_projection(cov, threshold=1e-3)
    P = proj.P
    assert proj.dim == 24 - 10
    torch.testing.assert_close(P, P.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(P @ P, P, rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(P).item() == proj.dim
    assert (P @ basis).abs().max() < 1e-4  # (noise tilts the span slightly) the preserved keys' directions are projected out


def test_preserved_keys_do_not_move():
    """kᵀ X = 0 for every k with P k = 0 (AlphaEdit's guarantee), to float64 rounding."""
    cov, basis = _low_rank_cov()
    proj = nullspace_projection(cov, threshold=1e-3)
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(6, 24, generator=g, dtype=torch.float64)
    resid = torch.randn(6, 8, generator=g, dtype=torch.float64)
    X = projected_solve(keys, resid, proj.P, l2=10.0)
    # exact null keys of P: the eigenvectors it drops
    evals, evecs = torch.linalg.eigh(proj.P)
    k0 = evecs[:, evals < 0.5]  # [24, 10], P k0 = 0 to rounding
    assert (proj.P @ k0).abs().max() < 1e-12
    assert (k0.T @ X).abs().max() < 1e-12
    assert X.abs().max() > 1e-3  # and the update is not trivially zero


def test_own_keys_move_toward_their_targets():
    cov, _ = _low_rank_cov()
    proj = nullspace_projection(cov, threshold=1e-3)
    g = torch.Generator().manual_seed(2)
    keys = torch.randn(4, 24, generator=g, dtype=torch.float64)
    resid = torch.randn(4, 8, generator=g, dtype=torch.float64)
    X = projected_solve(keys, resid, proj.P, l2=1e-3)
    before = resid.norm()
    after = (resid - keys @ X).norm()
    assert after < 0.5 * before
    # each residual row is reduced (positive alignment with the target direction)
    assert ((keys @ X) * resid).sum(1).min() > 0


def test_prev_term_shrinks_change_of_earlier_keys():
    """The KpKpᵀ term: earlier batches' outputs change less than under the same solve without it."""
    cov, _ = _low_rank_cov()
    proj = nullspace_projection(cov, threshold=1e-3)
    g = torch.Generator().manual_seed(3)
    earlier = torch.randn(5, 24, generator=g, dtype=torch.float64)
    keys = torch.randn(4, 24, generator=g, dtype=torch.float64)
    resid = torch.randn(4, 8, generator=g, dtype=torch.float64)
    without = projected_solve(keys, resid, proj.P, l2=1.0)
    with_prev = projected_solve(keys, resid, proj.P, l2=1.0, prev=earlier.T @ earlier)
    assert (earlier @ with_prev).norm() < 0.5 * (earlier @ without).norm()


@pytest.mark.parametrize("with_prev", [False, True], ids=["first-batch", "with-KpKp"])
def test_projected_solve_equals_the_direct_solve_of_eq_12(with_prev):
    """X = solve(P (K1ᵀK1 + KpKp) + α I, P K1ᵀ R) written out directly, for a random low-rank
    projector P (not C's: any symmetric idempotent P) and float32 inputs, as the editors pass them."""
    g = torch.Generator().manual_seed(7)
    d, rank, u, d_out, alpha = 24, 7, 5, 8, 0.3
    U, _ = torch.linalg.qr(torch.randn(d, rank, generator=g, dtype=torch.float64))
    P = U @ U.T  # [d, d], rank 7
    keys = torch.randn(u, d, generator=g)
    resid = torch.randn(u, d_out, generator=g)
    earlier = torch.randn(9, d, generator=g, dtype=torch.float64)
    prev = earlier.T @ earlier if with_prev else torch.zeros(d, d, dtype=torch.float64)
    K, R = keys.double(), resid.double()
    direct = torch.linalg.solve(P @ (K.T @ K + prev) + alpha * torch.eye(d, dtype=torch.float64), P @ K.T @ R)
    got = projected_solve(keys, resid, P, alpha, prev=prev if with_prev else None)
    assert got.dtype == torch.float64 and got.shape == (d, d_out)
    torch.testing.assert_close(got, direct, rtol=1e-10, atol=1e-12)
    # the projection matters: without it (P = I) the solution is another one
    assert (projected_solve(keys, resid, torch.eye(d), alpha, prev=prev if with_prev else None) - direct).norm() > 0.1 * direct.norm()


def test_threshold_zero_and_empty_nullspace_give_zero_update():
    cov, _ = _low_rank_cov()
    keys = torch.randn(3, 24, dtype=torch.float64)
    resid = torch.randn(3, 8, dtype=torch.float64)
    for tau in (0.0, float(torch.linalg.eigvalsh(cov).min()) * 0.5):
        proj = nullspace_projection(cov, tau)
        assert proj.dim == 0
        assert torch.equal(proj.P, torch.zeros_like(proj.P))
        X = projected_solve(keys, resid, proj.P, l2=10.0)
        assert torch.equal(X, torch.zeros_like(X))


def test_threshold_above_spectrum_is_the_plain_ridge_solve():
    cov, _ = _low_rank_cov()
    proj = nullspace_projection(cov, threshold=1e6)
    assert proj.dim == 24
    torch.testing.assert_close(proj.P, torch.eye(24, dtype=torch.float64), rtol=0, atol=1e-12)
    keys = torch.randn(3, 24, dtype=torch.float64)
    resid = torch.randn(3, 8, dtype=torch.float64)
    X = projected_solve(keys, resid, proj.P, l2=2.0)
    ridge = torch.linalg.solve(keys.T @ keys + 2.0 * torch.eye(24, dtype=torch.float64), keys.T @ resid)
    torch.testing.assert_close(X, ridge, rtol=1e-10, atol=1e-12)


def test_bad_threshold_and_shapes_are_refused():
    cov, _ = _low_rank_cov()
    with pytest.raises(ValueError, match="threshold"):
        nullspace_projection(cov, -1.0)
    with pytest.raises(ValueError, match="square"):
        nullspace_projection(cov[:3], 1.0)
    with pytest.raises(ValueError, match="l2"):
        projected_solve(torch.zeros(1, 24), torch.zeros(1, 8), torch.eye(24), l2=0.0)


def test_store_caches_on_disk_and_rebuilds_corrupt_files(tmp_path):
    cov, _ = _low_rank_cov()
    store = NullspaceStore(tmp_path)
    first = store.get("blocks-1-mlp-hook_post_mabc", cov, 1e-3)
    files = list(tmp_path.glob("*.safetensors"))
    assert len(files) == 1
    again = NullspaceStore(tmp_path).get("blocks-1-mlp-hook_post_mabc", cov, 1e-3)
    assert torch.equal(first.P, again.P) and first.dim == again.dim
    files[0].write_bytes(b"garbage")
    rebuilt = NullspaceStore(tmp_path).get("blocks-1-mlp-hook_post_mabc", cov, 1e-3)
    assert torch.equal(first.P, rebuilt.P)
    other = store.get("blocks-1-mlp-hook_post_mabc", cov, 1e-2)  # another τ: another entry
    assert len(list(tmp_path.glob("*.safetensors"))) == 2
    assert other.threshold == 1e-2


def test_alphaedit_hparams_validated_and_round_trip():
    from pmet_lens.editing.hparams import AlphaEditHyperParams, MEMITHyperParams, PMETHyperParams, hparams_from_dict, preset

    hp = AlphaEditHyperParams(nullspace_threshold=1e-3, l2=5.0)
    assert hp.method == "alphaedit" and hp.nullspace and hp.spread == "even"
    assert hparams_from_dict(hp.to_dict()) == hp
    assert hparams_from_dict(PMETHyperParams(nullspace=True).to_dict()).nullspace
    for bad, match in (({"nullspace_threshold": -1.0}, r"nullspace_threshold \(τ\) must be a finite number >= 0"),
                       ({"l2": 0.0}, r"l2 \(α\) must be a finite number > 0"),
                       ({"nullspace": False}, "AlphaEditHyperParams needs nullspace=True")):
        with pytest.raises(ValueError, match=match):
            AlphaEditHyperParams(**bad)
    with pytest.raises(TypeError, match="nullspace"):
        PMETHyperParams(nullspace=1)
    a, m = preset("SmolLM2-135M-Instruct", "alphaedit"), preset("SmolLM2-135M-Instruct", "memit")
    assert isinstance(a, AlphaEditHyperParams) and a.target_settings() | {"method": "memit"} == m.target_settings()
    assert isinstance(m, MEMITHyperParams) and not m.nullspace


def test_projected_prev_equals_prev():
    """A session's running P·KpKp (sums of P Kᵀ K) gives the update of the plain KpKp form."""
    from pmet_lens.editing.nullspace import project_keys_gram

    cov, _ = _low_rank_cov()
    proj = nullspace_projection(cov, threshold=1e-3)
    g = torch.Generator().manual_seed(4)
    k1, k2 = (torch.randn(5, 24, generator=g, dtype=torch.float64) for _ in range(2))
    keys = torch.randn(4, 24, generator=g, dtype=torch.float64)
    resid = torch.randn(4, 8, generator=g, dtype=torch.float64)
    plain = projected_solve(keys, resid, proj.P, 1.0, prev=k1.T @ k1 + k2.T @ k2)
    running = projected_solve(keys, resid, proj.P, 1.0,
                              projected_prev=project_keys_gram(proj.P, k1) + project_keys_gram(proj.P, k2))
    torch.testing.assert_close(plain, running, rtol=1e-9, atol=1e-12)
    with pytest.raises(ValueError, match="not both"):
        projected_solve(keys, resid, proj.P, 1.0, prev=k1.T @ k1, projected_prev=k1.T @ k1)
