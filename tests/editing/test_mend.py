"""MEND (pmet_lens.editing.mend, mend_training) on tiny random models: the update against the gradient
decomposition computed independently (TransformerLens hooks, autograd), batched edits, undo, files,
errors, and the training loop (loss falls, resume equals an uninterrupted run)."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, FACT3, no_hooks, same, snapshot

from conftest import make_tiny_model
from pmet_lens.data import DataError, Fact, load_counterfact
from pmet_lens.editing import edit, preset
from pmet_lens.editing.hparams import MENDHyperParams, hparams_from_dict
from pmet_lens.editing.mend import MENDNetwork, find_network, load_network, mend_deltas, save_network
from pmet_lens.editing.mend_training import (
    MENDTrainingParams,
    counterfact_examples,
    evaluate_network,
    prepare_edits,
    train_mend,
)
from pmet_lens.editing.session import EditSession
from pmet_lens.editing.validate import EditError

LAYERS = (1, 2, 3)
SHORT = {"subject": "Paris", "prompt": "{} is in", "target_new": "Rome"}  # few token rows: the rank bound bites


def _trained_like(model, seed: int = 1) -> MENDNetwork:
    """A network with every parameter and statistic random (as if trained), so g is far from the identity."""
    net = MENDNetwork(model.cfg.d_mlp, model.cfg.d_model, LAYERS, rank=6, n_hidden=1, seed=seed)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g) + (1.0 if name.endswith("scale") else 0.0))
        net.alpha.copy_(torch.tensor([0.02, -0.01, 0.03]))
        net.key_mean.copy_(0.1 * torch.randn(net.key_mean.shape, generator=g))
        net.key_std.copy_(0.5 + torch.rand(net.key_std.shape, generator=g))
        net.grad_mean.copy_(0.01 * torch.randn(net.grad_mean.shape, generator=g))
        net.grad_std.copy_(0.05 + 0.1 * torch.rand(net.grad_std.shape, generator=g))
    return net.eval()


def _independent_factors(model, facts):
    """Per fact: u at ``mlp.hook_post`` and δ = ∂L/∂(hook_mlp_out) from TransformerLens forward and
    backward hooks on a full forward of p(s) ⊕ o*[:-1] alone (L = mean NLL of o*'s tokens), real tokens
    only, and W_out's autograd gradient; summed over facts."""
    tok = model.tokenizer
    keys = {l: [] for l in LAYERS}
    grads = {l: [] for l in LAYERS}
    w_grad = {l: torch.zeros_like(model.blocks[l].mlp.W_out) for l in LAYERS}
    for f in facts:
        prompt = tok(f["prompt"].format(f["subject"]), add_special_tokens=False)["input_ids"]
        target = tok(" " + f["target_new"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([prompt + target[:-1]])
        seen_k, seen_d = {}, {}

        def fk(act, hook):
            seen_k[hook.name] = act.detach()[0]

        def bd(grad, hook):
            seen_d[hook.name] = grad.detach()[0]

        fwd = [(f"blocks.{l}.mlp.hook_post", fk) for l in LAYERS]
        bwd = [(f"blocks.{l}.hook_mlp_out", bd) for l in LAYERS]
        model.zero_grad(set_to_none=True)
        with model.hooks(fwd_hooks=fwd, bwd_hooks=bwd):
            logits = model(ids)[0]  # [pos, vocab]
            lp = torch.log_softmax(logits[len(prompt) - 1:].float(), -1)  # positions predicting o*
            loss = -lp[torch.arange(len(target)), torch.tensor(target)].mean()
            loss.backward()
        for l in LAYERS:
            keys[l].append(seen_k[f"blocks.{l}.mlp.hook_post"])
            grads[l].append(seen_d[f"blocks.{l}.hook_mlp_out"])
            w_grad[l] += model.blocks[l].mlp.W_out.grad
    model.zero_grad(set_to_none=True)
    return ({l: torch.cat(keys[l]) for l in LAYERS}, {l: torch.cat(grads[l]) for l in LAYERS}, w_grad)


def _close(a, b, rel=1e-4):
    return float((a - b).norm()) <= rel * float(b.norm()) + 1e-9


def test_update_is_the_decomposition_through_g(tiny_model):
    """ΔW_ℓ = −α_ℓ Σ_t ũ_tᵀ δ̃_t with (u_t, δ_t) read independently by hooks, and rank ΔW ≤ token rows."""
    net = _trained_like(tiny_model)
    facts = [SHORT]
    deltas, stats = mend_deltas(tiny_model, [Fact(**f) for f in facts], net)
    u, d, _ = _independent_factors(tiny_model, facts)
    for l in LAYERS:
        with torch.no_grad():
            ut, dt = net.transform(l, u[l], d[l])
            expected = -net.alpha[net.mode(l)] * (ut.T @ dt)
        got = deltas[f"blocks.{l}.mlp.W_out"]
        assert got.shape == tiny_model.blocks[l].mlp.W_out.shape
        assert _close(got, expected), l
        rows = u[l].shape[0]
        assert rows < min(got.shape)  # the bound is a real constraint here
        # float32 entries: singular values below 1e-5·σ_max are rounding
        assert int(torch.linalg.matrix_rank(got.double(), rtol=1e-5)) <= rows
    assert len(stats["nll"]) == 1 and stats["nll"][0] > 0
    assert no_hooks(tiny_model)


def test_untrained_network_is_a_scaled_gradient_step(tiny_model):
    """With g at its start (U = 0, identity normalisation) ΔW = −α ∇_{W_out} Σ_facts L_fact (autograd)."""
    net = MENDNetwork(tiny_model.cfg.d_mlp, tiny_model.cfg.d_model, LAYERS, rank=4, alpha_init=0.05).eval()
    facts = [FACT, FACT2]
    deltas, _ = mend_deltas(tiny_model, [Fact(**f) for f in facts], net)
    _, _, w_grad = _independent_factors(tiny_model, facts)
    for l in LAYERS:
        assert _close(deltas[f"blocks.{l}.mlp.W_out"], -0.05 * w_grad[l]), l


def test_facts_sum_their_updates():
    """A batched edit is the sum of the facts' single edits (rows are independent; float rounding aside)."""
    model = make_tiny_model(True, "LN", False)
    net = _trained_like(model, seed=3)
    facts = [Fact(**f) for f in (FACT, FACT2, FACT3)]
    together, _ = mend_deltas(model, facts, net, batch_size=3)
    apart = [mend_deltas(model, [f], net)[0] for f in facts]
    chunked, _ = mend_deltas(model, facts, net, batch_size=2)
    for name, delta in together.items():
        assert _close(delta, sum(a[name] for a in apart))
        assert _close(chunked[name], delta)


@pytest.fixture(scope="module")
def net_file(tmp_path_factory):
    """A random network saved for the tiny model's name, and its path."""
    model = make_tiny_model(False, "RMS", True)
    path = tmp_path_factory.mktemp("mend") / "net.safetensors"
    save_network(_trained_like(model), path, model_name=str(model.cfg.model_name), model_hash="h", info={"x": 1})
    return path


def test_network_file_round_trip(net_file, tmp_path):
    model = make_tiny_model(False, "RMS", True)
    loaded, meta = load_network(net_file)
    reference = _trained_like(model)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in reference.state_dict().items())
    assert meta["info"] == {"x": 1} and meta["config"]["layers"] == list(LAYERS)
    assert find_network("any", str(net_file)) == net_file
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(net_file.read_bytes()[:100])
    with pytest.raises(EditError, match="corrupt"):
        load_network(bad)


def _hp(net_file, **kw):
    return MENDHyperParams(network=str(net_file), layers=LAYERS, **kw)


def test_edit_apply_restore_is_bit_exact(net_file):
    model = make_tiny_model(True, "RMS", True)
    before = snapshot(model)
    preview = edit(model, [FACT, FACT2], method="mend", hparams=_hp(net_file), apply=False, progress=False)
    assert same(before, snapshot(model)) and not preview.applied
    assert set(preview.deltas) == {f"blocks.{l}.mlp.W_out" for l in LAYERS}
    assert preview.method == "mend" and preview.targets == {} and preview.hparams["layers"] == list(LAYERS)
    assert hparams_from_dict(preview.hparams) == _hp(net_file)
    result = edit(model, [FACT, FACT2], hparams=_hp(net_file), progress=False)
    assert not same(before, snapshot(model))
    params = dict(model.named_parameters())
    for name, delta in result.deltas.items():  # W + ΔW written, nothing else
        assert torch.equal(result._originals[name] + delta, params[name].detach())
        assert torch.equal(delta, preview.deltas[name])
    result.restore()
    assert same(before, snapshot(model))
    with pytest.raises(ValueError, match="no target vectors"):
        edit(model, [FACT], hparams=_hp(net_file), targets={}, progress=False)
    assert no_hooks(model)


def test_session_undo_is_bit_exact(net_file):
    model = make_tiny_model(False, "LN", False)
    states = [snapshot(model)]
    session = EditSession(model, hparams=_hp(net_file), progress=False)
    for facts in ([FACT], [FACT2, FACT3]):
        result = session.edit(facts)
        assert result.method == "mend" and not result.applied
        states.append(snapshot(model))
    assert not same(states[1], states[2])
    session.undo()
    assert same(states[1], snapshot(model))
    session.undo(to=0)
    assert same(states[0], snapshot(model)) and len(session) == 0


def test_no_network_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path))
    model = make_tiny_model(False, "LN", False)
    before = snapshot(model)
    with pytest.raises(FileNotFoundError, match=r"analyses/train_mend\.py --model custom --dataset zsre"):
        edit(model, [FACT], hparams=MENDHyperParams(network="zsre", layers=LAYERS), progress=False)
    with pytest.raises(FileNotFoundError, match="train_mend"):
        edit(model, [FACT], hparams=_hp(tmp_path / "missing.safetensors"), progress=False)
    with pytest.raises(FileNotFoundError, match=r"train_mend\.py --model custom --dataset counterfact"):
        edit(model, [FACT], method="mend", progress=False)  # preset(model name, "mend") finds no network
    with pytest.raises(FileNotFoundError, match="no trained MEND network 'counterfact' for model 'another'"):
        preset("another", "mend")
    assert same(before, snapshot(model))


