"""Sampling (pmet_lens.core.generation): the key-value-cached, left-padded batch decode against an
uncached loop of full forwards written here from the sampling rule (ROME's generate_fast)."""

from __future__ import annotations

import torch

from pmet_lens.core.generation import sample_texts

PROMPTS = ["The mother tongue of", "Paris is a city in the country of", "Hello"]


def _uncached(model, prompt: str, *, max_length: int, top_k: int, seed: int, eos: int | None) -> str:
    """One prompt, one full forward per new token: renormalised top-k softmax, a draw u ~ U(0, 1) from
    the prompt's own generator, the first token whose cumulative probability reaches u."""
    gen = torch.Generator().manual_seed(seed)
    ids = model.to_tokens(prompt)[0].tolist()
    n_prompt = len(ids)
    with torch.no_grad():
        while len(ids) < max_length:
            probs = model(torch.tensor([ids]))[0, -1].softmax(-1)
            top_p, top_i = probs.topk(top_k)
            u = torch.rand((), generator=gen)
            cdf = (top_p / top_p.sum()).cumsum(0)
            choice = min(int((cdf < u).sum()), top_k - 1)
            token = int(top_i[choice])
            if token == eos:
                break
            ids.append(token)
    assert len(ids) >= n_prompt
    return model.tokenizer.decode(ids, skip_special_tokens=True)


def test_batched_cached_sampling_equals_uncached_loop(tiny_model):
    eos = tiny_model.tokenizer.eos_token_id
    expected = [_uncached(tiny_model, p, max_length=12, top_k=5, seed=3 + i, eos=eos) for i, p in enumerate(PROMPTS)]
    for batch_size in (1, 3):
        got = sample_texts(tiny_model, PROMPTS, max_length=12, top_k=5, seed=3, batch_size=batch_size)
        assert got == expected, batch_size
    # the draws are the prompt's own: another seed gives other texts, and top_k = 1 is greedy decoding
    assert sample_texts(tiny_model, PROMPTS, max_length=12, seed=4) != got
    greedy = sample_texts(tiny_model, PROMPTS[:1], max_length=10, top_k=1, seed=0)
    assert greedy == [_uncached(tiny_model, PROMPTS[0], max_length=10, top_k=1, seed=99, eos=eos)]
