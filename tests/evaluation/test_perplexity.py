"""Perplexity of the fixed WikiText-2 test sample (pmet_lens.evaluation.perplexity)."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import make_tiny_model
from pmet_lens.evaluation.perplexity import perplexity, wikitext_sample


def test_sample_is_fixed_and_full_windows():
    model = make_tiny_model(False, "RMS", True)
    a, b = wikitext_sample(model, n_tokens=300, seq_len=32), wikitext_sample(model, n_tokens=300, seq_len=32)
    assert torch.equal(a.windows, b.windows)
    assert a.windows.shape == (300 // 32, 32) and a.n_predicted == 9 * 31
    text = model.tokenizer.decode(a.windows[0].tolist())
    assert text.startswith("Robert Boulter is an English film")  # the first article paragraph, no heading


def test_perplexity_matches_a_plain_loop():
    model = make_tiny_model(True, "LN", False)
    sample = wikitext_sample(model, n_tokens=128, seq_len=32)
    nll, n = 0.0, 0
    with torch.no_grad():
        for row in sample.windows:
            logp = torch.log_softmax(model(row[None])[0].double(), -1)
            nll -= float(logp[torch.arange(31), row[1:]].sum())
            n += 31
    assert perplexity(model, sample, batch_size=3) == pytest.approx(math.exp(nll / n), rel=1e-5)


def test_perplexity_sees_hooks_and_bad_sizes_are_refused():
    model = make_tiny_model(False, "RMS", True)
    sample = wikitext_sample(model, n_tokens=64, seq_len=32)
    base = perplexity(model, sample)

    def noise(act, hook):
        return act + 3.0

    assert perplexity(model, sample, hooks=[("blocks.0.hook_resid_post", noise)]) != base
    assert perplexity(model, sample) == base  # the hook did not survive the call
    with pytest.raises(ValueError, match="seq_len"):
        wikitext_sample(model, n_tokens=64, seq_len=1)
    with pytest.raises(ValueError, match="n_tokens"):
        wikitext_sample(model, n_tokens=8, seq_len=32)
