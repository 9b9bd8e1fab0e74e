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


def test_prefix_groups_of_two_lengths_and_rome_bos_start(tiny_model):
    """Several prefix lengths give one group each (sampled in order, one generator), ``""`` samples after the
    BOS token (ROME), and the key-averaging groups follow: MEMIT's bare + one per length, ROME's uniform."""
    from pmet_lens.editing import ROMEHyperParams, context_prefixes
    from pmet_lens.editing.context import template_groups

    hp = hp_(context_prefixes=None, prefix_len=(2, 4), prefix_starts=("The",), prefixes_per_start=2, seed=1)
    prefixes = context_prefixes(tiny_model, hp)
    assert len(prefixes) == 4
    assert context_prefixes(tiny_model, hp.with_(prefix_len=2))[:2] == prefixes[:2]  # the first group's draws
    assert template_groups(hp, 4) == ((0,), (1, 2), (3, 4))
    assert template_groups(hp, 3) == ((0,), (1, 2, 3))  # explicit prefixes of another count: one group
    assert template_groups(hp.with_(key_average="uniform"), 4) == ((0, 1, 2, 3, 4),)
    rome = ROMEHyperParams(layers=(1,), prefix_len=(2, 3), prefixes_per_start=2, seed=0)
    sampled = context_prefixes(tiny_model, rome)
    assert len(sampled) == 4 and all(p and "{" not in p for p in sampled)
    assert template_groups(rome, len(sampled)) == ((0, 1, 2, 3, 4),)
    gen, ids = torch.Generator().manual_seed(0), [tiny_model.tokenizer.bos_token_id]  # ROME: after <BOS> alone
    with torch.no_grad():
        for _ in range(2):
            top = torch.topk(tiny_model(torch.tensor([ids]))[0, -1].float(), k=5)
            ids.append(int(top.indices[torch.multinomial(top.values.softmax(-1), 1, generator=gen)]))
    assert tiny_model.tokenizer.decode(ids, skip_special_tokens=True).replace("\n", " ").strip() == sampled[0]
