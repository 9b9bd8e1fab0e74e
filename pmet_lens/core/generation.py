"""Batched, seeded top-k sampling, as ROME's ``generate_fast`` does for the generation metrics.

ROME/MEMIT generate one text per CounterFact generation prompt with top-k sampling (k = 5) until the
sequence holds ``max_out_len = 100`` tokens **including the prompt**, and score the decoded text
prompt included (``rome/util/generate.py``). This module does the same on a hooked model, many
prompts at a time: prompts are left-padded, decoded with TransformerLens's key-value cache and an
attention mask (rotary/absolute positions follow the mask, so a padded row computes what it would
alone, up to float rounding).

Sampling is reproducible and independent of batching: prompt ``i`` draws its random numbers from its
own ``torch.Generator`` seeded with ``seed + i``.
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Callable, Sequence

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

from pmet_lens.core.batching import run_halving
from pmet_lens.core.readout import final_logits
from pmet_lens.core.tokens import decode_text, encode, pad_id, tokenizer_of

logger = logging.getLogger(__name__)

__all__ = ["decode", "sample_texts", "top_k_sample"]


def top_k_sample(
    logits: Float[torch.Tensor, "batch vocab"], k: int, generators: Sequence[torch.Generator]
) -> torch.Tensor:
    """One token per row from the renormalised top-``k`` softmax (ROME ``generate_fast``).

    Row ``i`` uses ``generators[i]`` (a CPU generator), so its draw does not depend on the others.
    """
    probs = logits.float().softmax(-1)
    top_p, top_i = probs.topk(k, dim=-1)
    top_p = (top_p / top_p.sum(-1, keepdim=True)).cpu()
    u = torch.stack([torch.rand((), generator=g) for g in generators])
    cdf = top_p.cumsum(-1)
    choice = (cdf < u[:, None]).sum(-1).clamp(max=k - 1)
    return top_i.cpu().gather(-1, choice[:, None])[:, 0]


def sample_texts(
    model: HookedTransformer,
    prompts: Sequence[str],
    *,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    stop_at_eos: bool = True,
    progress: bool = False,
    max_tokens: int = 16384,
) -> list[str]:
    """Generate one text per prompt and return ``prompt ⊕ continuation`` decoded (as ROME scores it).

    Args:
        model: any hooked model (hooks already attached stay active during decoding).
        prompts: the prompt texts.
        max_length: total tokens per sequence, prompt included (ROME's ``max_out_len``).
        top_k: sample among the ``k`` most probable tokens.
        seed: base seed; prompt ``i`` uses ``seed + i``.
        batch_size: prompts decoded together.
        stop_at_eos: end a row at the tokenizer's EOS token (the EOS is not decoded).
        progress: tqdm bar over batches.
        max_tokens: token budget of a batch, ``rows x max_length`` (at least one row); a batch that
            meets a CUDA out-of-memory error is halved and retried
            (:func:`~pmet_lens.core.batching.run_halving`), with the same draws (each prompt's
            generator is seeded again).
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    ids = [encode(model, p) for p in prompts]
    out: list[str | None] = [None] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    eos = tokenizer_of(model).eos_token_id if stop_at_eos else None
    per_batch = max(1, min(batch_size, max_tokens // max(1, max_length)))
    chunks = [order[s : s + per_batch] for s in range(0, len(order), per_batch)]

    def generate(rows: Sequence[int]) -> None:
        new_tokens = _sample_batch(model, [ids[i] for i in rows], [seed + i for i in rows], max_length, top_k, eos)
        for i, new in zip(rows, new_tokens):
            out[i] = decode_text(model, ids[i] + new, skip_special_tokens=True)

    run_halving(tqdm(chunks, desc="generating", disable=not progress, leave=False), generate, what="generation")
    return out  # type: ignore[return-value]


def _sample_batch(
    model: HookedTransformer,
    seqs: list[list[int]],
    seeds: list[int],
    max_length: int,
    top_k: int,
    eos: int | None,
) -> list[list[int]]:
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    budget = [max(0, max_length - len(s)) for s in seqs]
    return decode(model, seqs, budget, partial(top_k_sample, k=top_k, generators=generators), eos)


def decode(
    model: HookedTransformer,
    seqs: list[list[int]],
    budget: list[int],
    pick: Callable[[Float[torch.Tensor, "batch vocab"]], torch.Tensor],
    eos: int | None = None,
) -> list[list[int]]:
    """The one key-value-cached decoding loop: up to ``budget[r]`` new tokens after ``seqs[r]``.

    Rows are left-padded and decoded together with an attention mask; every step calls
    ``pick(last_logits)`` for the next token of each row (a CPU tensor ``[batch]``), also for rows
    that have finished, so a row's draws never depend on when the others stop. A row ends at its
    budget or at ``eos`` (not appended). Returns the new tokens of each row. The blocks run to the
    final residual stream and only each row's last position is read out (:func:`~pmet_lens.core.readout.final_logits`),
    so the prompt's forward holds no ``[batch, pos, d_vocab]`` logits.
    """
    device = model.cfg.device
    b = len(seqs)
    width = max(len(s) for s in seqs)
    tokens = torch.full((b, width), pad_id(model), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    for r, s in enumerate(seqs):
        tokens[r, width - len(s) :] = torch.tensor(s)
        mask[r, width - len(s) :] = 1
    new: list[list[int]] = [[] for _ in range(b)]
    done = [n == 0 for n in budget]
    if all(done):
        return new
    cache = TransformerLensKeyValueCache.init_cache(model.cfg, device, b)
    with torch.no_grad():
        resid = model(tokens.to(device), attention_mask=mask.to(device), past_kv_cache=cache,
                      stop_at_layer=model.cfg.n_layers)  # [b, width, d_model]
        logits = final_logits(model, resid[:, -1])  # [b, d_vocab]
        for _ in range(max(budget)):
            nxt = pick(logits)
            for r in range(b):
                if done[r]:
                    continue
                tok = int(nxt[r])
                if eos is not None and tok == eos:
                    done[r] = True
                    continue
                new[r].append(tok)
                if len(new[r]) >= budget[r]:
                    done[r] = True
            if all(done):
                break
            step_mask = torch.ones((b, 1), dtype=torch.long, device=device)
            resid = model(nxt[:, None].to(device), attention_mask=step_mask, past_kv_cache=cache,
                          stop_at_layer=model.cfg.n_layers)  # [b, 1, d_model]
            logits = final_logits(model, resid[:, -1])
    return new
