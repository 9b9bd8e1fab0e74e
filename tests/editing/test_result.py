"""EditResult: hooks, norms, save / load, restore order."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, hp_, new_store, no_hooks, same, snapshot

from pmet_lens.editing import EditResult, edit


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return new_store(tmp_path_factory)



def test_as_hooks_equals_weight_edit(tiny_model, store):
    hp = hp_(update_attn=True)
    tokens = torch.tensor([[504, 3164, 11209, 282, 314, 1120, 2344, 2362, 94, 35303, 314]])
    result = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    assert any(k.endswith("W_O") for k in result.deltas)
    with torch.no_grad():
        edited = tiny_model(tokens)
    result.restore()
    before = snapshot(tiny_model)
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=result.as_hooks()):
        hooked = tiny_model(tokens)
    assert no_hooks(tiny_model) and same(before, snapshot(tiny_model))
    torch.testing.assert_close(hooked, edited, atol=1e-4, rtol=1e-4)


def test_delta_norms_are_frobenius_norms_of_the_deltas(tiny_model, store):
    result = edit(tiny_model, [FACT], hparams=hp_(update_attn=True), cov_store=store, progress=False, apply=False)
    rows = result.delta_norms()
    assert len(rows) == len(result.deltas)
    for row, (name, delta) in zip(rows, result.deltas.items()):
        weight = dict(tiny_model.named_parameters())[name]  # not applied: the unedited weight
        assert name == f"blocks.{row['layer']}.{'attn' if row['weight'] == 'W_O' else 'mlp'}.{row['weight']}"
        assert row["delta_norm"] == pytest.approx(torch.sqrt((delta.double() ** 2).sum()).item(), rel=1e-5)
        assert row["relative"] == pytest.approx(row["delta_norm"] / torch.sqrt((weight.double() ** 2).sum()).item(), rel=1e-5)
    with result:  # applied: still relative to the unedited weight
        applied = result.delta_norms()
    assert [r["relative"] for r in applied] == pytest.approx([r["relative"] for r in rows], rel=1e-6)


def test_apply_false_and_save_load(tiny_model, store, tmp_path):
    before = snapshot(tiny_model)
    result = edit(tiny_model, [FACT], hparams=hp_(), cov_store=store, progress=False, apply=False)
    assert same(before, snapshot(tiny_model)) and not result.applied
    path = result.save(tmp_path / "edit.safetensors")
    loaded = EditResult.load(path, tiny_model)
    for k in result.deltas:
        assert torch.equal(loaded.deltas[k], result.deltas[k])
    assert loaded.facts[0].subject == FACT["subject"] and loaded.hparams == result.hparams
    with loaded:
        with pytest.raises(ValueError, match="different model"):
            EditResult.load(path, tiny_model)  # an applied edit changes the identity
    assert same(before, snapshot(tiny_model))
    other = tiny_model.__class__(tiny_model.cfg, tokenizer=tiny_model.tokenizer)
    with pytest.raises(ValueError, match="different model"):
        EditResult.load(path, other)


def test_restore_out_of_order_raises(tiny_model, store):
    before = snapshot(tiny_model)
    first = edit(tiny_model, [FACT], hparams=hp_(), cov_store=store, progress=False)
    second = edit(tiny_model, [FACT2], hparams=hp_(), cov_store=store, progress=False)
    with pytest.raises(RuntimeError, match="opposite order"):
        first.restore()  # would bring back weights from before `second`, keeping neither edit
    assert first.applied
    second.restore()
    first.restore()
    assert same(before, snapshot(tiny_model))
    # force=True writes the originals back anyway (here: the unedited weights)
    first.apply()
    second.apply()
    first.restore(force=True)
    assert same(before, snapshot(tiny_model)) and not first.applied
    with pytest.raises(RuntimeError, match="changed after this edit was applied"):
        second.restore()
    second.restore(force=True)  # its originals hold the first edit: put the unedited weights back by hand
    tiny_model.load_state_dict(before)
    assert same(before, snapshot(tiny_model))


def test_load_of_a_truncated_file_raises_a_clear_error(tiny_model, store, tmp_path):
    from pmet_lens.editing import EditError

    result = edit(tiny_model, [FACT], hparams=hp_(steps=2), cov_store=store, progress=False, apply=False)
    path = result.save(tmp_path / "edit.safetensors")
    data = path.read_bytes()
    before = snapshot(tiny_model)
    for cut in (len(data) // 2, 40, 3):
        broken = tmp_path / f"cut{cut}.safetensors"
        broken.write_bytes(data[:cut])
        with pytest.raises(EditError, match="truncated or corrupt"):
            EditResult.load(broken, tiny_model, apply=True)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        EditResult.load(tmp_path / "missing.safetensors", tiny_model)
    assert same(before, snapshot(tiny_model))
    assert EditResult.load(path, tiny_model).deltas.keys() == result.deltas.keys()  # the intact file still loads
