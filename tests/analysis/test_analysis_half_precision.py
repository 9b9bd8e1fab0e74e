"""Fig. 2, tracing and evaluation on a bfloat16 / float16 model (issue 34): they run, and what they
score (cosines, top-k sets, probabilities) is computed in float32 from the model's activations, close
to the float32 model's."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from pmet_lens.analysis.similarity import similarity_scores
from pmet_lens.analysis.tracing import trace
from pmet_lens.data import load_counterfact
from pmet_lens.evaluation import evaluate_counterfact

PROMPTS = ["The Eiffel Tower is located in the city of", "Danielle Darrieux's mother tongue is",
           "Apple was founded by", "The capital of Japan is"]


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def pair(request):
    return make_tiny_model(False, "RMS", True), make_tiny_model(False, "RMS", True).to(request.param)


def test_similarity_in_half_precision(pair):
    f32, half = pair
    ref = similarity_scores(f32, PROMPTS, k=20, variant="both", progress=False)
    got = similarity_scores(half, PROMPTS, k=20, variant="both", progress=False)
    for v in ref:
        assert got[v].cosine.dtype == torch.float32
        assert float((got[v].cosine - ref[v].cosine).abs().max()) < 0.05
        assert bool(((got[v].jaccard >= 0) & (got[v].jaccard <= 1)).all())
        assert float((got[v].jaccard - ref[v].jaccard).abs().mean()) < 0.15


def test_trace_in_half_precision(pair):
    f32, half = pair
    ref = trace(f32, PROMPTS[0], "The Eiffel Tower", samples=3, target=" Paris")
    got = trace(half, PROMPTS[0], "The Eiffel Tower", samples=3, target=" Paris")
    assert torch.isfinite(got.scores).all() and got.scores.dtype == torch.float32
    assert got.high_score == pytest.approx(ref.high_score, rel=0.1)
    torch.testing.assert_close(got.scores, ref.scores, rtol=0.1, atol=1e-6)


def test_evaluation_in_half_precision(pair):
    f32, half = pair
    records = load_counterfact(limit=2)
    ref, _ = evaluate_counterfact(f32, records, generation=False, progress=False)
    got, summary = evaluate_counterfact(half, records, generation=False, progress=False)
    assert summary["n_records"] == 2
    for col in ("p_new", "p_true"):
        torch.testing.assert_close(torch.tensor(got[col].values), torch.tensor(ref[col].values), rtol=0.1, atol=1e-7)
