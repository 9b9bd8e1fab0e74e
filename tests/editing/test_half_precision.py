"""Editing in bfloat16 / float16 (issue 34): every method, sessions, saved edits and undo on tiny models
in half precision (sequential and parallel blocks); the recorded deltas are the change applied; the
target optimisation keeps its state in float32 and reads the host every few steps with the same
result; the weight fingerprint works beyond 2^24 entries. A slow test edits the default model in bf16."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, FACT3, hp_, same, snapshot

from conftest import TINY_VARIANTS, make_tiny_model
from pmet_lens.editing import AlphaEditHyperParams, CovarianceStore, EditResult, MEMITHyperParams, edit
from pmet_lens.editing.hparams import settings_for
from pmet_lens.editing.identity import sample_indices
from pmet_lens.editing.nullspace import NullspaceStore
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.result import _fingerprint
from pmet_lens.editing.session import EditSession
from pmet_lens.editing.targets import _optimise_chunk, optimise_targets
from pmet_lens.editing.validate import validate_requests

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
VARIANTS = ["seq-rms-gated", "par-ln"]
BATCHES = [[FACT], [FACT2, FACT3], [{"subject": "Barack Obama", "prompt": "{} was born in", "target_new": "Tokyo"}]]


def half_model(variant: str, dtype: torch.dtype):
    model = make_tiny_model(*TINY_VARIANTS[variant])
    model.to(dtype)
    assert model.cfg.dtype == dtype and all(p.dtype == dtype for p in model.parameters())
    return model


@pytest.fixture(scope="module", params=[(v, d) for v in VARIANTS for d in DTYPES], ids=lambda p: f"{p[0]}-{p[1]}")
def half(request, tmp_path_factory):
    variant, dtype = request.param
    return variant, half_model(variant, DTYPES[dtype]), CovarianceStore(tmp_path_factory.mktemp("cov"), progress=False)


def _hparams(method: str):
    if method == "alphaedit":
        return hp_(AlphaEditHyperParams, nullspace_threshold=0.05, l2=1.0)
    return hp_(MEMITHyperParams) if method == "memit" else hp_()


# ------------------------------------------------------------------------------- fingerprint
def test_fingerprint_beyond_2_24_entries():
    """A float32 linspace rounds the last index of a > 2^24-entry weight up to numel (GPT-J's and
    Llama-3-8B's W_out): the fingerprint's integer indices stay in range and evenly spaced."""
    numel = 4096 * 4097  # 16,781,312 > 2^24 = 16,777,216
    assert int(torch.linspace(0, numel - 1, 4096).long()[-1]) >= numel  # the old indices: out of range
    weight = (torch.arange(numel, dtype=torch.int32) % 30011).to(torch.int16).view(4096, 4097)
    fp = _fingerprint(weight)
    idx = sample_indices(numel, 4096)
    assert idx[0] == 0 and idx[-1] == numel - 1 and bool((idx[1:] > idx[:-1]).all())
    assert torch.equal(fp, (idx % 30011).to(torch.int16))
    column_major = weight.T.contiguous().T  # the fast path's layout: same values, same fingerprint
    assert torch.equal(_fingerprint(column_major), fp)


@pytest.mark.parametrize("numel", [1, 2, 4095, 4096, 4097, 2**24 + 1, 67_108_864, 2**40 + 7])
def test_sample_indices_are_exact(numel):
    idx = sample_indices(numel, 4096)
    m = min(numel, 4096)
    assert len(idx) == m and int(idx[0]) == 0 and int(idx[-1]) == numel - 1
    assert bool((idx[1:] > idx[:-1]).all()) and int(idx.max()) < numel


# ---------------------------------------------------------------------------------- editing
@pytest.mark.parametrize("method", ["pmet", "memit", "alphaedit"])
def test_edit_in_half_precision(half, method, tmp_path):
    """Every method on a bf16 / fp16 model: the weights keep their dtype, each delta is the change
    applied (float32, exactly new − old), restore, re-apply and a saved edit reproduce the weights bit
    for bit, the preview hooks give the edited outputs."""
    variant, model, store = half
    dtype = model.cfg.dtype
    before = snapshot(model)
    result = edit(model, [FACT, FACT2], hparams=_hparams(method), cov_store=store,
                  nullspace_store=NullspaceStore(False), progress=False)
    after = snapshot(model)
    assert all(torch.isfinite(v).all() and v.dtype == torch.float32 for v in result.targets.values())
    for name, d in result.deltas.items():
        assert d.dtype == torch.float32 and after[name].dtype == dtype
        assert torch.equal(d, after[name].float() - before[name].float())
        assert bool((d != 0).any())
    tokens = torch.tensor([[504, 3164, 11209, 282, 314, 1120, 2344, 2362, 94, 35303, 314]])
    with torch.no_grad():
        edited = model(tokens).float()
    result.restore()
    assert same(before, snapshot(model))
    result.apply()
    assert same(after, snapshot(model))
    result.restore()
    with torch.no_grad(), model.hooks(fwd_hooks=result.as_hooks()):
        hooked = model(tokens).float()
    torch.testing.assert_close(hooked, edited, atol=0.25, rtol=0.05)  # half-precision rounding of the activations
    path = result.save(tmp_path / "edit.safetensors")
    loaded = EditResult.load(path, model, apply=True)
    assert same(after, snapshot(model))
    loaded.restore()
    assert same(before, snapshot(model))
    with pytest.raises(ValueError, match=f"{str(dtype)[6:]}.*float32"):
        EditResult.load(path, make_tiny_model(*TINY_VARIANTS[variant]))  # the float32 model it came from


def test_session_in_half_precision(half, tmp_path):
    """A 3-batch AlphaEdit session in bf16 / fp16: each batch's deltas are its change, undo and a
    resumed session replay every intermediate state bit for bit; a float32 model is refused."""
    variant, model, store = half
    hp = _hparams("alphaedit")
    states = [snapshot(model)]
    session = EditSession(model, hparams=hp, cov_store=store, nullspace_store=NullspaceStore(False), progress=False)
    for facts in BATCHES:
        session.edit(facts)
        states.append(snapshot(model))
    for b, record in enumerate(session.history):
        for name, d in record.deltas.items():
            assert d.dtype == torch.float32
            assert torch.equal(d, states[b + 1][name].float() - states[b][name].float())
    path = session.save(tmp_path / "session.safetensors")
    session.undo()
    assert same(states[2], snapshot(model))
    session.undo(to=0)
    assert same(states[0], snapshot(model))
    resumed = EditSession.load(path, model, cov_store=store, nullspace_store=NullspaceStore(False), progress=False)
    assert same(states[3], snapshot(model))
    resumed.undo(to=1)
    assert same(states[1], snapshot(model))
    resumed.undo(to=0)
    assert same(states[0], snapshot(model))
    with pytest.raises(ValueError, match="float32"):
        EditSession.load(path, make_tiny_model(*TINY_VARIANTS[variant]), cov_store=store,
                         nullspace_store=NullspaceStore(False), progress=False)


def test_targets_and_their_state_are_float32(half):
    """δ, the initial outputs and their norms are float32 in a half-precision model (fp16's Adam
    second moment would underflow), fp16's backward pass is loss-scaled (the tiny model's gradients,
    ~1e-8, underflow in float16 without it); δ and the losses follow the float32 model's."""
    variant, model, _ = half
    hp = hp_(steps=3)
    twin = make_tiny_model(*TINY_VARIANTS[variant])  # the same weights in float32
    targets, ref = (optimise_targets(m, prepare_requests(m, validate_requests(m, [FACT, FACT2], hp),
                                                         hp.context_prefixes), hp) for m in (model, twin))
    for site in targets.delta:
        assert targets.delta[site].dtype == targets.init[site].dtype == torch.float32
        assert torch.isfinite(targets.value(site)).all()
        cos = float(torch.nn.functional.cosine_similarity(targets.delta[site].flatten(), ref.delta[site].flatten(), dim=0))
        assert ref.delta[site].norm() > 0 and cos > 0.95, cos  # bf16: ~0.97-0.98 (Adam's first steps follow gradient signs)
    assert torch.isfinite(targets.loss).all() and bool((targets.prob > 0).all())
    torch.testing.assert_close(targets.loss, ref.loss, rtol=0.05, atol=0)


