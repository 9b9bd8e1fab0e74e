"""PMET / MEMIT editors on tiny random models (every block layout and norm)."""

from __future__ import annotations

import warnings

import pytest
import torch

from pmet_lens.data import DataError
from pmet_lens.editing import (CovarianceStore, EditError, EditResult, MEMITHyperParams, PMETHyperParams, edit)
from pmet_lens.editing.covariance import CovarianceStore as _Store
from pmet_lens.editing.update import solve_update, spread

FACT = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English",
        "target_true": "French"}
FACT2 = {"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome", "target_true": "Paris"}
FACT3 = {"subject": "Toko Yasuda", "prompt": "{}, who plays the instrument called the", "target_new": "electric piano",
         "target_true": "guitar"}


def _hp(cls=PMETHyperParams, **kw):
    base = dict(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=8, prefix_len=3, lam=0.5,
                context_prefixes=("Once upon a time", "I think"))
    base.update(kw)
    return cls(**base)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CovarianceStore(tmp_path_factory.mktemp("cov"), progress=False)


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _no_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def _same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


W_OUT = {"blocks.1.mlp.W_out", "blocks.2.mlp.W_out"}


@pytest.mark.parametrize("cls, ablation, edited", [
    (PMETHyperParams, {}, W_OUT),
    (MEMITHyperParams, {}, W_OUT),
    (PMETHyperParams, {"use_attn_delta": False}, W_OUT),  # PMET Table 3 ablations, end to end
    (PMETHyperParams, {"spread": "even"}, W_OUT),
    (PMETHyperParams, {"update_attn": True}, W_OUT | {"blocks.1.attn.W_O", "blocks.2.attn.W_O"}),
], ids=["pmet", "memit", "pmet-no-attn-delta", "pmet-even-spread", "pmet-update-W_O"])
def test_edit_restore_untouched_and_no_hooks(tiny_model, store, cls, ablation, edited):
    before = _snapshot(tiny_model)
    hp = _hp(cls, **ablation)
    result = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    assert _no_hooks(tiny_model)
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
    assert _same(before, _snapshot(tiny_model))
    # context manager: applied inside, restored on exit
    with result:
        assert not torch.equal(before["blocks.2.mlp.W_out"], tiny_model.blocks[2].mlp.W_out)
    assert _same(before, _snapshot(tiny_model))


def test_key_maps_to_target_at_L(tiny_model, store):
    """After the update the last layer's FFN output for the bare prompt is close to v (tiny λ)."""
    hp = _hp(layers=(2,), lam=1e-4)
    result = edit(tiny_model, [FACT], hparams=hp, cov_store=store, progress=False)
    from pmet_lens.core.tokens import encode, subject_last_position

    text = FACT["prompt"].format(FACT["subject"])
    pos = subject_last_position(tiny_model, FACT["prompt"], FACT["subject"])
    _, cache = tiny_model.run_with_cache(torch.tensor([encode(tiny_model, text)]), names_filter="blocks.2.hook_mlp_out")
    got = cache["blocks.2.hook_mlp_out"][0, pos]
    target = result.targets["mlp_out"][0]
    init = got - (got - target)  # noqa: just for readability
    # keys are averaged over prefixes; with one layer the bare prompt's key is close to the mean
    err = (got - target).norm() / target.norm()
    assert err < 0.35, err
    result.restore()


def test_key_maps_exactly_without_prefixes(tiny_model, store):
    hp = _hp(layers=(2,), lam=1e-6, context_prefixes=())
    result = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    from pmet_lens.core.tokens import encode, subject_last_position

    for i, f in enumerate([FACT, FACT2]):
        pos = subject_last_position(tiny_model, f["prompt"], f["subject"])
        _, cache = tiny_model.run_with_cache(torch.tensor([encode(tiny_model, f["prompt"].format(f["subject"]))]),
                                             names_filter="blocks.2.hook_mlp_out")
        got = cache["blocks.2.hook_mlp_out"][0, pos]
        torch.testing.assert_close(got, result.targets["mlp_out"][i], atol=1e-3, rtol=1e-3)
    result.restore()


