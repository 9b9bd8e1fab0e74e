"""Averaged causal traces (pmet_lens.analysis.averaged.average_traces) against single traces averaged
here by hand: per-token-class means, 95% half-widths and counts, the severed curves, which facts are
used (known ones, up to ``limit``), and the error when the model knows none."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import TINY_VARIANTS, make_tiny_model
from pmet_lens.analysis.averaged import TOKEN_CLASSES, average_traces, knows_fact
from pmet_lens.analysis.tracing import trace
from pmet_lens.core.tokens import decode_text, encode, subject_range, target_ids
from pmet_lens.data import KnownFact, load_known_facts

WRONG = 1  # the fact at this index gets an attribute the model does not predict


def _facts(model) -> list[KnownFact]:
    """Four of ROME's known facts whose attribute is replaced by the tiny model's own greedy token (facts
    where that token reads back as itself), with a fact the model gets wrong inserted at ``WRONG``."""
    known = []
    for f in load_known_facts(limit=60):
        with torch.no_grad():
            greedy = int(model(torch.tensor([encode(model, f.prompt)]))[0, -1].argmax())
        attribute = decode_text(model, [greedy])
        if attribute.strip() and target_ids(model, attribute)[0] == greedy:
            known.append(replace(f, attribute=attribute))
        if len(known) == 4:
            break
    wrong = load_known_facts(limit=61)[-1]
    with torch.no_grad():
        greedy = int(model(torch.tensor([encode(model, wrong.prompt)]))[0, -1].argmax())
    wrong = replace(wrong, attribute=next(a for a in (" zebra", " piano") if target_ids(model, a)[0] != greedy))
    return known[:WRONG] + [wrong] + known[WRONG:]


def _classes(start: int, end: int, n: int) -> dict[str, list[int]]:
    """ROME's token classes written out (first / middle / last subject token, first subsequent, further, last)."""
    return {"first subject token": [start], "middle subject tokens": list(range(start + 1, end - 1)),
            "last subject token": [end - 1], "first subsequent token": [end] if end < n else [],
            "further tokens": list(range(end + 1, n - 1)), "last token": [n - 1]}


def _mean_half(values: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    a = np.stack(values).astype(np.float64)
    if len(a) < 2:
        return a.mean(0), np.full(a.shape[1:], np.nan)
    return a.mean(0), 1.96 * a.std(0, ddof=1) / math.sqrt(len(a))


@pytest.fixture(scope="module")
def tiny_model():
    """One layout suffices: the averaging is architecture-free (trace itself is tested on every layout)."""
    return make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])


@pytest.fixture(scope="module")
def facts(tiny_model):
    facts = _facts(tiny_model)
    known = [knows_fact(tiny_model, f)[0] for f in facts]
    assert known == [i != WRONG for i in range(5)], known
    return facts


def test_class_means_cis_counts_and_severed_curves_by_hand(tiny_model, facts):
    kinds, samples, window, seed = ("hidden", "mlp"), 2, 2, 5
    avg = average_traces(tiny_model, facts, kinds=kinds, samples=samples, window=window, seed=seed, progress=False)
    used = [i for i, f in enumerate(facts) if knows_fact(tiny_model, f)[0]]
    assert avg.fact_ids == [facts[i].known_id for i in used] and avg.n_facts == len(used) and avg.n_seen == len(facts)
    per_class = {k: {c: [] for c in TOKEN_CLASSES} for k in kinds}
    severed = {s: [] for s in ("none", "mlp", "attn")}
    lows, highs = [], []
    for i in used:  # fact i (input order) is traced with noise seed ``seed + i``
        f = facts[i]
        start, end = subject_range(tiny_model, f.prompt, f.subject)
        n = len(encode(tiny_model, f.prompt))
        for kind in kinds:
            r = trace(tiny_model, f.prompt, f.subject, kind=kind, window=window, samples=samples, seed=seed + i)
            for c, rows in _classes(start, end, n).items():
                if rows:
                    per_class[kind][c].append(r.effect[rows].mean(0).numpy())
            if kind == "hidden":
                severed["none"].append(r.effect[end - 1].numpy())
                lows.append(r.low_score)
                highs.append(r.high_score)
        for what in ("mlp", "attn"):
            cut = trace(tiny_model, f.prompt, f.subject, samples=samples, seed=seed + i, sever=what)
            severed[what].append(cut.effect[end - 1].numpy())
    for kind in kinds:
        counts = [len(per_class[kind][c]) for c in TOKEN_CLASSES]
        assert avg.count[kind].tolist() == counts
        assert counts[0] == len(used) and 0 < counts[1] < len(used)  # some subjects have middle tokens, not all
        for row, c in enumerate(TOKEN_CLASSES):
            mean, half = _mean_half(per_class[kind][c]) if per_class[kind][c] else (np.nan, np.nan)
            np.testing.assert_allclose(avg.mean[kind][row].numpy(), mean, rtol=1e-4, atol=1e-6)
            np.testing.assert_allclose(avg.ci[kind][row].numpy(), half, rtol=1e-4, atol=1e-6)
    for what, values in severed.items():
        mean, half = _mean_half(values)
        np.testing.assert_allclose(avg.severed_mean[what].numpy(), mean, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(avg.severed_ci[what].numpy(), half, rtol=1e-4, atol=1e-6)
    assert avg.low_score == pytest.approx(np.mean(lows), rel=1e-5) and avg.high_score == pytest.approx(np.mean(highs), rel=1e-5)
    frame = avg.class_frame()
    assert len(frame) == len(kinds) * len(TOKEN_CLASSES) * tiny_model.cfg.n_layers
    assert set(frame["count"]) == {len(per_class[k][c]) for k in kinds for c in TOKEN_CLASSES}


def test_limit_stops_after_that_many_known_facts(tiny_model, facts):
    used = [i for i, f in enumerate(facts) if knows_fact(tiny_model, f)[0]]
    avg = average_traces(tiny_model, facts, kinds=("hidden",), severed=False, samples=1, limit=2, progress=False)
    assert avg.fact_ids == [facts[i].known_id for i in used[:2]]
    assert avg.n_facts == 2 and avg.n_seen == used[1] + 1  # the facts after the second known one are not examined
    assert avg.severed_mean == {} and avg.count["hidden"][0] == 2


def test_knows_none_is_a_clear_error(tiny_model, facts):
    with pytest.raises(ValueError, match="the model knows none of the 1 facts examined: nothing to average"):
        average_traces(tiny_model, [facts[WRONG]], samples=1, progress=False)
