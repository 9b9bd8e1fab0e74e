"""Context prefixes sampled from the model."""

from __future__ import annotations

import torch
from editing_helpers import hp_


def test_cached_prefix_sampling_equals_uncached_loop(tiny_model):
    """context_prefixes decodes with a key-value cache; the draws are those of full forwards."""
    from pmet_lens.core.tokens import encode
    from pmet_lens.editing import context_prefixes

    hp = hp_(context_prefixes=None, prefix_len=6, prefix_starts=("The", "Because"), prefixes_per_start=2, seed=3)
    gen = torch.Generator().manual_seed(hp.seed)
    expected = []
    with torch.no_grad():
        for start in hp.prefix_starts:
            for _ in range(hp.prefixes_per_start):
                ids = encode(tiny_model, start)
                for _ in range(hp.prefix_len):
                    logits = tiny_model(torch.tensor([ids]))[0, -1]
                    top = torch.topk(logits.float(), k=5)
                    ids.append(int(top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]))
                text = tiny_model.tokenizer.decode(ids, skip_special_tokens=True)
                expected.append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() or start)
    assert context_prefixes(tiny_model, hp) == tuple(expected)
    assert len(set(expected)) > 1