def test_zero_residual_gives_zero_delta():
    keys = torch.randn(3, 8)
    cov = torch.eye(8)
    delta = solve_update(keys, torch.zeros(3, 5), cov, 10.0)
    assert torch.count_nonzero(delta) == 0
    assert spread(5, 3, "sqrt") == pytest.approx(1 / 3 ** 0.5) and spread(5, 3, "even") == pytest.approx(1 / 3)


def test_as_hooks_equals_weight_edit(tiny_model, store):
    hp = _hp(update_attn=True)
    tokens = torch.tensor([[504, 3164, 11209, 282, 314, 1120, 2344, 2362, 94, 35303, 314]])
    result = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    assert any(k.endswith("W_O") for k in result.deltas)
    with torch.no_grad():
        edited = tiny_model(tokens)
    result.restore()
    before = _snapshot(tiny_model)
    with torch.no_grad(), tiny_model.hooks(fwd_hooks=result.as_hooks()):
        hooked = tiny_model(tokens)
    assert _no_hooks(tiny_model) and _same(before, _snapshot(tiny_model))
    torch.testing.assert_close(hooked, edited, atol=1e-4, rtol=1e-4)


def test_delta_norms_are_frobenius_norms_of_the_deltas(tiny_model, store):
    result = edit(tiny_model, [FACT], hparams=_hp(update_attn=True), cov_store=store, progress=False, apply=False)
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


def test_block_index():
    from pmet_lens.core.arch import block_index

    assert block_index("blocks.12.mlp.W_out") == 12 and block_index("blocks.0.hook_mlp_out") == 0
    for bad in ("embed.W_E", "blocks.x.mlp.W_out", "blocks.3"):
        with pytest.raises(ValueError, match="not a block hook or parameter name"):
            block_index(bad)


def test_apply_false_and_save_load(tiny_model, store, tmp_path):
    before = _snapshot(tiny_model)
    result = edit(tiny_model, [FACT], hparams=_hp(), cov_store=store, progress=False, apply=False)
    assert _same(before, _snapshot(tiny_model)) and not result.applied
    path = result.save(tmp_path / "edit.safetensors")
    loaded = EditResult.load(path, tiny_model)
    for k in result.deltas:
        assert torch.equal(loaded.deltas[k], result.deltas[k])
    assert loaded.facts[0].subject == FACT["subject"] and loaded.hparams == result.hparams
    with loaded:
        with pytest.raises(ValueError, match="different model"):
            EditResult.load(path, tiny_model)  # an applied edit changes the identity
    assert _same(before, _snapshot(tiny_model))
    other = tiny_model.__class__(tiny_model.cfg, tokenizer=tiny_model.tokenizer)
    with pytest.raises(ValueError, match="different model"):
        EditResult.load(path, other)


BAD = [
    ({**FACT, "prompt": "The mother tongue of X is"}, DataError),          # no {} -> subject not in prompt
    ({**FACT, "target_new": "   "}, DataError),
    ({**FACT, "target_new": ""}, DataError),
    ({**FACT, "target_new": "French"}, DataError),                         # equals the true target
]


@pytest.mark.parametrize("bad,exc", BAD)
def test_bad_input_raises_before_weights_change(tiny_model, store, bad, exc):
    before = _snapshot(tiny_model)
    with pytest.raises(exc):
        edit(tiny_model, [FACT2, bad], hparams=_hp(), cov_store=store, progress=False)
    assert _same(before, _snapshot(tiny_model)) and _no_hooks(tiny_model)


def test_conflicts_layers_and_nan(tiny_model, store, monkeypatch):
    before = _snapshot(tiny_model)
    with pytest.raises(DataError, match="conflicting"):
        edit(tiny_model, [FACT, {**FACT, "target_new": "German"}], hparams=_hp(), cov_store=store, progress=False)
    with pytest.raises(ValueError, match="out of range"):
        edit(tiny_model, [FACT], hparams=_hp(layers=(2, 9)), cov_store=store, progress=False)
    with pytest.raises(DataError, match="empty"):
        edit(tiny_model, [], hparams=_hp(), cov_store=store, progress=False)
    # NaN in the solve (after the first layer was written): everything is rolled back
    import pmet_lens.editing.update as upd

    calls = {"n": 0}
    real = upd.solve_update

    def flaky(keys, resid, cov, lam):
        calls["n"] += 1
        if calls["n"] == 2:
            return real(keys, resid * float("nan"), cov, lam)
        return real(keys, resid, cov, lam)

    monkeypatch.setattr(upd, "solve_update", flaky)
    with pytest.raises(EditError):
        edit(tiny_model, [FACT], hparams=_hp(), cov_store=store, progress=False)
    monkeypatch.undo()
    # NaN during the optimisation
    import pmet_lens.editing.targets as tg

    real_lp = tg._final_logprobs
    monkeypatch.setattr(tg, "_final_logprobs", lambda model, resid: real_lp(model, resid) * float("nan"))
    with pytest.raises(EditError, match="NaN"):
        edit(tiny_model, [FACT], hparams=_hp(), cov_store=store, progress=False)
    monkeypatch.undo()
    assert _same(before, _snapshot(tiny_model)) and _no_hooks(tiny_model)


