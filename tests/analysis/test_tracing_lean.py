"""Causal tracing's memory-lean paths: sigma of W_E cached per model, restorations grouped by a token
budget, and a group that meets a CUDA out-of-memory error halved (injected on the CPU)."""

from __future__ import annotations

import logging

import pytest
import torch

from pmet_lens.analysis import tracing
from pmet_lens.analysis.tracing import EmbeddingStats, embedding_std, trace

PROMPT = "The Eiffel Tower is located in the city of"
SUBJECT = "Eiffel Tower"


def test_embedding_std_is_the_std_of_w_e_and_is_cached(tiny_model, monkeypatch):
    assert embedding_std(tiny_model) == pytest.approx(float(tiny_model.W_E.detach().double().std()), rel=1e-12)
    assert embedding_std(tiny_model, rows=7) == pytest.approx(embedding_std(tiny_model), rel=1e-12)
    calls = []
    real = tracing.embedding_std
    monkeypatch.setattr(tracing, "embedding_std", lambda model: calls.append(1) or real(model))
    stats = EmbeddingStats()
    first = stats.std(tiny_model)
    assert stats.std(tiny_model) == first and len(calls) == 1  # once per model state
    saved = tiny_model.W_E.detach().clone()
    try:
        with torch.no_grad():
            tiny_model.W_E.mul_(2.0)  # an in-place change of W_E is seen
        assert stats.std(tiny_model) == pytest.approx(2 * first, rel=1e-6) and len(calls) == 2
    finally:
        with torch.no_grad():
            tiny_model.W_E.copy_(saved)


@pytest.mark.parametrize("kind, sever", [("hidden", None), ("mlp", None), ("hidden", "mlp")])
def test_grouped_and_halved_restorations_equal_one_batch(tiny_model, kind, sever, caplog):
    from pmet_lens.core.tokens import encode, subject_range

    last = len(encode(tiny_model, PROMPT)) - 1
    kw = dict(kind=kind, sever=sever, window=2, samples=3, seed=1,
              positions=[subject_range(tiny_model, PROMPT, SUBJECT)[1] - 1, last])
    whole = trace(tiny_model, PROMPT, SUBJECT, **kw)
    grouped = trace(tiny_model, PROMPT, SUBJECT, max_tokens=1, stats=EmbeddingStats(), **kw)  # one layer per forward
    torch.testing.assert_close(grouped.scores, whole.scores, rtol=1e-5, atol=1e-7, equal_nan=True)
    assert grouped.low_score == pytest.approx(whole.low_score) and grouped.high_score == pytest.approx(whole.high_score)
    fired = []

    def oom_once(act, hook):  # a restoration batch of more than one layer's rows fails once
        if not fired and act.shape[0] > 3 and act.shape[1] < len(whole.token_ids):
            fired.append(1)
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with caplog.at_level(logging.WARNING, logger="pmet_lens.core.batching"), \
            tiny_model.hooks(fwd_hooks=[(lambda name: name.endswith("hook_resid_pre"), oom_once)]):
        halved = trace(tiny_model, PROMPT, SUBJECT, **kw)
    assert fired and "causal tracing: CUDA out of memory" in caplog.text
    torch.testing.assert_close(halved.scores, whole.scores, rtol=1e-5, atol=1e-7, equal_nan=True)
