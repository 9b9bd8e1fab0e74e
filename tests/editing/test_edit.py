"""edit(): the whole pipeline on tiny random models (every block layout and norm), its rollback and its inputs."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, hp_, new_store, no_hooks, same, snapshot

from pmet_lens.data import DataError
from pmet_lens.editing import EditError, MEMITHyperParams, PMETHyperParams, edit


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return new_store(tmp_path_factory)



W_OUT = {"blocks.1.mlp.W_out", "blocks.2.mlp.W_out"}


@pytest.mark.parametrize("cls, ablation, edited", [
    (PMETHyperParams, {}, W_OUT),
    (MEMITHyperParams, {}, W_OUT),
    (PMETHyperParams, {"use_attn_delta": False}, W_OUT),  # PMET Table 3 ablations, end to end
    (PMETHyperParams, {"spread": "even"}, W_OUT),
    (PMETHyperParams, {"update_attn": True}, W_OUT | {"blocks.1.attn.W_O", "blocks.2.attn.W_O"}),
], ids=["pmet", "memit", "pmet-no-attn-delta", "pmet-even-spread", "pmet-update-W_O"])
def test_edit_restore_untouched_and_no_hooks(tiny_model, store, cls, ablation, edited):
    before = snapshot(tiny_model)
    hp = hp_(cls, **ablation)
    result = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    assert no_hooks(tiny_model)
    assert set(result.deltas) == edited
    assert set(result.targets) == ({"mlp_out"} if ablation.get("use_attn_delta") is False else
                                   {"resid_post"} if cls is MEMITHyperParams else {"mlp_out", "attn_out"})
    after = tiny_model.state_dict()
    for k in before:
        if k in result.deltas:
            assert not torch.equal(before[k], after[k])
        else:
            assert torch.equal(before[k], after[k]), k
    result.restore()
    assert same(before, snapshot(tiny_model))
    # context manager: applied inside, restored on exit
    with result:
        assert not torch.equal(before["blocks.2.mlp.W_out"], tiny_model.blocks[2].mlp.W_out)
    assert same(before, snapshot(tiny_model))


def test_conflicts_layers_and_nan(tiny_model, store, monkeypatch):
    before = snapshot(tiny_model)
    with pytest.raises(DataError, match="conflicting"):
        edit(tiny_model, [FACT, {**FACT, "target_new": "German"}], hparams=hp_(), cov_store=store, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        edit(tiny_model, [FACT], hparams=hp_(layers=(2, 9)), cov_store=store, progress=False)
    with pytest.raises(DataError, match="empty"):
        edit(tiny_model, [], hparams=hp_(), cov_store=store, progress=False)
    # NaN in the solve (after the first layer was written): everything is rolled back
    import pmet_lens.editing.update as upd

    calls = {"n": 0}
    real = upd.solve_update

    def flaky(keys, resid, cov, lam, **options):
        calls["n"] += 1
        if calls["n"] == 2:
            return real(keys, resid * float("nan"), cov, lam, **options)
        return real(keys, resid, cov, lam, **options)

    monkeypatch.setattr(upd, "solve_update", flaky)
    with pytest.raises(EditError):
        edit(tiny_model, [FACT], hparams=hp_(), cov_store=store, progress=False)
    monkeypatch.undo()
    # NaN during the optimisation
    import pmet_lens.editing.targets as tg

    real_lp = tg._final_logprobs
    monkeypatch.setattr(tg, "_final_logprobs", lambda model, resid: real_lp(model, resid) * float("nan"))
    with pytest.raises(EditError, match="NaN"):
        edit(tiny_model, [FACT], hparams=hp_(), cov_store=store, progress=False)
    monkeypatch.undo()
    assert same(before, snapshot(tiny_model)) and no_hooks(tiny_model)


def test_reused_targets_give_the_same_edit(tiny_model, store):
    """edit(targets=earlier.targets) skips the optimisation and reproduces the edit exactly; the
    spread / W_O ablations can reuse PMET's targets; bad targets raise before weights change."""
    hp = hp_()
    first = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False, apply=False)
    assert set(first.targets) == {"attn_out", "mlp_out"}
    again = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False, apply=False,
                 targets=first.targets)
    assert again.stats == {"targets": "given"}
    assert all(torch.equal(first.deltas[k], again.deltas[k]) for k in first.deltas)
    sliced = edit(tiny_model, [FACT], hparams=hp.with_(update_attn=True, spread="even"), cov_store=store,
                  progress=False, apply=False, targets={k: v[:1] for k, v in first.targets.items()})
    assert any(k.endswith("W_O") for k in sliced.deltas)
    before = snapshot(tiny_model)
    with pytest.raises(ValueError, match="expected"):
        edit(tiny_model, [FACT], hparams=hp, cov_store=store, progress=False, targets=first.targets)
    with pytest.raises(ValueError, match="lack the site"):
        edit(tiny_model, [FACT, FACT2], hparams=hp_(MEMITHyperParams), cov_store=store,
             progress=False, targets=first.targets)
    assert same(before, snapshot(tiny_model)) and no_hooks(tiny_model)


def test_compile_without_a_compiler_raises_before_weights_change(tiny_model, store, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    before = snapshot(tiny_model)
    with pytest.raises(EditError, match="needs a C\\+\\+ compiler"):
        edit(tiny_model, [FACT], hparams=hp_(), cov_store=store, progress=False, compile=True)
    assert same(before, snapshot(tiny_model)) and no_hooks(tiny_model)


def test_edit_works_with_grad_disabled(tiny_model, store):
    """TransformerLens notebooks often start with torch.set_grad_enabled(False): the target
    optimisation turns grad on for itself, and the caller's grad mode is left as it was."""
    hp = hp_(steps=3)
    with torch.no_grad():
        r = edit(tiny_model, [FACT], hparams=hp, cov_store=store, progress=False, apply=False)
        assert not torch.is_grad_enabled()
    assert r.stats["steps"][0] >= 1 and all(torch.isfinite(d).all() for d in r.deltas.values())


def test_method_and_hparams_must_agree(tiny_model, store):
    """``method`` names the hparams class's method (a ClassVar); a contradiction is an error, not a
    silent choice of one of them."""
    assert PMETHyperParams.method == "pmet" and MEMITHyperParams.method == "memit"
    assert "method" not in {f.name for f in __import__("dataclasses").fields(PMETHyperParams)}
    before = snapshot(tiny_model)
    for method, cls in (("pmet", MEMITHyperParams), ("memit", PMETHyperParams)):
        with pytest.raises(ValueError, match="contradicts"):
            edit(tiny_model, [FACT], method=method, hparams=hp_(cls), cov_store=store, progress=False)
    with pytest.raises(ValueError, match="method must be one of"):
        edit(tiny_model, [FACT], method="serac", hparams=hp_(), cov_store=store, progress=False)
    assert same(before, snapshot(tiny_model))
    agreed = edit(tiny_model, [FACT], method="MEMIT", hparams=hp_(MEMITHyperParams, steps=2), cov_store=store,
                  progress=False, apply=False)
    assert agreed.method == "memit" and set(agreed.targets) == {"resid_post"}