def test_hparams_validation():
    with pytest.raises(ValueError):
        PMETHyperParams(layers=(3, 2))
    with pytest.raises(ValueError):
        PMETHyperParams(lam=-1)
    with pytest.raises(ValueError):
        PMETHyperParams(use_attn_delta=False, update_attn=True)
    with pytest.raises(ValueError):
        MEMITHyperParams(spread="cubic")
    assert PMETHyperParams(layers=[1, 2]).layers == (1, 2)


def test_covariance_cache_corrupt_rebuilt(tiny_model, tmp_path, caplog):
    store = _Store(tmp_path, progress=False)
    hook = "blocks.1.mlp.hook_post"
    c1 = store.get(tiny_model, [hook], 500, "float32", 64)[hook]
    path = store.path_for(tiny_model, hook, 500, "float32", 64)
    assert path.is_file() and torch.allclose(c1, c1.T)
    path.write_bytes(path.read_bytes()[:50])  # truncate
    fresh = _Store(tmp_path, progress=False)
    with caplog.at_level("WARNING"):
        c2 = fresh.get(tiny_model, [hook], 500, "float32", 64)[hook]
    assert "corrupt" in caplog.text
    torch.testing.assert_close(c1, c2)
    assert _Store(tmp_path, progress=False)._read(path.stem) is not None  # rebuilt file is valid


def test_preset_lookup_is_by_exact_name():
    from pmet_lens.editing import preset

    assert preset("EleutherAI/gpt-j-6B", "pmet").layers == (3, 4, 5, 6, 7, 8)   # hub name -> cfg.model_name
    assert preset("GPT-J-6B", "memit").lam == 15000.0
    assert preset("gpt-neox-20b", "memit").layers == (6, 7, 8, 9, 10)
    smol = preset("SmolLM2-135M-Instruct", "pmet")
    assert isinstance(smol, PMETHyperParams) and smol.layers == (3, 4, 5, 6, 7)
    # no substring guessing: a name that merely contains "gpt-j" or "neox" has no preset and no R
    for name in ("my-gpt-j-finetune", "pythia-neox-70m", "gpt2"):
        with pytest.raises(ValueError, match="no critical layers R are known"):
            preset(name, "pmet")
    with pytest.raises(ValueError, match="method must be"):
        preset("gpt-j-6B", "rome")


