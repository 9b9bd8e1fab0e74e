"""Batched scoring of continuations: log P(target | prompt) for many (prompt, target) pairs.

This is the probability test under every CounterFact / zsRE metric (ROME ``compute_rewrite_quality_*``,
MEMIT Appendix C): the model reads ``prompt ⊕ target`` once, teacher-forced, and each target token
``t_j`` is scored from the logits at the position before it. The probability of a multi-token
object is taken from its **mean token log-probability** (ROME/MEMIT report the mean token NLL), and
the zsRE top-1 test asks, per target token, whether ``argmax`` of those logits equals ``t_j``.

All pairs run in a few right-padded forwards (sorted by length, so little padding is wasted), and
pairs with the same teacher-forced token sequence share one row: CounterFact asks for P(o*) and P(o^c)
after the same prompt, and where both objects are single tokens that is one forward instead of two.
:func:`score_next_tokens` scores one token after each of many contexts that need not extend each
other (the official zsRE procedure), reading a context that is a prefix of another from the longer
one's forward. Only the scored positions are projected on the vocabulary: the blocks run with
``stop_at_layer=n_layers``; the final norm and unembedding are applied to the gathered rows, a chunk
at a time, with a float32 log-sum-exp (:func:`pmet_lens.core.readout.label_logprobs`). Forwards are
planned by a token budget (``max_tokens``) and halved on a CUDA out-of-memory error
(:func:`pmet_lens.core.batching.run_halving`). Hooks a caller has added to the model (an edit
previewed as hooks) fire as usual.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Sequence

import torch
from jaxtyping import Bool, Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.core.batching import run_halving
from pmet_lens.core.readout import final_logits, label_logprobs
from pmet_lens.core.tokens import encode, pad, target_ids

logger = logging.getLogger(__name__)

__all__ = ["ContinuationScores", "score_continuations", "score_next_tokens", "score_token_ids"]


@dataclass(frozen=True)
class ContinuationScores:
    """Scores of ``n`` (prompt, target) pairs.

    Attributes:
        mean_logprob: ``[n]`` mean over the target's tokens of ``log P(t_j | prompt, t_<j)``;
            ``exp`` of it is the "probability of the object" of ROME/MEMIT.
        token_correct: ``n`` bool tensors ``[len(target_i)]``: whether the top-1 token at each
            teacher-forced position is the target token (MEMIT Appendix C.1, zsRE).
    """

    mean_logprob: Float[torch.Tensor, " n"]
    token_correct: list[Bool[torch.Tensor, " target_len"]]

    @property
    def prob(self) -> Float[torch.Tensor, " n"]:
        """``exp(mean_logprob)``: the objects' probabilities as ROME/MEMIT define them."""
        return self.mean_logprob.exp()

    @property
    def token_accuracy(self) -> Float[torch.Tensor, " n"]:
        """Per pair, the fraction of target tokens predicted top-1 (MEMIT's zsRE accuracy)."""
        return torch.stack([c.float().mean() for c in self.token_correct]) if self.token_correct else torch.zeros(0)


def score_continuations(
    model: HookedTransformer,
    prompts: Sequence[str],
    targets: Sequence[str],
    *,
    batch_size: int = 64,
    max_tokens: int = 4096,
    progress: bool = False,
) -> ContinuationScores:
    """Score each ``targets[i]`` as the continuation of ``prompts[i]`` in batched forwards.

    Targets get a leading space as in ROME/MEMIT (:func:`pmet_lens.core.tokens.target_ids`); prompts are
    tokenised exactly as ``model.to_tokens`` does (:func:`pmet_lens.core.tokens.encode`).

    Args:
        model: any hooked model (hooks already attached stay active).
        prompts: the ``n`` prompt texts.
        targets: the ``n`` target strings (same length as ``prompts``).
        batch_size: most rows per forward.
        max_tokens: most ``rows x width`` tokens per forward (bounds memory on long prompts).
        progress: show a tqdm bar over the forwards.

    Raises:
        ValueError: if the lists differ in length or a prompt/target is empty.
    """
    if len(prompts) != len(targets):
        raise ValueError(f"got {len(prompts)} prompts but {len(targets)} targets")
    prompt_cache: dict[str, list[int]] = {}
    target_cache: dict[str, list[int]] = {}
    for p in prompts:
        if p not in prompt_cache:
            prompt_cache[p] = encode(model, p)
    for t in targets:
        if t not in target_cache:
            target_cache[t] = target_ids(model, t)
    p_ids = [prompt_cache[p] for p in prompts]
    t_ids = [target_cache[t] for t in targets]
    return score_token_ids(model, p_ids, t_ids, batch_size=batch_size, max_tokens=max_tokens, progress=progress)