def test_network_for_another_model_or_layers(net_file):
    model = make_tiny_model(False, "RMS", True)
    with pytest.raises(EditError, match="layers"):
        edit(model, [FACT], hparams=MENDHyperParams(network=str(net_file), layers=(2, 3)), progress=False)
    other = make_tiny_model(False, "RMS", True)
    other.cfg.model_name = "another-model"
    with pytest.raises(EditError, match="trained for"):
        edit(other, [FACT], hparams=_hp(net_file), progress=False)


def test_bad_facts_change_nothing(net_file):
    model = make_tiny_model(False, "RMS", True)
    before = snapshot(model)
    with pytest.raises(DataError):
        edit(model, [{**FACT, "target_new": " "}], hparams=_hp(net_file), progress=False)
    assert same(before, snapshot(model))


@pytest.mark.parametrize("kw", [dict(network=""), dict(layers=(3, 1)), dict(layers=(-1,)), dict(batch_size=0),
                                dict(layers=()), dict(network=3)])
def test_hparams_are_validated(kw):
    with pytest.raises((ValueError, TypeError)):
        MENDHyperParams(**kw)


@pytest.mark.parametrize("kw", [dict(rank=0), dict(lr=0.0), dict(c_edit=0.0, c_loc=0.0), dict(layers=(2, 2)),
                                dict(steps=0), dict(c_loc=-1.0)])