def test_suffix_run_equals_full_forward(tiny_model):
    """The target loop recomputes only positions >= each row's lookup position (frozen keys and
    values before it, left-padded with a mask): outputs there equal the full forward's, with a δ."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing.targets import _rows, _Suffix

    facts = as_facts([FACT, FACT2])
    rows = _rows(tiny_model, facts, ("Once upon a time there was", "I"))
    L, n = 1, tiny_model.cfg.n_layers
    delta = torch.randn(len(rows.fact), tiny_model.cfg.d_model)
    ar = torch.arange(len(rows.fact))
    with torch.no_grad():
        resid_L = tiny_model(rows.tokens, stop_at_layer=L)
        kv = {}
        names = [f"blocks.{j}.attn.hook_{c}" for j in range(L, n) for c in "kv"]
        with tiny_model.hooks(fwd_hooks=[(h, lambda a, hook: kv.__setitem__(hook.name, a.detach())) for h in names]):
            tiny_model(resid_L, start_at_layer=L, stop_at_layer=n)
        suffix = _Suffix.build(resid_L, kv, rows, L, n)
        assert len(set(rows.lookup.tolist())) > 1  # rows really differ in their cut
        add_full = lambda a, hook: a.index_put((ar, rows.lookup), delta, accumulate=True)
        add_suffix = lambda a, hook: a.index_put((ar, torch.zeros_like(ar)), delta, accumulate=True)
        with tiny_model.hooks(fwd_hooks=[(f"blocks.{L}.hook_mlp_out", add_full)]):
            full = tiny_model(resid_L, start_at_layer=L, stop_at_layer=n)
        with tiny_model.hooks(fwd_hooks=[(f"blocks.{L}.hook_mlp_out", add_suffix)]):
            part = suffix.run(tiny_model, ar)
    for r in range(len(ar)):
        lo, hi = int(rows.lookup[r]), int(rows.lengths[r])
        torch.testing.assert_close(part[r, : hi - lo], full[r, lo:hi], rtol=1e-5, atol=1e-5)
    assert _no_hooks(tiny_model)


def test_reused_targets_give_the_same_edit(tiny_model, store):
    """edit(targets=earlier.targets) skips the optimisation and reproduces the edit exactly; the
    spread / W_O ablations can reuse PMET's targets; bad targets raise before weights change."""
    hp = _hp()
    first = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False, apply=False)
    assert set(first.targets) == {"attn_out", "mlp_out"}
    again = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False, apply=False,
                 targets=first.targets)
    assert again.stats == {"targets": "given"}
    assert all(torch.equal(first.deltas[k], again.deltas[k]) for k in first.deltas)
    sliced = edit(tiny_model, [FACT], hparams=hp.with_(update_attn=True, spread="even"), cov_store=store,
                  progress=False, apply=False, targets={k: v[:1] for k, v in first.targets.items()})
    assert any(k.endswith("W_O") for k in sliced.deltas)
    before = _snapshot(tiny_model)
    with pytest.raises(ValueError, match="expected"):
        edit(tiny_model, [FACT], hparams=hp, cov_store=store, progress=False, targets=first.targets)
    with pytest.raises(ValueError, match="lack the site"):
        edit(tiny_model, [FACT, FACT2], hparams=_hp(MEMITHyperParams), cov_store=store,
             progress=False, targets=first.targets)
    assert _same(before, _snapshot(tiny_model)) and _no_hooks(tiny_model)


@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams])
def test_update_only_fields_do_not_change_the_targets(tiny_model, cls):
    """``target_settings()`` leaves out λ, C's corpus settings and the spread (and PMET's W_O switch):
    changing all of them at once gives bit-identical targets, so saved targets may be reused."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing.targets import optimise_targets

    hp = _hp(cls, steps=4)
    changes = {"lam": 7.0, "cov_tokens": 900, "cov_seq_len": 32, "cov_dtype": "float64",
               "spread": "sqrt" if hp.spread == "even" else "even",
               "nullspace": True, "nullspace_threshold": 0.5, "l2": 3.0}
    if cls is PMETHyperParams:
        changes["update_attn"] = True
    assert set(changes) == cls.update_only_fields
    other = hp.with_(**changes)
    assert other.target_settings() == hp.target_settings() and other.to_dict() != hp.to_dict()
    assert hp.with_(steps=5).target_settings() != hp.target_settings()
    facts = as_facts([FACT, FACT2])
    a = optimise_targets(tiny_model, facts, hp, hp.context_prefixes)
    b = optimise_targets(tiny_model, facts, other, other.context_prefixes)
    assert all(torch.equal(a.delta[s], b.delta[s]) for s in a.delta) and torch.equal(a.steps, b.steps)


def test_targets_do_not_depend_on_chunking(tiny_model):
    """Facts are grouped into chunks by suffix length, yet each fact keeps the targets it gets when
    optimised alone, returned in input order."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing.targets import _suffix_length, optimise_targets

    facts = as_facts([FACT3, FACT, FACT2])
    lengths = [_suffix_length(tiny_model, f) for f in facts]
    assert lengths != sorted(lengths)  # the grouping really reorders these facts
    hp = _hp(steps=4, batch_size=2)
    grouped = optimise_targets(tiny_model, facts, hp, hp.context_prefixes)
    for i, fact in enumerate(facts):
        alone = optimise_targets(tiny_model, [fact], hp, hp.context_prefixes)
        for site in alone.delta:
            torch.testing.assert_close(grouped.init[site][i], alone.init[site][0], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grouped.delta[site][i], alone.delta[site][0], rtol=1e-4, atol=1e-4)
        assert grouped.steps[i] == alone.steps[0]


