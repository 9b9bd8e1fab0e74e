"""Sequential editing sessions (pmet_lens.editing.session) on tiny random models."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import make_tiny_model
from pmet_lens.data import DataError
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.hparams import AlphaEditHyperParams, MEMITHyperParams, PMETHyperParams
from pmet_lens.editing.nullspace import NullspaceStore
from pmet_lens.editing.session import EditSession

BATCHES = [
    [{"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English"}],
    [{"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"},
     {"subject": "Toko Yasuda", "prompt": "{}, who plays the instrument called the", "target_new": "piano"}],
    [{"subject": "Barack Obama", "prompt": "{} was born in", "target_new": "Tokyo"}],
]
EDITED = ("blocks.1.mlp.W_out", "blocks.2.mlp.W_out")


def _hp(cls=AlphaEditHyperParams, **kw):
    base = dict(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=4, prefix_len=3,
                context_prefixes=("Once upon a time", "I think"), nullspace_threshold=0.05, l2=1.0)
    if cls is not AlphaEditHyperParams:
        base["lam"] = 0.5
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="module")
def cov_store(tmp_path_factory):
    return CovarianceStore(tmp_path_factory.mktemp("cov"), progress=False)


def _session(model, cov_store, hp=None, **kw):
    return EditSession(model, hparams=hp or _hp(), cov_store=cov_store, nullspace_store=NullspaceStore(False),
                       progress=False, **kw)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _equal(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run(cov_store, tmp_path_factory):
    """Three AlphaEdit batches on a tiny model, the weights after each, and a file saved after batch 2."""
    model = make_tiny_model(False, "RMS", True)
    session = _session(model, cov_store)
    states = [_weights(model)]
    path = tmp_path_factory.mktemp("session") / "s.safetensors"
    for b, facts in enumerate(BATCHES, 1):
        session.edit(facts)
        states.append(_weights(model))
        if b == 2:
            session.save(path)
    return model, session, states, path


def test_undo_is_bit_exact_after_any_number_of_batches(run, cov_store):
    model, session, states, _ = run
    prev3 = {h: v.clone() for h, v in session.prev.items()}
    session.undo(to=1)
    assert len(session) == 1 and _equal(states[1], _weights(model))
    session.undo()
    assert len(session) == 0 and _equal(states[0], _weights(model)) and session.prev == {}
    with pytest.raises(ValueError, match="nothing to undo"):
        session.undo()
    # redo the three batches: the same weights and statistics, bit for bit
    for b, facts in enumerate(BATCHES, 1):
        session.edit(facts)
        assert _equal(states[b], _weights(model))
    assert all(torch.equal(prev3[h], session.prev[h]) for h in prev3)
    with pytest.raises(ValueError, match="undo"):
        session.undo(to=4)


def test_resumed_session_equals_uninterrupted(run, cov_store):
    _, _, states, path = run
    fresh = make_tiny_model(False, "RMS", True)
    resumed = EditSession.load(path, fresh, cov_store=cov_store, nullspace_store=NullspaceStore(False), progress=False)
    assert len(resumed) == 2 and _equal(states[2], _weights(fresh))
    resumed.edit(BATCHES[2])
    assert _equal(states[3], _weights(fresh))
    assert [r["batch"] for r in resumed.curves()] == [1, 2, 3]


def test_session_file_for_another_model_is_refused(run, cov_store):
    _, _, _, path = run
    other = make_tiny_model(False, "RMS", True, seed=1)
    with pytest.raises(ValueError, match="another model"):
        EditSession.load(path, other, cov_store=cov_store, progress=False)
    edited = make_tiny_model(False, "RMS", True)
    with torch.no_grad():
        edited.blocks[1].mlp.W_out[0, 0] += 1.0
    with pytest.raises(ValueError, match="unedited"):
        EditSession.load(path, edited, cov_store=cov_store, progress=False)


def test_preserved_keys_unchanged_and_earlier_batches_protected(cov_store):
    """Each batch's ΔW leaves keys with P k = 0 unchanged (to the parameter dtype's rounding), and the
    KpKp term shrinks the change of batch 1's outputs against the same batch 2 without it."""
    model = make_tiny_model(True, "LN", False)
    session = _session(model, cov_store)
    session.edit(BATCHES[0])
    keys1 = session.history[0].keys
    session.edit(BATCHES[1])
    with_prev = session.history[1].deltas
    for name in EDITED:
        hook = name.replace("W_out", "hook_post")
        P = session.projections[hook].P
        evals, evecs = torch.linalg.eigh(P)
        k0 = evecs[:, evals < 0.5]  # P k0 = 0
        X = with_prev[name].double()
        assert (k0.T @ X).abs().max() <= 1e-6 * X.abs().max()
    session.undo()
    session.prev = {}  # the same batch 2 without the KpKp term
    session.edit(BATCHES[1])
    without = session.history[1].deltas
    change = {n: float((keys1[n.replace("W_out", "hook_post")] @ d.double()).norm())
              for d_map in (with_prev,) for n, d in d_map.items()}
    change_without = {n: float((keys1[n.replace("W_out", "hook_post")] @ d.double()).norm()) for n, d in without.items()}
    assert all(change[n] < change_without[n] for n in EDITED)


