"""The batched target optimisation (pmet_lens.editing.targets)."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, FACT3, hp_, no_hooks

from pmet_lens.core.arch import architecture
from pmet_lens.editing import MEMITHyperParams, PMETHyperParams, prepare_requests


def test_suffix_run_equals_full_forward(tiny_model):
    """The target loop recomputes only positions >= each row's lookup position (frozen keys and
    values before it, left-padded with a mask): outputs there equal the full forward's, with a δ."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing.targets import _rows, _Suffix

    facts = as_facts([FACT, FACT2])
    rows = _rows(tiny_model, prepare_requests(tiny_model, facts, ("Once upon a time there was", "I")))
    L, n = 1, tiny_model.cfg.n_layers
    delta = torch.randn(len(rows.fact), tiny_model.cfg.d_model)
    ar = torch.arange(len(rows.fact))
    with torch.no_grad():
        resid_L = tiny_model(rows.tokens, stop_at_layer=L)
        kv = {}
        names = [f"blocks.{j}.attn.hook_{c}" for j in range(L, n) for c in "kv"]
        with tiny_model.hooks(fwd_hooks=[(h, lambda a, hook: kv.__setitem__(hook.name, a.detach())) for h in names]):
            tiny_model(resid_L, start_at_layer=L, stop_at_layer=n)
        suffix = _Suffix.build(architecture(tiny_model), resid_L, kv, rows, L, n)
        assert len(set(rows.lookup.tolist())) > 1  # rows really differ in their cut
        def add_full(a, hook):
            return a.index_put((ar, rows.lookup), delta, accumulate=True)

        def add_suffix(a, hook):
            return a.index_put((ar, torch.zeros_like(ar)), delta, accumulate=True)

        with tiny_model.hooks(fwd_hooks=[(f"blocks.{L}.hook_mlp_out", add_full)]):
            full = tiny_model(resid_L, start_at_layer=L, stop_at_layer=n)
        with tiny_model.hooks(fwd_hooks=[(f"blocks.{L}.hook_mlp_out", add_suffix)]):
            part = suffix.run(tiny_model, ar)
    for r in range(len(ar)):
        lo, hi = int(rows.lookup[r]), int(rows.lengths[r])
        torch.testing.assert_close(part[r, : hi - lo], full[r, lo:hi], rtol=1e-5, atol=1e-5)
    assert no_hooks(tiny_model)


def test_targets_do_not_depend_on_chunking(tiny_model):
    """Facts are grouped into chunks by suffix length, yet each fact keeps the targets it gets when
    optimised alone, returned in input order."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing.targets import optimise_targets

    facts = as_facts([FACT3, FACT, FACT2])
    hp = hp_(steps=4, batch_size=2)
    requests = prepare_requests(tiny_model, facts, hp.context_prefixes)
    lengths = [requests.suffix_length(i) for i in range(len(facts))]
    assert lengths != sorted(lengths)  # the grouping really reorders these facts
    grouped = optimise_targets(tiny_model, requests, hp)
    for i, fact in enumerate(facts):
        alone = optimise_targets(tiny_model, prepare_requests(tiny_model, [fact], hp.context_prefixes), hp)
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
    hp = hp_(cls, steps=5, batch_size=2)
    blocks = list(tiny_model.blocks)
    requests = prepare_requests(tiny_model, facts, hp.context_prefixes)
    eager = optimise_targets(tiny_model, requests, hp)
    compiled = optimise_targets(tiny_model, requests, hp, compile=True)
    assert list(tiny_model.blocks) == blocks and no_hooks(tiny_model)
    assert torch.equal(eager.steps, compiled.steps)
    for site in eager.delta:
        torch.testing.assert_close(compiled.init[site], eager.init[site])
        # Rounding differences of the fused kernels grow over the optimiser's steps, and element-wise they
        # depend on the CPU's vector unit (single small entries differ by ~1% on an AVX-512 Xeon), so the
        # check is on the whole delta: relative error of its norm below 1e-3.
        err = (compiled.delta[site] - eager.delta[site]).norm() / eager.delta[site].norm()
        assert err < 1e-3, f"{site}: compiled delta differs from eager by {err:.2e} of its norm"


def test_kl_term_is_kl_of_the_edited_from_the_initial_distribution():
    """The KL term is KL(P_edited ‖ P_init), the official ``F.kl_div(log P_init, log P_edited, log_target=True)``
    (``F.kl_div(input, target)`` is KL(target ‖ input)), on a pair worked out by hand."""
    import math

    from pmet_lens.editing.targets import _kl_term

    edited = torch.tensor([[0.9, 0.1]]).log()
    init = torch.tensor([[0.5, 0.5]]).log()
    by_hand = 0.9 * math.log(0.9 / 0.5) + 0.1 * math.log(0.1 / 0.5)   # 0.3681
    other_way = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)  # 0.5108
    assert _kl_term(edited, init).item() == pytest.approx(by_hand, rel=1e-6)
    assert abs(by_hand - other_way) > 0.1
    official = torch.nn.functional.kl_div(init, edited, log_target=True, reduction="sum")
    assert _kl_term(edited, init).item() == pytest.approx(official.item(), rel=1e-6)
    assert _kl_term(init, init).item() == 0.0