@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams])
def test_compiled_blocks_give_the_eager_targets(tiny_model, cls):
    """``compile=True`` runs the blocks after L through torch.compile: same targets up to float
    rounding, same stopping steps, the model's blocks untouched and no hook left behind."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing.targets import optimise_targets

    facts = as_facts([FACT, FACT2, FACT3])
    hp = _hp(cls, steps=5, batch_size=2)
    blocks = list(tiny_model.blocks)
    eager = optimise_targets(tiny_model, facts, hp, hp.context_prefixes)
    compiled = optimise_targets(tiny_model, facts, hp, hp.context_prefixes, compile=True)
    assert list(tiny_model.blocks) == blocks and _no_hooks(tiny_model)
    assert torch.equal(eager.steps, compiled.steps)
    for site in eager.delta:
        torch.testing.assert_close(compiled.init[site], eager.init[site])
        torch.testing.assert_close(compiled.delta[site], eager.delta[site], rtol=1e-3, atol=1e-4)


def test_compile_without_a_compiler_raises_before_weights_change(tiny_model, store, monkeypatch):
    import shutil

    monkeypatch.setattr(shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    before = _snapshot(tiny_model)
    with pytest.raises(EditError, match="needs a C\\+\\+ compiler"):
        edit(tiny_model, [FACT], hparams=_hp(), cov_store=store, progress=False, compile=True)
    assert _same(before, _snapshot(tiny_model)) and _no_hooks(tiny_model)


def test_edit_works_with_grad_disabled(tiny_model, store):
    """TransformerLens notebooks often start with torch.set_grad_enabled(False): the target
    optimisation turns grad on for itself, and the caller's grad mode is left as it was."""
    hp = _hp(steps=3)
    with torch.no_grad():
        r = edit(tiny_model, [FACT], hparams=hp, cov_store=store, progress=False, apply=False)
        assert not torch.is_grad_enabled()
    assert r.stats["steps"][0] >= 1 and all(torch.isfinite(d).all() for d in r.deltas.values())


def test_one_pass_hashes_equal_separate_hashes(tiny_model):
    """weights_hashes reads the weights once; each hash equals one computed on its own."""
    import hashlib

    from pmet_lens.editing.identity import weights_hash, weights_hashes

    def reference(upto):
        digest = hashlib.blake2b(digest_size=16)
        for name, p in tiny_model.named_parameters():
            if upto is not None and name.startswith("blocks.") and int(name.split(".")[1]) > upto:
                continue
            if upto is not None and not name.startswith(("blocks.", "embed.", "pos_embed.")):
                continue
            t = p.detach().contiguous()
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    layers = list(range(tiny_model.cfg.n_layers))
    full, partial = weights_hashes(tiny_model, layers)
    assert full == reference(None) == weights_hash(tiny_model)
    assert partial == {l: reference(l) for l in layers}
    assert len(set(partial.values())) == len(layers)


def test_cached_prefix_sampling_equals_uncached_loop(tiny_model):
    """context_prefixes decodes with a key-value cache; the draws are those of full forwards."""
    from pmet_lens.editing import context_prefixes
    from pmet_lens.core.tokens import encode

    hp = _hp(context_prefixes=None, prefix_len=6, prefix_starts=("The", "Because"), prefixes_per_start=2, seed=3)
    gen = torch.Generator().manual_seed(hp.seed)
    expected = []
    with torch.no_grad():
        for start in hp.prefix_starts:
            for _ in range(hp.prefixes_per_start):
                ids = encode(tiny_model, start)
                for _ in range(hp.prefix_len):
                    logits = tiny_model(torch.tensor([ids]))[0, -1]
                    top = torch.topk(logits.float(), k=5)
                    ids.append(int(top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]))
                text = tiny_model.tokenizer.decode(ids, skip_special_tokens=True)
                expected.append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() or start)
    assert context_prefixes(tiny_model, hp) == tuple(expected)
    assert len(set(expected)) > 1