# ------------------------------------------------------------------------ host reads of the loop
@pytest.mark.parametrize("every", [2, 3, 5])
def test_reading_the_host_every_few_steps_keeps_each_facts_updates(every):
    """Facts stop at different steps; reading the loop's state only every ``every`` steps masks a
    stopped fact until the next read, so every fact takes the same steps and ends with the same δ
    as with a read at every step (equal up to the rounding of the batch's other rows)."""
    model = make_tiny_model(False, "RMS", True)
    hp = hp_(steps=12, loss_stop=11.2, batch_size=8, lr=0.5, clamp_norm_factor=20.0, kl_factor=0.0, weight_decay=0.0)
    requests = prepare_requests(model, validate_requests(model, [FACT, FACT2, FACT3], hp), hp.context_prefixes)
    settings = settings_for(hp)
    each = _optimise_chunk(model, requests, hp, settings, check_every=1)
    few = _optimise_chunk(model, requests, hp, settings, check_every=every)
    assert len(set(each.steps.tolist())) > 1  # the facts do stop at different steps
    assert torch.equal(each.steps, few.steps)
    for site in each.delta:
        torch.testing.assert_close(few.delta[site], each.delta[site], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(few.loss, each.loss, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- real model
@pytest.mark.slow
def test_default_model_in_bf16_edits_like_float32(default_model, tmp_path):
    """The default model in bfloat16 edits 4 CounterFact facts with the efficacy of float32."""
    from pmet_lens import load_model
    from pmet_lens.data import load_counterfact
    from pmet_lens.editing import preset
    from pmet_lens.evaluation.scoring import score_continuations

    records = load_counterfact(limit=4)
    hp = preset(str(default_model.cfg.model_name), "pmet")
    model = load_model(dtype=torch.bfloat16, device="cpu")
    rates = {}
    for name, m in (("fp32", default_model), ("bf16", model)):
        with edit(m, records, hparams=hp, progress=False):
            new = score_continuations(m, [r.text for r in records], [r.target_new for r in records]).mean_logprob
            true = score_continuations(m, [r.text for r in records], [r.target_true for r in records]).mean_logprob
        rates[name] = float((new > true).float().mean())
    assert rates["fp32"] >= 0.75 and rates["bf16"] >= rates["fp32"] - 0.25, rates
