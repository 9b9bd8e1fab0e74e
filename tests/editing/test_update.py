"""The weight update (pmet_lens.editing.update): keys map to their targets, the solve, the spread."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, hp_, new_store

from pmet_lens.editing import edit
from pmet_lens.editing.update import solve_update, spread


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return new_store(tmp_path_factory)



def test_key_maps_to_target_at_L(tiny_model, store):
    """After the update the last layer's FFN output for the bare prompt is much closer to v (tiny λ) than
    before it, and the averaged key the update was solved for gets the residual v - output exactly."""
    from pmet_lens.core.tokens import encode, subject_last_position

    hp = hp_(layers=(2,), lam=1e-4)
    text = FACT["prompt"].format(FACT["subject"])
    pos = subject_last_position(tiny_model, FACT["prompt"], FACT["subject"])
    ids = torch.tensor([encode(tiny_model, text)])
    names = ["blocks.2.hook_mlp_out", "blocks.2.mlp.hook_post"]
    _, cache = tiny_model.run_with_cache(ids, names_filter=names)
    unedited, key = cache[names[0]][0, pos], cache[names[1]][0, pos]
    result = edit(tiny_model, [FACT], hparams=hp, cov_store=store, progress=False)
    try:
        _, cache = tiny_model.run_with_cache(ids, names_filter=names[0])
        got = cache[names[0]][0, pos]
        target = result.targets["mlp_out"][0]
        # keys are averaged over prefixes; with one layer the bare prompt's key is close to the mean
        before = float((unedited - target).norm() / target.norm())
        err = float((got - target).norm() / target.norm())
        assert err < 0.5 * before, (err, before)
        # the written ΔW is what moved the output: ΔWᵀ k of the bare prompt's own key
        delta = result.deltas["blocks.2.mlp.W_out"]
        torch.testing.assert_close(got - unedited, key @ delta.to(key.dtype), rtol=1e-4, atol=1e-5)
        # and it maps the key it was solved for, ½ bare + ½ mean of the prefixed prompts' keys, onto the
        # residual v - output(bare prompt) (λ → 0: the exact solve)
        result.restore()
        keys = []
        for prefix in result.prefixes:
            prompt = prefix + ". " + FACT["prompt"]
            p = subject_last_position(tiny_model, prompt, FACT["subject"])
            _, c = tiny_model.run_with_cache(torch.tensor([encode(tiny_model, prompt.format(FACT["subject"]))]),
                                             names_filter=names[1])
            keys.append(c[names[1]][0, p])
        mean_key = 0.5 * key + 0.5 * torch.stack(keys).mean(0)
        torch.testing.assert_close((mean_key.double() @ delta.double()), (target - unedited).double(), rtol=1e-3, atol=1e-4)
    finally:
        result.restore()


def test_key_maps_exactly_without_prefixes(tiny_model, store):
    hp = hp_(layers=(2,), lam=1e-6, context_prefixes=())
    result = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False)
    from pmet_lens.core.tokens import encode, subject_last_position

    for i, f in enumerate([FACT, FACT2]):
        pos = subject_last_position(tiny_model, f["prompt"], f["subject"])
        _, cache = tiny_model.run_with_cache(torch.tensor([encode(tiny_model, f["prompt"].format(f["subject"]))]),
                                             names_filter="blocks.2.hook_mlp_out")
        got = cache["blocks.2.hook_mlp_out"][0, pos]
        torch.testing.assert_close(got, result.targets["mlp_out"][i], atol=1e-3, rtol=1e-3)
    result.restore()


def test_solve_update_is_the_plain_solve_of_eq_14():
    """Δ = (λC + KᵀK)⁻¹ KᵀR written out, for a random C = E[kkᵀ] and float32 keys and residuals."""
    g = torch.Generator().manual_seed(0)
    corpus_keys = torch.randn(200, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3.0, 12, dtype=torch.float64)
    cov = corpus_keys.T @ corpus_keys / 200
    keys, resid = torch.randn(4, 12, generator=g), torch.randn(4, 6, generator=g)
    K, R = keys.double(), resid.double()
    for lam in (0.01, 1.0, 30.0):
        expected = torch.linalg.solve(lam * cov + K.T @ K, K.T @ R)
        got = solve_update(keys, resid, cov.float(), lam)
        assert got.dtype == torch.float64
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)  # C passed in float32, as the store keeps it
    # C matters: the identity in its place (a plain ridge) gives another Δ
    ridge = torch.linalg.solve(30.0 * torch.eye(12, dtype=torch.float64) + K.T @ K, K.T @ R)
    assert (solve_update(keys, resid, cov.float(), 30.0) - ridge).norm() > 0.1 * ridge.norm()


def test_zero_residual_gives_zero_delta():
    keys = torch.randn(3, 8)
    cov = torch.eye(8)
    delta = solve_update(keys, torch.zeros(3, 5), cov, 10.0)
    assert torch.count_nonzero(delta) == 0
    assert spread(5, 3, "sqrt") == pytest.approx(1 / 3 ** 0.5) and spread(5, 3, "even") == pytest.approx(1 / 3)


def test_the_engine_takes_any_solve(tiny_model, store):
    """compute_and_apply_updates calls ``solve(site, keys, resid, cov)`` once per site, layers
    ascending, and writes what it returns; the default solve reproduces edit()'s deltas."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing import prepare_requests
    from pmet_lens.editing.update import compute_and_apply_updates, least_squares_solve

    hp = hp_(update_attn=True)
    first = edit(tiny_model, [FACT, FACT2], hparams=hp, cov_store=store, progress=False, apply=False)
    requests = prepare_requests(tiny_model, as_facts([FACT, FACT2]), hp.context_prefixes)
    calls, originals = [], {}

    def recording(site, keys, resid, cov):
        calls.append((site.layer, site.weight, tuple(keys.shape), tuple(resid.shape), tuple(cov.shape)))
        return least_squares_solve(site, keys, resid, cov, lam=hp.lam)

    from pmet_lens.core.arch import architecture
    from pmet_lens.editing.site import edit_site

    hooks = [edit_site(architecture(tiny_model), w, layer).key_hook for layer in hp.layers for w in ("W_out", "W_O")]
    covs = store.get(tiny_model, hooks, hp.cov_tokens, hp.cov_dtype, hp.cov_seq_len)
    targets = {s: first.targets[s] for s in ("mlp_out", "attn_out")}
    def keep(site, delta):
        originals.setdefault(site.param_name, site.param(tiny_model).detach().clone())

    deltas = compute_and_apply_updates(tiny_model, requests, targets, hp.layers, hp.spread, covs, solve=recording,
                                       on_write=keep)
    d_mlp, d_attn, d = tiny_model.cfg.d_mlp, tiny_model.cfg.n_heads * tiny_model.cfg.d_head, tiny_model.cfg.d_model
    assert calls == [(1, "W_out", (2, d_mlp), (2, d), (d_mlp, d_mlp)), (1, "W_O", (2, d_attn), (2, d), (d_attn, d_attn)),
                     (2, "W_out", (2, d_mlp), (2, d), (d_mlp, d_mlp)), (2, "W_O", (2, d_attn), (2, d), (d_attn, d_attn))]
    assert deltas.keys() == first.deltas.keys() and all(torch.equal(deltas[k], first.deltas[k]) for k in deltas)
    with torch.no_grad():
        for name, orig in originals.items():
            dict(tiny_model.named_parameters())[name].copy_(orig)
    zero = compute_and_apply_updates(tiny_model, requests, targets, hp.layers, hp.spread, covs,
                                     solve=lambda site, keys, resid, cov: torch.zeros(keys.shape[1], resid.shape[1],
                                                                                       dtype=torch.float64))
    assert all(torch.count_nonzero(v) == 0 for v in zero.values())