def test_restore_out_of_order_raises(tiny_model, store):
    before = _snapshot(tiny_model)
    first = edit(tiny_model, [FACT], hparams=_hp(), cov_store=store, progress=False)
    second = edit(tiny_model, [FACT2], hparams=_hp(), cov_store=store, progress=False)
    with pytest.raises(RuntimeError, match="opposite order"):
        first.restore()  # would bring back weights from before `second`, keeping neither edit
    assert first.applied
    second.restore()
    first.restore()
    assert _same(before, _snapshot(tiny_model))
    # force=True writes the originals back anyway (here: the unedited weights)
    first.apply()
    second.apply()
    first.restore(force=True)
    assert _same(before, _snapshot(tiny_model)) and not first.applied
    with pytest.raises(RuntimeError, match="changed after this edit was applied"):
        second.restore()
    second.restore(force=True)  # its originals hold the first edit: put the unedited weights back by hand
    tiny_model.load_state_dict(before)
    assert _same(before, _snapshot(tiny_model))


def test_covariance_corpus_inputs(tiny_model, tmp_path):
    import datasets

    hook = "blocks.1.mlp.hook_post"
    texts = ["The Eiffel Tower is in Paris. " * 40, "Danielle Darrieux was a French actress. " * 40]
    from_texts = _Store(False, corpus=texts, progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    records = [{"text": t, "id": i} for i, t in enumerate(texts)]
    from_records = _Store(False, corpus=records, progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    dataset = datasets.Dataset.from_list(records)
    from_dataset = _Store(False, corpus=dataset, progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    file = tmp_path / "corpus.txt"
    file.write_text("\n".join(texts))
    from_file = _Store(False, corpus=str(file), progress=False).get(tiny_model, [hook], 300, "float32", 64)[hook]
    assert torch.equal(from_texts, from_records) and torch.equal(from_texts, from_dataset)
    assert torch.equal(from_texts, from_file)  # paragraphs are tokenised one by one either way
    with pytest.raises(FileNotFoundError, match="does not exist"):
        _Store(False, corpus=str(tmp_path / "typo.txt"))
    with pytest.raises(ValueError, match="no 'text' field"):
        _Store(False, corpus=[{"body": "x"}])
    assert _Store(False, corpus=[{"body": texts[0]}], text_field="body").corpus_hash
    with pytest.raises(TypeError, match="expected a text"):
        _Store(False, corpus=[3])
    with pytest.raises(ValueError, match="has .* tokens but C needs 100000"):
        _Store(False, corpus=texts, progress=False).get(tiny_model, [hook], 100_000, "float32", 64)


def test_covariance_key_names_every_input(tiny_model, tmp_path):
    from conftest import TINY_VARIANTS, make_tiny_model

    hook = "blocks.1.mlp.hook_post"
    store = _Store(tmp_path, progress=False)
    key = store.path_for(tiny_model, hook, 500, "float32", 64).stem
    other_corpus = _Store(tmp_path, corpus=["Another text entirely. " * 50], progress=False)
    variants = [store.path_for(tiny_model, hook, 600, "float32", 64), store.path_for(tiny_model, hook, 500, "float64", 64),
                store.path_for(tiny_model, hook, 500, "float32", 128), store.path_for(tiny_model, "blocks.2.mlp.hook_post", 500, "float32", 64),
                other_corpus.path_for(tiny_model, hook, 500, "float32", 64)]
    assert len({key, *(p.stem for p in variants)}) == 6
    other_weights = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"], seed=1)
    assert store.path_for(other_weights, hook, 500, "float32", 64).stem.split("_m")[1][:16] != key.split("_m")[1][:16]
    with torch.no_grad():  # a change below the layer changes the key; the tokenizer is part of it too
        saved = tiny_model.blocks[0].mlp.W_out.clone()
        tiny_model.blocks[0].mlp.W_out.add_(1.0)
        try:
            assert store.path_for(tiny_model, hook, 500, "float32", 64).stem != key
        finally:
            tiny_model.blocks[0].mlp.W_out.copy_(saved)
    assert store.path_for(tiny_model, hook, 500, "float32", 64).stem == key
    assert f"_t{store._tokenizer_hash(tiny_model)}_" in key
    # calls that set the tokenizer's padding / truncation do not change its hash
    tiny_model.tokenizer(["a", "a longer text"], padding=True, truncation=True, max_length=4)
    assert _Store(tmp_path, progress=False).path_for(tiny_model, hook, 500, "float32", 64).stem == key
