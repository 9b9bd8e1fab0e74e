"""ROME, r-ROME, EMMET, FT-W and FT-L on tiny random models (every block layout), each against an
independent dense computation, and the dispatch that runs them through edit() and EditSession."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, FACT3, new_store, no_hooks, same, snapshot

from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, subject_last_position
from pmet_lens.editing import (
    METHODS,
    EMMETHyperParams,
    FTHyperParams,
    FTLHyperParams,
    ROMEHyperParams,
    RROMEHyperParams,
    edit,
)
from pmet_lens.editing.context import context_templates
from pmet_lens.editing.session import EditSession
from pmet_lens.editing.solvers import equality_constrained_update, rank_one_update

PREFIXES = ("Once upon a time", "I think", "So")
LAYER = 2


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return new_store(tmp_path_factory)


@pytest.fixture(params=["seq-rms-gated", "par-ln"], scope="module")
def two_layouts(request):
    """A sequential (SmolLM2's) and a parallel (GPT-J's) block layout: the checks that do not depend on
    the norm or MLP kind run on these two only, to keep the module fast."""
    from conftest import TINY_VARIANTS, make_tiny_model

    return make_tiny_model(*TINY_VARIANTS[request.param])


def rome_hp(cls=ROMEHyperParams, **kw):
    base = dict(layers=(LAYER,), cov_tokens=1500, cov_seq_len=64, steps=3, context_prefixes=PREFIXES)
    base.update(kw)
    return cls(**base)


def emmet_hp(**kw):
    base = dict(layers=(LAYER,), cov_tokens=1500, cov_seq_len=64, steps=3, context_prefixes=PREFIXES, lam=1.0)
    base.update(kw)
    return EMMETHyperParams(**base)


def ft_hp(cls=FTHyperParams, **kw):
    base = dict(layers=(LAYER,), steps=6, lr=1e-2, weight_decay=1e-3, batch_size=2)
    base.update(kw)
    return cls(**base)


def template_keys(model, fact, prefixes, layer):
    """[templates, d_mlp] W_out input at the subject's last token of each template's prompt, each run alone."""
    hook = architecture(model).edit_key_hook("W_out", layer)
    rows = []
    for tmpl in context_templates(prefixes):
        text = tmpl.replace("{}", fact["prompt"])
        _, cache = model.run_with_cache(torch.tensor([encode(model, text.format(fact["subject"]))]), names_filter=hook)
        rows.append(cache[hook][0, subject_last_position(model, text, fact["subject"])])
    return torch.stack(rows).double()


def bare_output(model, fact, hook):
    """The activation at ``hook`` at the bare prompt's subject's last token."""
    _, cache = model.run_with_cache(torch.tensor([encode(model, fact["prompt"].format(fact["subject"]))]),
                                    names_filter=hook)
    return cache[hook][0, subject_last_position(model, fact["prompt"], fact["subject"])].double()


@pytest.mark.parametrize("cls", [ROMEHyperParams, RROMEHyperParams], ids=["rome", "r-rome"])
def test_rome_maps_its_key_to_v_star_and_spares_C_orthogonal_keys(tiny_model, store, cls):
    """ΔW = (C⁻¹k̄ᵀ)(v* − k_d W − b)/(k_d C⁻¹ k̄ᵀ) against a dense recomputation (k̄: the uniform mean of the
    templates' keys, each prompt run alone): k_d = k_s (ROME) or k̄ (r-ROME)
    then outputs v* exactly, and a key k with k C⁻¹ k̄ᵀ = 0 keeps its output. C⁻¹k̄ᵀ is a Cholesky solve here
    (the editor's is an LU solve)."""
    hp = rome_hp(cls)
    arch = architecture(tiny_model)
    before = snapshot(tiny_model)
    W = tiny_model.blocks[LAYER].mlp.W_out.detach().double().clone()
    b = tiny_model.blocks[LAYER].mlp.b_out.detach().double().clone()
    keys = template_keys(tiny_model, FACT, PREFIXES, LAYER)
    k_bar, k_s = keys.mean(0), keys[0]
    hook = arch.edit_key_hook("W_out", LAYER)
    C = store.get(tiny_model, [hook], hp.cov_tokens, hp.cov_dtype, hp.cov_seq_len)[hook].double()
    result = edit(tiny_model, [FACT], hparams=hp, cov_store=store, progress=False)
    assert no_hooks(tiny_model) and set(result.deltas) == {f"blocks.{LAYER}.mlp.W_out"}
    v_star = result.targets["mlp_out"][0].double()
    k_d = k_s if cls is ROMEHyperParams else k_bar
    u = torch.cholesky_solve(k_bar[:, None], torch.linalg.cholesky(C))[:, 0]
    expected = torch.outer(u, (v_star - k_d @ W - b) / (k_d @ u))
    delta = result.deltas[f"blocks.{LAYER}.mlp.W_out"].double()
    torch.testing.assert_close(delta, expected, rtol=1e-4, atol=1e-6 * float(expected.abs().max()))
    # the edited layer maps k_d to v* (read from the model's own forward for ROME's bare prompt)
    W_new = tiny_model.blocks[LAYER].mlp.W_out.detach().double()
    scale = float(v_star.norm())
    assert float((k_d @ W_new + b - v_star).norm()) <= 1e-5 * scale
    if cls is ROMEHyperParams:
        assert float((bare_output(tiny_model, FACT, arch.mlp_out_hook(LAYER)) - v_star).norm()) <= 1e-4 * scale
    k = torch.randn(k_bar.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * k_bar.norm()
    k_orth = k - (k @ u) / (k_bar @ u) * k_bar  # k_orth C⁻¹ k̄ᵀ = 0
    assert float((k_orth @ delta).norm()) <= 1e-5 * float(k_orth.norm()) * float(delta.norm())
    assert float((k @ delta).norm()) > 1e-3 * float(k.norm()) * float(delta.norm())  # a generic key does move
    result.restore()
    assert same(before, snapshot(tiny_model))


def test_sequential_rome_total_delta_and_bit_exact_restore(two_layouts, store):
    """Several facts: one after another, each fact's key maps to its v* on the model the previous ones
    left; the result's delta is the total change, applying it to the unedited model gives the same bits,
    and restore() is bit-exact."""
    hp = rome_hp()
    before = snapshot(two_layouts)
    result = edit(two_layouts, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    after = snapshot(two_layouts)
    name = f"blocks.{LAYER}.mlp.W_out"
    assert set(result.deltas) == {name} and result.targets["mlp_out"].shape[0] == 2
    assert len(result.stats["update_norm"]) == 2 and len(result.stats["steps"]) == 2
    v_last = result.targets["mlp_out"][1].double()
    got = bare_output(two_layouts, FACT2, architecture(two_layouts).mlp_out_hook(LAYER))
    assert float((got - v_last).norm()) <= 1e-4 * float(v_last.norm())  # the last edit holds exactly
    torch.testing.assert_close(after[name].double() - before[name].double(), result.deltas[name].double(),
                               rtol=0, atol=1e-6 * float(result.deltas[name].abs().max()))
    result.restore()
    assert same(before, snapshot(two_layouts))
    result.apply()
    assert same(after, snapshot(two_layouts))
    result.restore()
    # given targets replace the optimisation: the first fact's v* alone gives the edit that maps k_s to it
    again = edit(two_layouts, [FACT], hparams=hp, cov_store=store, progress=False,
                 targets={"mlp_out": result.targets["mlp_out"][:1]})
    v_first = result.targets["mlp_out"][0].double()
    got = bare_output(two_layouts, FACT, architecture(two_layouts).mlp_out_hook(LAYER))
    assert again.stats["targets"] == "given" and float((got - v_first).norm()) <= 1e-4 * float(v_first.norm())
    again.restore()
    assert same(before, snapshot(two_layouts))


def kkt_solve(K, R, C, lam):
    """The relaxed equality-constrained problem as one dense block system (no inverse): ΔW and the
    multipliers Λ with C ΔW − Kᵀ Λ = 0 and K ΔW + λ_E Λ = R."""
    n, d = K.shape
    top = torch.cat([C, -K.T], 1)                                              # [d, d + n]
    bottom = torch.cat([K, lam * torch.eye(n, dtype=K.dtype)], 1)              # [n, d + n]
    rhs = torch.cat([torch.zeros(d, R.shape[1], dtype=R.dtype), R])           # [d + n, d_out]
    sol = torch.linalg.solve(torch.cat([top, bottom]), rhs)
    return sol[:d], sol[d:]


def test_emmet_solve_equals_dense_solve_and_meets_its_constraint():
    """EMMET's two-step solve equals the dense block (KKT) system's solution, and K ΔW = R − λ_E Λ: exact up
    to the λ_E term (exact with λ_E = 0 or one fact)."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(12, 12, dtype=torch.float64, generator=gen)
    C = A @ A.T / 12 + 0.1 * torch.eye(12, dtype=torch.float64)
    K = torch.randn(3, 12, dtype=torch.float64, generator=gen)
    R = torch.randn(3, 5, dtype=torch.float64, generator=gen)
    alpha, lam = 7.0, 0.3
    expected, multipliers = kkt_solve(K, R, alpha * C, lam)
    delta = equality_constrained_update(K, R, C, alpha, lam)
    torch.testing.assert_close(delta, expected, rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(K @ delta, R - lam * multipliers, rtol=1e-8, atol=1e-12)  # up to the λ_E term
    assert float((K @ delta - R).norm()) > 1e-3  # ... which is not nothing
    torch.testing.assert_close(K @ equality_constrained_update(K, R, C, alpha, 0.0), R, rtol=1e-9, atol=1e-10)
    one = equality_constrained_update(K[:1], R[:1], C, alpha, lam)  # no λ_E for one fact (official)
    torch.testing.assert_close(K[:1] @ one, R[:1], rtol=1e-9, atol=1e-10)
    # among the ΔW with K ΔW = R, EMMET's has the least tr(ΔWᵀ C ΔW): adding a null-space direction costs more
    exact = equality_constrained_update(K, R, C, alpha, 0.0)
    null = torch.linalg.svd(K).Vh[3:].T  # [12, 9], K null = 0
    other = exact + null @ torch.randn(9, 5, dtype=torch.float64, generator=gen)
    assert torch.trace(exact.T @ C @ exact) < torch.trace(other.T @ C @ other)
    # the rank-one update is EMMET's for one fact with the same key in the denominator
    torch.testing.assert_close(rank_one_update(K[0], R[0], C), equality_constrained_update(K[:1], R[:1], C, 1.0, 0.0))


def test_emmet_edit_reaches_its_targets(two_layouts, store):
    """One layer, bare prompts only and λ_E = 0: the update is the engine's EMMET solve, and both facts'
    residual streams at L reach their MEMIT targets z."""
    hp = emmet_hp(context_prefixes=(), emmet_lambda=0.0)
    before = snapshot(two_layouts)
    result = edit(two_layouts, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    assert result.method == "emmet" and set(result.targets) == {"resid_post"}
    hook = architecture(two_layouts).delta_hook("resid_post", LAYER)
    for i, fact in enumerate((FACT, FACT2)):
        z = result.targets["resid_post"][i].double()
        assert float((bare_output(two_layouts, fact, hook) - z).norm()) <= 1e-4 * float(z.norm())
    result.restore()
    assert same(before, snapshot(two_layouts))


@pytest.mark.parametrize("cls", [FTHyperParams, FTLHyperParams], ids=["ft-w", "ft-l"])
def test_fine_tuning_changes_one_matrix_and_its_loss_falls(two_layouts, cls):
    hp = ft_hp(cls) if cls is FTHyperParams else ft_hp(cls, norm_constraint=2e-3)
    before = snapshot(two_layouts)
    result = edit(two_layouts, [FACT, FACT2, FACT3], hparams=hp, progress=False)
    after = snapshot(two_layouts)
    name = f"blocks.{LAYER}.mlp.W_out"
    assert no_hooks(two_layouts) and set(result.deltas) == {name} and result.targets == {}
    assert [k for k in before if not torch.equal(before[k], after[k])] == [name]
    assert torch.equal(after[name], before[name] + result.deltas[name])
    curve = result.stats["loss"]
    assert len(curve) >= 2 and curve[-1] < curve[0]
    if cls is FTLHyperParams:
        assert float(result.deltas[name].abs().max()) <= hp.norm_constraint * (1 + 1e-6)
    result.restore()
    assert same(before, snapshot(two_layouts))


def test_fine_tuning_stops_early_and_refuses_targets(two_layouts):
    hp = ft_hp(loss_stop=1e9)  # every loss is below: no step is taken
    before = snapshot(two_layouts)
    result = edit(two_layouts, [FACT], hparams=hp, progress=False)
    assert len(result.stats["loss"]) == 1 and all(torch.count_nonzero(d) == 0 for d in result.deltas.values())
    result.restore()
    with pytest.raises(ValueError, match="no target vectors"):
        edit(two_layouts, [FACT], hparams=hp, progress=False, targets={"mlp_out": torch.zeros(1, 16)})
    assert same(before, snapshot(two_layouts))


@pytest.mark.parametrize("make", [rome_hp, lambda: rome_hp(RROMEHyperParams), emmet_hp, ft_hp, lambda: ft_hp(FTLHyperParams)],
                         ids=["rome", "r-rome", "emmet", "ft-w", "ft-l"])
def test_session_undo_is_bit_exact(store, make):
    """Every method runs in an EditSession; undo after two batches gives back each earlier state bit for bit."""
    from conftest import make_tiny_model

    model = make_tiny_model(False, "RMS", True)
    hp = make()
    session = EditSession(model, hparams=hp, cov_store=store, progress=False)
    states = [snapshot(model)]
    for batch in ([FACT], [FACT2]):
        session.edit(batch)
        states.append(snapshot(model))
    assert not same(states[1], states[2]) and session.method == hp.method
    session.undo()
    assert same(states[1], snapshot(model))
    session.undo(to=0)
    assert same(states[0], snapshot(model))
    session.edit([FACT])
    assert same(states[1], snapshot(model))  # a batch replayed from the same state gives the same bits


def test_dispatch_registry_and_errors(tiny_model, store):
    from pmet_lens.cli import EDIT_METHODS

    assert set(EDIT_METHODS) == set(METHODS)
    for name, cls in METHODS.items():
        hp = cls(layers=(1,))
        assert cls.method == name and hp.editor().sites(tiny_model, hp)[0].layer == 1
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match="contradicts"):
        edit(tiny_model, [FACT], method="rome", hparams=emmet_hp(), cov_store=store, progress=False)
    with pytest.raises(ValueError, match="one layer"):
        ROMEHyperParams(layers=(1, 2))
    with pytest.raises(ValueError, match="norm_constraint"):
        FTLHyperParams(norm_constraint=None)
    with pytest.raises(ValueError, match="null-space"):
        EMMETHyperParams(nullspace=True)
    with pytest.raises(ValueError, match="emmet_lambda"):
        EMMETHyperParams(emmet_lambda=-1.0)
    with pytest.raises(ValueError, match="lr"):
        FTHyperParams(lr=0.0)
    assert same(before, snapshot(tiny_model))


@pytest.mark.parametrize("make", [rome_hp, ft_hp], ids=["rome", "ft-w"])
def test_one_process_editors_refuse_workers_before_any_work(two_layouts, store, tmp_path, make):
    from pmet_lens.parallel import ShardLog

    before = snapshot(two_layouts)
    with pytest.raises(ValueError, match=r"cannot shard its work on workers .* leave workers= and checkpoint= out"):
        edit(two_layouts, [FACT], hparams=make(), cov_store=store, progress=False, checkpoint=ShardLog(tmp_path / "log"))
    assert same(before, snapshot(two_layouts))
    assert not (tmp_path / "log").exists() or not any((tmp_path / "log").iterdir())  # nothing was run
    session = EditSession(two_layouts, hparams=make(), cov_store=store, progress=False)
    with pytest.raises(ValueError, match="cannot shard its work on workers"):
        session.edit([FACT], workers=object())
    assert len(session) == 0 and same(before, snapshot(two_layouts))
