"""Context prefixes sampled from the model itself (MEMIT ``get_context_templates``; PMET eq. 9's pref_j).

The official code generates 5 texts of 10 tokens started from "The", "Therefore", "Because",
"I", "You" with top-k (k = 5) sampling, removes braces and appends ". {}". Here the sampling
uses a seeded ``torch.Generator`` (reproducible, no global RNG touched). Each prefix is decoded
alone (one row, so no padding) with TransformerLens's key-value cache: a new token costs a forward
of that one token, not of the whole sequence, and the logits are those of the full forward up to
float rounding, so the draws (and the prefixes) are those of the uncached loop.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from pmet_lens.editing.hparams import EditHyperParams
from pmet_lens.tokens import encode

__all__ = ["context_prefixes", "context_templates"]


def context_prefixes(model: HookedTransformer, hparams: EditHyperParams, top_k: int = 5) -> tuple[str, ...]:
    """The prefix texts pref_j (without the trailing ". "): ``hparams.context_prefixes`` if set,
    else ``prefixes_per_start`` samples of ``prefix_len`` tokens from each start word."""
    if hparams.context_prefixes is not None:
        return hparams.context_prefixes
    gen = torch.Generator(device="cpu").manual_seed(hparams.seed)
    device = model.cfg.device
    out = []
    with torch.no_grad():
        for start in hparams.prefix_starts:
            for _ in range(hparams.prefixes_per_start):
                ids = encode(model, start)
                cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, 1)
                step = torch.tensor([ids], device=device)
                for _ in range(hparams.prefix_len):
                    logits = model(step, return_type="logits", past_kv_cache=cache)[0, -1]
                    top = torch.topk(logits.float().cpu(), k=min(top_k, logits.shape[-1]))
                    probs = torch.softmax(top.values, dim=-1)
                    ids.append(int(top.indices[torch.multinomial(probs, 1, generator=gen)]))
                    step = torch.tensor([[ids[-1]]], device=device)
                text = model.tokenizer.decode(ids, skip_special_tokens=True)
                out.append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() or start)
    return tuple(out)


def context_templates(prefixes: tuple[str, ...]) -> list[str]:
    """Templates ``["{}", "pref_1. {}", ...]`` (the bare prompt first, as the official code)."""
    return ["{}"] + [p + ". {}" for p in prefixes]
