"""Every sharded stage on a pool of 2 workers equals its single-process result, in the same order.

Tolerances (the issue's): Fig. 2 and trace tables 1e-6, per-record evaluation scores 1e-5 with
identical success flags, ΔW 1e-4 relative. The workers run 1 torch thread, this process its default,
so float reductions may differ in order; each test prints the largest difference it measured.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pmet_lens.analysis.averaged import average_traces
from pmet_lens.analysis.layer_scan import scan_layers
from pmet_lens.analysis.similarity import component_similarity
from pmet_lens.analysis.tracing import trace
from pmet_lens.data import load_counterfact, load_zsre
from pmet_lens.editing import CovarianceStore, PMETHyperParams, edit
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.session import EditSession
from pmet_lens.editing.targets import optimise_targets
from pmet_lens.evaluation.counterfact import evaluate_counterfact
from pmet_lens.evaluation.perplexity import perplexity, wikitext_sample
from pmet_lens.evaluation.zsre import evaluate_zsre

from .pool_helpers import PROMPTS, known_facts

REQUESTS = [
    {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English", "target_true": "French"},
    {"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome", "target_true": "Paris"},
    {"subject": "Toko Yasuda", "prompt": "{}, who plays the instrument called the", "target_new": "electric piano",
     "target_true": "guitar"},
    {"subject": "Toyota", "prompt": "{} was founded in the country of", "target_new": "France", "target_true": "Japan"},
    {"subject": "Michael Jordan", "prompt": "{} plays the sport of", "target_new": "cricket", "target_true": "basketball"},
]


def hp(**kw) -> PMETHyperParams:
    base = dict(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=8, prefix_len=3, lam=0.5, batch_size=4,
                context_prefixes=("Once upon a time", "I think"))
    base.update(kw)
    return PMETHyperParams(**base)


def frame_diff(a: pd.DataFrame, b: pd.DataFrame) -> float:
    """Largest absolute difference of two tables with the same rows in the same order (NaN = NaN)."""
    assert list(a.columns) == list(b.columns) and len(a) == len(b)
    numeric = a.select_dtypes("number").columns
    other = [c for c in a.columns if c not in numeric]
    assert a[other].equals(b[other])
    x, y = a[numeric].to_numpy(float), b[numeric].to_numpy(float)
    assert np.array_equal(np.isnan(x), np.isnan(y))
    return float(np.nanmax(np.abs(x - y))) if x.size else 0.0


def test_fig2_similarity_equals_single_process(pool, model):
    single = component_similarity(model, PROMPTS, k=10, variant="both", batch_size=4, progress=False)
    for size in (4, 5):  # whole batches, and shards that cut batches differently
        sharded = component_similarity(model, PROMPTS, k=10, variant="both", batch_size=4, progress=False,
                                       workers=pool, shard_size=size)
        diff = frame_diff(single, sharded)
        print(f"Fig. 2 table, shard size {size}: max |diff| {diff:.2e}")
        assert diff <= 1e-6


def test_trace_positions_equal_single_process(pool, parallel_model):
    prompt, subject = "The Eiffel Tower is located in the city of", "The Eiffel Tower"
    for kind, sever in (("hidden", "mlp"), ("attn", None)):
        single = trace(parallel_model, prompt, subject, kind=kind, window=2, samples=3, sever=sever)
        sharded = trace(parallel_model, prompt, subject, kind=kind, window=2, samples=3, sever=sever, workers=pool,
                        shard_size=3)
        diff = float((single.scores - sharded.scores).abs().nan_to_num().max())
        print(f"trace {kind}: max |diff| {diff:.2e}")
        torch.testing.assert_close(sharded.scores, single.scores, atol=1e-6, rtol=0, equal_nan=True)
        assert (sharded.low_score, sharded.high_score, sharded.positions) == (single.low_score, single.high_score,
                                                                               single.positions)


def test_average_traces_equal_single_process_with_limit(pool, model):
    facts = known_facts(model)
    single = average_traces(model, facts, kinds=("hidden", "mlp"), samples=2, window=2, limit=2, progress=False)
    sharded = average_traces(model, facts, kinds=("hidden", "mlp"), samples=2, window=2, limit=2, progress=False,
                             workers=pool)
    assert (sharded.fact_ids, sharded.n_seen, sharded.n_facts) == (single.fact_ids, single.n_seen, single.n_facts)
    assert single.n_seen > single.n_facts  # unknown facts were skipped and counted
    diffs = (frame_diff(single.class_frame(), sharded.class_frame()), frame_diff(single.severed_frame(), sharded.severed_frame()))
    print(f"averaged traces: max |diff| {max(diffs):.2e}")
    assert max(diffs) <= 1e-6


def test_layer_scan_equals_single_process(pool, model):
    facts = known_facts(model, 12)
    single = scan_layers(model, facts, n_facts=3, size=2, samples=2, n_boot=50, progress=False)
    sharded = scan_layers(model, facts, n_facts=3, size=2, samples=2, n_boot=50, progress=False, workers=pool, shard_size=2)
    torch.testing.assert_close(sharded.plain, single.plain, atol=1e-6, rtol=0)
    torch.testing.assert_close(sharded.severed, single.severed, atol=1e-6, rtol=0)
    assert (sharded.layers, sharded.wins, sharded.fact_ids, sharded.n_seen) == (single.layers, single.wins,
                                                                                single.fact_ids, single.n_seen)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _target_gap(model, pool, hparams) -> float:
    """Largest norm-relative difference of a fact's δ between optimising it alone, in one process's
    chunks, and in shards of 1, 2 and 3 facts on the workers (other facts beside it each time)."""
    requests = prepare_requests(model, [_fact(r) for r in REQUESTS], hparams.context_prefixes)
    alone = [optimise_targets(model, requests.subset([i]), hparams) for i in range(len(requests))]
    worst = 0.0
    for targets in (optimise_targets(model, requests, hparams),
                    *(optimise_targets(model, requests, hparams, workers=pool, shard_size=k) for k in (1, 3))):
        for i, one in enumerate(alone):
            assert int(targets.steps[i]) == int(one.steps[0])
            for site in one.delta:
                worst = max(worst, _relative(targets.delta[site][i], one.delta[site][0]))
                torch.testing.assert_close(targets.init[site][i], one.init[site][0], atol=1e-6, rtol=1e-6)
    return worst


def test_a_facts_target_does_not_depend_on_its_shard_or_chunk(pool, model):
    # A coupling between facts (shared Adam moments, φ or stopping, mixed gradients) would move a target by
    # O(0.1-1) and change its steps. Float rounding (other padded widths, 1 thread on the workers) moves it
    # by far less, but Adam's per-coordinate normalisation g/(|g| + ε) amplifies it where the tiny random
    # model's gradient coordinates are near ε: measured up to 1.3e-4 after one Adam step and 3.8e-3 after
    # seven (one fact of five; the others ~1e-6).
    one_step = _target_gap(model, pool, hp(steps=2))  # the last of the steps only evaluates
    seven_steps = _target_gap(model, pool, hp())
    print(f"targets, fact alone vs in chunks / shards: max norm-relative |Δδ| {one_step:.1e} after one Adam step, "
          f"{seven_steps:.1e} after seven")
    assert one_step <= 1e-3
    assert seven_steps <= 2e-2


def _fact(record: dict):
    from pmet_lens.data import as_facts

    return as_facts([record])[0]


def test_edit_delta_equals_single_process(pool, model, tmp_path):
    store = CovarianceStore(tmp_path / "cov", progress=False)
    single = edit(model, REQUESTS, hparams=hp(), cov_store=store, apply=False, progress=False)
    sharded = edit(model, REQUESTS, hparams=hp(), cov_store=store, apply=False, progress=False, workers=pool)
    worst = max(_relative(sharded.deltas[k], single.deltas[k]) for k in single.deltas)
    print(f"edit ΔW: max relative |diff| {worst:.2e}")
    assert worst <= 1e-4
    # a sequential session: the workers follow the weights each batch writes on the driver
    runs = []
    for workers in (None, pool):
        session = EditSession(model, hparams=hp(steps=4), cov_store=store, progress=False)
        session.edit(REQUESTS[:2], workers=workers)
        session.edit(REQUESTS[2:], workers=workers)
        runs.append({f"{b}/{k}": v.clone() for b, r in enumerate(session.history) for k, v in r.deltas.items()})
        session.undo(to=0)
    worst = max(_relative(runs[1][k], runs[0][k]) for k in runs[0])
    print(f"session ΔW: max relative |diff| {worst:.2e}")
    assert worst <= 1e-4


def test_covariance_sums_combine_exactly(pool, model):
    hooks = ["blocks.1.mlp.hook_post", "blocks.2.mlp.hook_post"]
    single = CovarianceStore(cache_dir=False, progress=False).get(model, hooks, 3000, "float32", 64)
    sharded = CovarianceStore(cache_dir=False, progress=False).get(model, hooks, 3000, "float32", 64, workers=pool)
    for h in hooks:
        rel = _relative(sharded[h], single[h])
        print(f"C at {h}: relative |diff| {rel:.2e}")
        torch.testing.assert_close(sharded[h], single[h], rtol=1e-6, atol=0)


def test_counterfact_evaluation_with_generation_equals_single_process(pool, model):
    records = load_counterfact(limit=6)
    kwargs = dict(generation=True, gen_every=2, max_length=16, batch_size=8, progress=False)
    single, s_sum = evaluate_counterfact(model, records, **kwargs)
    sharded, p_sum = evaluate_counterfact(model, records, **kwargs, workers=pool, shard_size=2)
    success = [c for c in single.columns if c.endswith("_success")]
    assert single[success].equals(sharded[success])  # identical success flags
    diff = frame_diff(single, sharded)
    print(f"CounterFact per-record: max |diff| {diff:.2e}")
    assert diff <= 1e-5
    assert s_sum["n_generation"] == p_sum["n_generation"] == 3


def test_zsre_evaluation_equals_single_process(pool, model):
    records = load_zsre(limit=5)
    for metric in ("teacher_forced", "official"):
        single, _ = evaluate_zsre(model, records, metric=metric, progress=False)
        sharded, _ = evaluate_zsre(model, records, metric=metric, progress=False, workers=pool, shard_size=2)
        assert frame_diff(single, sharded) <= 1e-5


def test_perplexity_equals_single_process(pool, model):
    sample = wikitext_sample(model, n_tokens=512, seq_len=64)
    single = perplexity(model, sample, batch_size=2)
    sharded = perplexity(model, sample, batch_size=2, workers=pool, shard_size=2)
    print(f"perplexity: relative |diff| {abs(sharded - single) / single:.2e}")
    assert sharded == pytest.approx(single, rel=1e-6)


def test_tune_grid_points_on_workers_equal_single_process(pool, model, tmp_path):
    from conftest import load_analysis
    from pmet_lens.parallel import run_shards

    tune = load_analysis("tune_editing")  # a script's function: sent to the workers by value
    store = CovarianceStore(tmp_path / "cov", progress=False)
    facts = load_counterfact(limit=3)
    points = [(facts, hp(clamp_norm_factor=c, steps=2), [0.5, 5.0]) for c in (0.75, 1.5)]
    single = run_shards(model, tune.sweep, points, common={"store": store})
    sharded = run_shards(model, tune.sweep, points, common={"store": store}, workers=pool)
    rows = lambda parts: pd.DataFrame([r for p in parts for r in p]).drop(columns=["target_seconds"])  # noqa: E731
    assert frame_diff(rows(single), rows(sharded)) <= 1e-5
