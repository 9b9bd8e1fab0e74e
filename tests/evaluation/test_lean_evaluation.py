"""Memory-lean evaluation: perplexity, scoring and generation read out only the positions they score,
plan their forwards by a token budget, and halve a batch that meets a CUDA out-of-memory error
(injected here on the CPU by a hook that raises ``torch.cuda.OutOfMemoryError`` once)."""

from __future__ import annotations

import logging
import math

import pytest
import torch

from pmet_lens.core.generation import sample_texts
from pmet_lens.evaluation.perplexity import perplexity, wikitext_sample
from pmet_lens.evaluation.scoring import score_continuations


def _oom_once(min_rows: int):
    """A hook raising a CUDA out-of-memory error the first time a forward has >= ``min_rows`` rows."""
    state = {"fired": 0}

    def hook(act, hook):
        if not state["fired"] and act.shape[0] >= min_rows:
            state["fired"] = 1
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    return state, ("hook_embed", hook)


class _UnembedRows:
    """Records the number of positions of every unembedding call (a torch forward hook, removed on exit)."""

    def __init__(self, model):
        self.model, self.positions = model, []

    def __enter__(self):
        self.handle = self.model.unembed.register_forward_hook(
            lambda mod, args, out: self.positions.append(args[0].shape[0] * args[0].shape[1]))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def test_perplexity_reads_out_in_chunks_and_survives_an_oom(tiny_model, caplog):
    sample = wikitext_sample(tiny_model, n_tokens=128, seq_len=32)
    nll = 0.0
    with torch.no_grad():
        for row in sample.windows:  # the full-logits formula, one window at a time
            logp = torch.log_softmax(tiny_model(row[None])[0].double(), -1)
            nll -= float(logp[torch.arange(31), row[1:]].sum())
    ref = math.exp(nll / sample.n_predicted)
    with _UnembedRows(tiny_model) as seen:
        assert perplexity(tiny_model, sample, batch_size=4) == pytest.approx(ref, rel=1e-5)
    assert max(seen.positions) <= 2**24 // tiny_model.cfg.d_vocab  # never [batch, pos, vocab] at once
    assert perplexity(tiny_model, sample, batch_size=4, max_tokens=40) == pytest.approx(ref, rel=1e-5)  # one window a forward
    state, hook = _oom_once(min_rows=2)
    with caplog.at_level(logging.WARNING, logger="pmet_lens.core.batching"), tiny_model.hooks(fwd_hooks=[hook]):
        assert perplexity(tiny_model, sample, batch_size=4) == pytest.approx(ref, rel=1e-5)
    assert state["fired"] and "perplexity: CUDA out of memory on a batch of 4" in caplog.text


def test_scoring_survives_an_oom_with_equal_scores(tiny_model, caplog):
    prompts = ["The mother tongue of Danielle Darrieux is", "The Eiffel Tower is located in", "Hello"] * 3
    targets = ["French", "English", "Paris", "Rome", "world", "there", "the city", "a", "b"]
    plain = score_continuations(tiny_model, prompts, targets)
    state, hook = _oom_once(min_rows=3)
    with caplog.at_level(logging.WARNING, logger="pmet_lens.core.batching"), tiny_model.hooks(fwd_hooks=[hook]):
        halved = score_continuations(tiny_model, prompts, targets)
    assert state["fired"] and "scoring: CUDA out of memory" in caplog.text
    torch.testing.assert_close(halved.mean_logprob, plain.mean_logprob, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(halved.token_correct, plain.token_correct))


def test_generation_reads_out_the_last_position_and_survives_an_oom(tiny_model, caplog):
    prompts = ["The mother tongue of", "Paris is a city in the country of", "Hello", "I think"]
    with _UnembedRows(tiny_model) as seen:
        plain = sample_texts(tiny_model, prompts, max_length=12, seed=3, batch_size=4)
    assert set(seen.positions) == {4}  # one position per row, also for the prompt's forward
    state, hook = _oom_once(min_rows=4)
    with caplog.at_level(logging.WARNING, logger="pmet_lens.core.batching"), tiny_model.hooks(fwd_hooks=[hook]):
        halved = sample_texts(tiny_model, prompts, max_length=12, seed=3, batch_size=4)
    assert state["fired"] and "generation: CUDA out of memory on a batch of 4" in caplog.text
    assert halved == plain  # the retried rows draw again from freshly seeded generators
    assert sample_texts(tiny_model, prompts, max_length=12, seed=3, batch_size=4, max_tokens=24) == plain  # 2 rows a batch
