"""The fast R path traces exactly the rows of the full averaged trace that the rule reads."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.analysis.averaged import average_traces
from pmet_lens.analysis.layer_scan import last_subject_curves, scan_layers
from pmet_lens.analysis.layers import critical_layers
from pmet_lens.analysis.tracing import trace
from pmet_lens.core.tokens import subject_range
from pmet_lens.data import KnownFact

FACTS = [
    KnownFact(known_id=i, prompt=p, subject=s, attribute="x", template=p.replace(s, "{}"), relation_id="P0")
    for i, (p, s) in enumerate([("The Eiffel Tower is located in", "The Eiffel Tower"),
                                ("Danielle Darrieux speaks the language", "Danielle Darrieux"),
                                ("Toyota was founded in the country of", "Toyota")])
]


def test_fast_rows_equal_average_traces_rows(tiny_model):
    scan = scan_layers(tiny_model, FACTS, n_facts=3, known_only=False, size=2, samples=3, n_boot=0, progress=False)
    for i, fact in enumerate(FACTS):  # fact i is traced with seed 0 + i, as in average_traces
        plain, severed = last_subject_curves(tiny_model, fact.prompt, fact.subject, samples=3, seed=i)
        torch.testing.assert_close(scan.plain[i], plain)
        first, end = subject_range(tiny_model, fact.prompt, fact.subject)
        last = end - 1
        full = trace(tiny_model, fact.prompt, fact.subject, samples=3, seed=i)
        torch.testing.assert_close(plain, full.effect[last])  # the row of the full hidden trace
        torch.testing.assert_close(scan.severed[i], severed)
    assert scan.layers == critical_layers(scan.plain.double().mean(0), scan.severed.double().mean(0), size=2)[0]


def test_bootstrap_band_sums_to_one_and_contains_r(tiny_model):
    scan = scan_layers(tiny_model, FACTS, n_facts=3, known_only=False, size=2, samples=2, n_boot=200, progress=False)
    assert abs(sum(scan.wins.values()) - 1) < 1e-9
    assert scan.band(1.0)[0] in [list(range(s, s + 2)) for s in scan.wins]
    assert set(scan.wins_frame()["start"]) == set(scan.wins)
    frame = scan.curves_frame()
    assert list(frame["in_R"]).count(True) == 2 and len(frame) == tiny_model.cfg.n_layers


def test_too_few_known_facts_is_a_clear_error(tiny_model):
    with pytest.raises(ValueError, match="answers right only .* known_only=False"):
        scan_layers(tiny_model, FACTS, n_facts=3, size=2, samples=1, n_boot=0, progress=False)
    with pytest.raises(ValueError, match="min_facts"):
        scan_layers(tiny_model, FACTS, n_facts=3, min_facts=5, size=2, progress=False)


@pytest.mark.slow
def test_fast_curves_equal_average_traces_on_known_facts(default_model):
    from pmet_lens import load_known_facts

    facts = load_known_facts(limit=10)
    avg = average_traces(default_model, facts, limit=1, samples=2, progress=False)
    scan = scan_layers(default_model, facts, n_facts=1, samples=2, n_boot=0, progress=False)
    torch.testing.assert_close(scan.plain[0], avg.severed_mean["none"], atol=1e-6, rtol=0)
    torch.testing.assert_close(scan.severed[0], avg.severed_mean["mlp"], atol=1e-6, rtol=0)
