"""Context prefixes sampled from the model itself (MEMIT ``get_context_templates``; PMET eq. 9's pref_j).

The official code generates 5 texts of 10 tokens started from "The", "Therefore", "Because",
"I", "You" with top-k (k = 5) sampling, removes braces and appends ". {}". Here the sampling
uses a seeded ``torch.Generator`` (reproducible, no global RNG touched). Each prefix is decoded
alone (one row, so no padding) by :func:`pmet_lens.core.generation.decode` with TransformerLens's
key-value cache: a new token costs a forward of that one token, not of the whole sequence, and the
logits are those of the full forward up to float rounding, so the draws (and the prefixes) are those
of the uncached loop.
"""

from __future__ import annotations

from functools import partial

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.generation import decode
from pmet_lens.core.tokens import decode_text, encode
from pmet_lens.editing.hparams import EditHyperParams

__all__ = ["context_prefixes", "context_templates"]


def context_prefixes(model: HookedTransformer, hparams: EditHyperParams, top_k: int = 5) -> tuple[str, ...]:
    """The prefix texts pref_j (without the trailing ". "): ``hparams.context_prefixes`` if set,
    else ``prefixes_per_start`` samples of ``prefix_len`` tokens from each start word."""
    if hparams.context_prefixes is not None:
        return hparams.context_prefixes
    gen = torch.Generator(device="cpu").manual_seed(hparams.seed)
    pick = partial(_top_k_multinomial, k=top_k, generator=gen)
    out = []
    for start in hparams.prefix_starts:
        for _ in range(hparams.prefixes_per_start):
            ids = encode(model, start)
            ids += decode(model, [ids], [hparams.prefix_len], pick)[0]
            text = decode_text(model, ids, skip_special_tokens=True)
            out.append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() or start)
    return tuple(out)


def _top_k_multinomial(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """The official code's draw: a multinomial over the softmax of the top-``k`` logits of each row,
    all rows sharing one generator (so the prefixes depend on their order, as there)."""
    top = torch.topk(logits.float().cpu(), k=min(k, logits.shape[-1]), dim=-1)
    choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
    return top.indices.gather(-1, choice)[:, 0]


def context_templates(prefixes: tuple[str, ...]) -> list[str]:
    """Templates ``["{}", "pref_1. {}", ...]`` (the bare prompt first, as the official code)."""
    return ["{}"] + [p + ". {}" for p in prefixes]