def _output_at_L(model, facts, L: int) -> torch.Tensor:
    """MEMIT's target site (``hook_resid_post`` of L) at each bare prompt's subject's last token."""
    from pmet_lens.core.tokens import subject_last_position

    rows = []
    for f in facts:
        tokens = model.to_tokens(f["prompt"].format(f["subject"]))
        _, cache = model.run_with_cache(tokens, names_filter=f"blocks.{L}.hook_resid_post")
        rows.append(cache[f"blocks.{L}.hook_resid_post"][0, subject_last_position(model, f["prompt"], f["subject"])])
    return torch.stack(rows).double()  # [facts, d_model]


def test_batch_keys_move_toward_their_targets(cov_store):
    """Each batch moves its requests' output at L toward their target vectors z (AlphaEdit's update
    fits K1 X ≈ R within the null space), for the batch's own keys."""
    model = make_tiny_model(False, "LN", False)
    session = _session(model, cov_store, _hp(l2=0.1))
    for facts in BATCHES[:2]:
        before = _output_at_L(model, facts, 2)
        result = session.edit(facts)
        after = _output_at_L(model, facts, 2)
        z = result.targets["resid_post"].double()
        assert ((z - after).norm(dim=1) < (z - before).norm(dim=1)).all()


def test_repeat_or_contradiction_of_an_earlier_batch_is_an_error(cov_store):
    model = make_tiny_model(False, "RMS", True)
    session = _session(model, cov_store, _hp(MEMITHyperParams))
    session.edit(BATCHES[0])
    before = _weights(model)
    contra = [dict(BATCHES[0][0], target_new="German")]
    with pytest.raises(DataError, match="contradicts batch 1") as err:
        session.edit(contra)
    assert "German" in str(err.value) and "English" in str(err.value)
    with pytest.raises(DataError, match="repeats batch 1"):
        session.edit(BATCHES[0])
    assert _equal(before, _weights(model)) and len(session) == 1
    session.edit(contra, overwrite=True)
    assert len(session) == 2


def test_exception_inside_a_batch_restores_previous_batch(cov_store, monkeypatch):
    from pmet_lens.editing import engine

    model = make_tiny_model(False, "RMS", True)
    session = _session(model, cov_store)
    session.edit(BATCHES[0])
    after1 = _weights(model)

    def boom(*args, **kwargs):
        raise RuntimeError("simulated failure after the weights were written")

    monkeypatch.setattr(engine, "batch_keys", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        session.edit(BATCHES[1])
    assert _equal(after1, _weights(model)) and len(session) == 1


def test_threshold_zero_edits_nothing(cov_store, caplog):
    model = make_tiny_model(False, "RMS", True)
    before = _weights(model)
    with caplog.at_level(logging.WARNING):
        session = _session(model, cov_store, _hp(PMETHyperParams, nullspace=True, nullspace_threshold=0.0))
    assert "empty" in caplog.text and set(session.null_dims.values()) == {0}
    result = session.edit(BATCHES[0])
    assert all(torch.equal(d, torch.zeros_like(d)) for d in result.deltas.values())
    assert _equal(before, _weights(model))


def test_single_mass_edit_with_alphaedit_equals_a_one_batch_session(cov_store):
    """``edit(method="alphaedit")`` is the projected solve with no earlier batches: the same ΔW as a
    session's first batch."""
    from pmet_lens.editing import edit

    model = make_tiny_model(False, "RMS", True)
    hp = _hp()
    result = edit(model, BATCHES[1], hparams=hp, cov_store=cov_store, nullspace_store=NullspaceStore(False),
                  apply=False, progress=False)
    session = _session(model, cov_store, hp)
    first = session.edit(BATCHES[1])
    assert set(result.deltas) == set(EDITED)
    assert all(torch.equal(result.deltas[n], first.deltas[n]) for n in EDITED)
