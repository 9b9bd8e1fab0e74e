"""Context prefixes sampled from the model itself (MEMIT ``get_context_templates``; PMET eq. 9's pref_j;
ROME's ``get_context_templates``), and the groups a key is averaged over.

The official MEMIT / PMET code generates 5 texts of 10 tokens started from "The", "Therefore",
"Because", "I", "You" with top-k (k = 5) sampling, removes braces and appends ". {}"; ROME samples
10 texts of 5 tokens and 10 of 10 after its BOS token (one group of prefixes per length). Here the sampling
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
from pmet_lens.core.tokens import decode_text, encode, tokenizer_of
from pmet_lens.editing.hparams import EditHyperParams

__all__ = ["context_prefixes", "context_templates", "template_groups"]


def context_prefixes(model: HookedTransformer, hparams: EditHyperParams, top_k: int = 5) -> tuple[str, ...]:
    """The prefix texts pref_j (without the trailing ". "): ``hparams.context_prefixes`` if set,
    else for each length n of ``hparams.prefix_lengths`` in turn (one group per length),
    ``prefixes_per_start`` samples of n tokens after each start word (``""``: after the BOS token
    alone, as ROME samples after ``<|endoftext|>``)."""
    if hparams.context_prefixes is not None:
        return hparams.context_prefixes
    gen = torch.Generator(device="cpu").manual_seed(hparams.seed)
    pick = partial(_top_k_multinomial, k=top_k, generator=gen)
    out = []
    for length in hparams.prefix_lengths:
        for start in hparams.prefix_starts:
            for _ in range(hparams.prefixes_per_start):
                ids = encode(model, start) if start else [_bos_id(model)]
                ids += decode(model, [ids], [length], pick)[0]
                text = decode_text(model, ids, skip_special_tokens=True)
                out.append(text.replace("{", " ").replace("}", " ").replace("\n", " ").strip() or start or ".")
    return tuple(out)


def template_groups(hparams: EditHyperParams, n_prefixes: int) -> tuple[tuple[int, ...], ...]:
    """Indices of the context templates (0 = the bare prompt, j = prefix j) per group a key is averaged
    over (:func:`pmet_lens.editing.keys.prefix_mean`: the mean within each group, then over the groups).

    ``key_average="uniform"`` (ROME's ``compute_u``): one group of every template. ``"groups"`` (MEMIT's
    and PMET's ``compute_ks``): the bare prompt, then one group per prefix length when the
    ``n_prefixes`` prefixes are the sampled ones (``len(prefix_starts) · prefixes_per_start`` per
    length, in :func:`context_prefixes`'s order), else one group of all prefixes.
    """
    every = tuple(range(n_prefixes + 1))
    if hparams.key_average == "uniform" or n_prefixes == 0:
        return (every,)
    lengths = hparams.prefix_lengths
    per_group = len(hparams.prefix_starts) * hparams.prefixes_per_start
    if len(lengths) > 1 and per_group > 0 and n_prefixes == per_group * len(lengths):
        return ((0,), *(tuple(range(1 + g * per_group, 1 + (g + 1) * per_group)) for g in range(len(lengths))))
    return ((0,), every[1:])


def _bos_id(model: HookedTransformer) -> int:
    """The token a prefix sampled from ``""`` starts after: the tokenizer's BOS (else its EOS) token."""
    tok = tokenizer_of(model)
    for candidate in (tok.bos_token_id, tok.eos_token_id):
        if candidate is not None:
            return int(candidate)
    raise ValueError("prefix_starts contains '' (sample after the BOS token) but the tokenizer has neither a BOS "
                     "nor an EOS token: name start words instead")


def _top_k_multinomial(logits: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """The official code's draw: a multinomial over the softmax of the top-``k`` logits of each row,
    all rows sharing one generator (so the prefixes depend on their order, as there)."""
    top = torch.topk(logits.float().cpu(), k=min(k, logits.shape[-1]), dim=-1)
    choice = torch.multinomial(torch.softmax(top.values, dim=-1), 1, generator=generator)
    return top.indices.gather(-1, choice)[:, 0]


def context_templates(prefixes: tuple[str, ...]) -> list[str]:
    """Templates ``["{}", "pref_1. {}", ...]`` (the bare prompt first, as the official code)."""
    return ["{}"] + [p + ". {}" for p in prefixes]