def test_training_params_are_validated(kw):
    with pytest.raises(ValueError):
        MENDTrainingParams(**kw)


# ----------------------------------------------------------------------------- training
FAST = dict(layers=LAYERS, rank=4, batch_size=2, lr=3e-3, lr_alpha=3e-3, alpha_init=1e-3, loc_per_edit=1)


@pytest.fixture(scope="module")
def training():
    """The tiny model, 6 CounterFact edits (4 train, 2 validation) and their prepared factors."""
    model = make_tiny_model(False, "RMS", True)
    for p in model.parameters():
        p.requires_grad_(False)
    ex = counterfact_examples(load_counterfact(limit=6))
    train, val = ex[:4], ex[4:]
    prepared = (prepare_edits(model, train, LAYERS), prepare_edits(model, val, LAYERS))
    # prepare_edits hashes the weights itself; train_mend checks the fingerprints against the same hash
    return model, train, val, prepared


def test_training_lowers_the_training_loss(training):
    model, train, val, prepared = training
    params = MENDTrainingParams(steps=6, val_every=6, checkpoint_every=6, **FAST)
    run = train_mend(model, train, val, params, progress=False, prepared=prepared)
    start = MENDNetwork(model.cfg.d_mlp, model.cfg.d_model, LAYERS, rank=4, alpha_init=1e-3)
    start.load_state_dict({**run.last, **{k: v for k, v in start.state_dict().items() if not k.endswith(("_mean", "_std"))}})
    trained = MENDNetwork(model.cfg.d_mlp, model.cfg.d_model, LAYERS, rank=4)
    trained.load_state_dict(run.last)

    def objective(net):
        out = evaluate_network(model, net.eval(), prepared[0], 2, 1)
        return params.c_edit * out["edit_loss"] + params.c_loc * out["loc_loss"]

    assert objective(trained) < objective(start)
    assert [r["step"] for r in run.curve] == [0, 6] and run.summary["best_step"] in (0, 6)
    best = min(run.curve, key=lambda r: r["val_loss"])  # the network kept is the best validated one
    assert best["step"] == run.summary["best_step"]
    assert all(p.requires_grad is False for p in model.parameters())  # restored as it was


def test_resume_equals_an_uninterrupted_run(training, tmp_path):
    model, train, val, prepared = training
    full = MENDTrainingParams(steps=4, val_every=2, checkpoint_every=2, **FAST)
    a = train_mend(model, train, val, full, checkpoint=tmp_path / "a.pt", progress=False, prepared=prepared)
    train_mend(model, train, val, full.with_(steps=2), checkpoint=tmp_path / "b.pt", progress=False, prepared=prepared)
    b = train_mend(model, train, val, full, checkpoint=tmp_path / "b.pt", resume=True, progress=False, prepared=prepared)
    assert all(torch.equal(v, b.network.state_dict()[k]) for k, v in a.network.state_dict().items())
    assert all(torch.equal(v, b.last[k]) for k, v in a.last.items())
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(a.curve) == drop(b.curve)
    with pytest.raises(ValueError, match="other settings"):
        train_mend(model, train, val, full.with_(lr=1e-2), checkpoint=tmp_path / "b.pt", resume=True,
                   progress=False, prepared=prepared)