def score_token_ids(
    model: HookedTransformer,
    prompt_ids: Sequence[Sequence[int]],
    target_token_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 64,
    max_tokens: int = 4096,
    progress: bool = False,
) -> ContinuationScores:
    """:func:`score_continuations` on token ids (prompt ids already include any BOS)."""
    n = len(prompt_ids)
    if n != len(target_token_ids):
        raise ValueError(f"got {n} prompts but {len(target_token_ids)} targets")
    if n == 0:
        return ContinuationScores(mean_logprob=torch.zeros(0), token_correct=[])
    if any(len(p) == 0 for p in prompt_ids) or any(len(t) == 0 for t in target_token_ids):
        raise ValueError("every prompt and every target needs at least one token")
    # Pairs whose teacher-forced sequences are identical share one row (e.g. a prompt scored for a
    # single-token o* and a single-token o^c: both sequences are the prompt alone).
    rows_of: dict[tuple[int, ...], list[int]] = {}  # sequence -> the pairs it serves
    for i, (p, t) in enumerate(zip(prompt_ids, target_token_ids)):
        rows_of.setdefault(tuple(p) + tuple(t[:-1]), []).append(i)
    seqs, pairs_of = list(rows_of), list(rows_of.values())
    batches = _plan_batches([len(q) for q in seqs], batch_size, max_tokens)

    mean_lp: list[torch.Tensor | None] = [None] * n
    correct: list[torch.Tensor | None] = [None] * n

    def score(rows: Sequence[int]) -> None:
        batch = pad(model, [list(seqs[u]) for u in rows])
        resid = model(batch.tokens, stop_at_layer=model.cfg.n_layers)  # [b, pos, d_model]
        # each (row, position) is read out once, however many pairs score a token there
        where: dict[tuple[int, int], int] = {}  # (row, position) -> index into the read-out
        slots, labels, owners = [], [], []
        for r, u in enumerate(rows):
            for i in pairs_of[u]:
                start = len(prompt_ids[i]) - 1
                for j, tok in enumerate(target_token_ids[i]):
                    slots.append(where.setdefault((r, start + j), len(where)))
                    labels.append(tok)
                owners.append((i, len(target_token_ids[i])))
        device = resid.device
        row_idx, pos_idx = (torch.tensor(c, device=device) for c in zip(*where))
        slot_t = torch.tensor(slots, device=device)
        logp, top1 = _read_out(model, resid[row_idx, pos_idx], slot_t, torch.tensor(labels, device=device))
        logp, top1 = logp.cpu(), top1.cpu()  # one transfer per batch
        offset = 0
        for i, length in owners:
            mean_lp[i] = logp[offset : offset + length].mean()
            correct[i] = top1[offset : offset + length]
            offset += length

    with torch.no_grad():
        run_halving(tqdm(batches, desc="scoring", disable=not progress, leave=False), score, what="scoring")
    return ContinuationScores(mean_logprob=torch.stack(mean_lp), token_correct=list(correct))  # type: ignore[arg-type]


def score_next_tokens(
    model: HookedTransformer,
    contexts: Sequence[Sequence[int]],
    next_ids: Sequence[int],
    *,
    batch_size: int = 64,
    max_tokens: int = 4096,
    progress: bool = False,
) -> ContinuationScores:
    """Score one token after each context: ``log P(next_ids[i] | contexts[i])`` and whether it is top-1.

    Each context is read at its own last position, so a context need not extend another's tokens
    (the official zsRE procedure re-tokenises every prefix). A context that is a token prefix of a
    longer one is read from the longer one's forward at its last position (with causal attention the
    logits there depend on the tokens up to it only): the contexts of an answer whose prefixes
    re-tokenise stably cost one row. Returned ``token_correct`` entries have one element each.

    Raises:
        ValueError: if the lists differ in length or a context is empty.
    """
    n = len(contexts)
    if n != len(next_ids):
        raise ValueError(f"got {n} contexts but {len(next_ids)} next tokens")
    if n == 0:
        return ContinuationScores(mean_logprob=torch.zeros(0), token_correct=[])
    if any(len(c) == 0 for c in contexts):
        raise ValueError("every context needs at least one token")
    unique = sorted({tuple(c) for c in contexts}, key=len, reverse=True)
    read_at: dict[tuple[int, ...], tuple[int, int]] = {}  # context -> (row, position) that computes it
    seqs: list[tuple[int, ...]] = []
    for c in unique:
        if c in read_at:  # a prefix of a longer row
            continue
        for end in range(len(c), 0, -1):
            read_at.setdefault(c[:end], (len(seqs), end - 1))
        seqs.append(c)
    items_of: dict[int, list[int]] = {}  # row -> the items read from it
    for i, ctx in enumerate(contexts):
        items_of.setdefault(read_at[tuple(ctx)][0], []).append(i)

    logp_of = torch.empty(n)
    correct_of = torch.empty(n, dtype=torch.bool)

    def score(rows: Sequence[int]) -> None:
        where: dict[tuple[int, int], int] = {}  # (batch row, position) -> index into the read-out
        slots, labels, owners = [], [], []
        for r, u in enumerate(rows):
            for i in items_of.get(u, []):
                slots.append(where.setdefault((r, read_at[tuple(contexts[i])][1]), len(where)))
                labels.append(int(next_ids[i]))
                owners.append(i)
        if not owners:
            return
        batch = pad(model, [list(seqs[u]) for u in rows])
        resid = model(batch.tokens, stop_at_layer=model.cfg.n_layers)  # [b, pos, d_model]
        device = resid.device
        row_idx, pos_idx = (torch.tensor(c, device=device) for c in zip(*where))
        logp, top1 = _read_out(model, resid[row_idx, pos_idx], torch.tensor(slots, device=device),
                               torch.tensor(labels, device=device))
        owner_t = torch.tensor(owners)
        logp_of[owner_t] = logp.cpu()
        correct_of[owner_t] = top1.cpu()

    with torch.no_grad():
        run_halving(tqdm(_plan_batches([len(q) for q in seqs], batch_size, max_tokens),
                         desc="scoring", disable=not progress, leave=False), score, what="scoring")
    return ContinuationScores(mean_logprob=logp_of, token_correct=[correct_of[i : i + 1] for i in range(n)])


def _plan_batches(lengths: Sequence[int], batch_size: int, max_tokens: int) -> list[list[int]]:
    """Rows grouped into forwards, longest first: at most ``batch_size`` rows and about
    ``max_tokens`` tokens (rows x the widest row) per forward."""
    order = sorted(range(len(lengths)), key=lambda u: -lengths[u])
    batches: list[list[int]] = []
    current: list[int] = []
    for u in order:
        width = lengths[current[0]] if current else lengths[u]
        if current and (len(current) >= batch_size or (len(current) + 1) * width > max_tokens):
            batches.append(current)
            current = []
        current.append(u)
    if current:
        batches.append(current)
    return batches


def _read_out(model: HookedTransformer, resid: Float[torch.Tensor, "n d_model"], slots: torch.Tensor,
              labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``log P(labels[k])`` and top-1 flags of the scored tokens, token ``k`` read at the gathered
    residual row ``slots[k]``, each row read out once (:func:`pmet_lens.core.readout.label_logprobs`:
    the read-out in chunks of rows, float32 log-sum-exp)."""
    return label_logprobs(model, resid, labels, slots, readout=_unembed)


def _unembed(model: HookedTransformer, resid: Float[torch.Tensor, "n d_model"]) -> Float[torch.Tensor, "n d_vocab"]:
    """The model's read-out of gathered residual rows (:func:`pmet_lens.core.readout.final_logits`)."""
    return final_logits(model, resid)
