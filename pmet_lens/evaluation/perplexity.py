"""General ability as edits accumulate: perplexity of a fixed sample of WikiText-2 test text.

AlphaEdit (section 4.3) tracks general ability with GLUE, which is not available offline; the
perplexity of held-out encyclopaedic text is the offline stand-in used here. The sample is fixed
and deterministic: the article paragraphs (non-blank lines that are not ``= heading =`` lines) of
the shipped ``wiki.test.raw`` in file order, tokenised without special tokens and joined by the
newline token, cut after ``n_tokens`` tokens into windows of ``seq_len`` tokens, each scored
independently (the first token of a window is context only). With the defaults it is the first
8,192 tokens of the test split; the covariance C's default 100k tokens come from the validation
split, which precedes it in the covariance corpus.

    perplexity = exp( Σ_windows Σ_{t ≥ 1} −log P(x_t | x_<t) / #predicted tokens )
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.batching import run_halving
from pmet_lens.core.models import require_model
from pmet_lens.core.readout import label_logprobs
from pmet_lens.core.tokens import tokenizer_of
from pmet_lens.data import data_path

__all__ = ["PerplexitySample", "perplexity", "wikitext_sample", "window_nll"]


@dataclass(frozen=True)
class PerplexitySample:
    """Token windows of a fixed text sample.

    Attributes:
        windows: ``[n_windows, seq_len]`` token ids (every window full length).
        source: where the text came from.
    """

    windows: torch.Tensor
    source: str

    @property
    def n_predicted(self) -> int:
        """Number of scored tokens (all but each window's first)."""
        return int(self.windows.shape[0] * (self.windows.shape[1] - 1))


def _paragraphs(text: str) -> list[str]:
    out = []
    for line in text.split("\n"):
        stripped = line.strip()
        if stripped and not (stripped.startswith("=") and stripped.endswith("=")):
            out.append(stripped)
    return out


def wikitext_sample(
    model: HookedTransformer,
    n_tokens: int = 8192,
    seq_len: int = 256,
    path: str | Path | None = None,
) -> PerplexitySample:
    """The fixed sample (see the module docstring) tokenised for ``model``.

    Raises:
        ValueError: ``n_tokens`` < ``seq_len``, ``seq_len`` < 2 or above the model's context, or a
            text with fewer than ``n_tokens`` tokens.
    """
    require_model(model, "pmet_lens.evaluation.perplexity.wikitext_sample")
    if not (isinstance(seq_len, int) and 2 <= seq_len <= model.cfg.n_ctx):
        raise ValueError(f"seq_len must be an int in [2, n_ctx={model.cfg.n_ctx}], got {seq_len!r}")
    if not (isinstance(n_tokens, int) and n_tokens >= seq_len):
        raise ValueError(f"n_tokens must be an int >= seq_len ({seq_len}), got {n_tokens!r}")
    source = Path(path) if path is not None else data_path("wiki.test.raw")
    tok = tokenizer_of(model)
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    ids: list[int] = []
    for para in _paragraphs(source.read_text(encoding="utf-8")):
        ids.extend(tok(para, add_special_tokens=False)["input_ids"])
        ids.extend(newline)
        if len(ids) >= n_tokens:
            break
    if len(ids) < n_tokens:
        raise ValueError(f"{source} has {len(ids)} tokens of article text, fewer than n_tokens={n_tokens}")
    n_windows = n_tokens // seq_len
    flat = torch.tensor(ids[:n_windows * seq_len], dtype=torch.long, device=model.cfg.device)
    return PerplexitySample(windows=flat.reshape(n_windows, seq_len), source=source.name)  # [windows, seq_len]


def window_nll(model: HookedTransformer, windows: torch.Tensor, batch_size: int = 8,
               hooks: Sequence[tuple[str | Callable[..., Any], Callable[..., Any]]] = (), *,
               max_tokens: int = 4096) -> float:
    """Σ −log P(x_t | x_<t) over the predicted tokens of ``windows`` (``[n, seq_len]`` token ids; all but
    each window's first token), summed in float64 in window order: one shard of :func:`perplexity`.

    Each forward takes at most ``batch_size`` windows and ``max_tokens`` tokens (at least one
    window); the blocks run to the final residual stream and the read-out is taken a chunk of
    positions at a time (:func:`~pmet_lens.core.readout.label_logprobs`), so no
    ``[batch, pos, d_vocab]`` logits are held. On a CUDA out-of-memory error the batch is halved and
    retried (:func:`~pmet_lens.core.batching.run_halving`)."""
    require_model(model, "pmet_lens.evaluation.perplexity.window_nll")
    windows = windows.to(model.cfg.device)
    n_windows, seq_len = windows.shape
    per_batch = max(1, min(batch_size, max_tokens // seq_len))
    batches = [list(range(s, min(s + per_batch, n_windows))) for s in range(0, n_windows, per_batch)]
    sums: dict[int, float] = {}

    def score(rows: Sequence[int]) -> None:
        tokens = windows[rows[0]:rows[-1] + 1]  # consecutive windows [b, seq]
        resid = model(tokens, stop_at_layer=model.cfg.n_layers)  # [b, seq, d_model]
        flat = resid[:, :-1].reshape(-1, resid.shape[-1])  # [b, seq-1, d] -> [b*(seq-1), d]
        logp, _ = label_logprobs(model, flat, tokens[:, 1:].reshape(-1))
        sums[rows[0]] = float(-logp.double().sum())

    with torch.no_grad(), model.hooks(fwd_hooks=list(hooks)):
        run_halving(batches, score, what="perplexity")
    total = 0.0
    for k in sorted(sums):
        total += sums[k]
    return total


def perplexity(
    model: HookedTransformer,
    sample: PerplexitySample | None = None,
    batch_size: int = 8,
    hooks: Sequence[tuple[str | Callable[..., Any], Callable[..., Any]]] = (),
    *,
    max_tokens: int = 4096,
    workers: Any = None,
    shard_size: int | None = None,
) -> float:
    """Perplexity of ``model`` (as it is now, optionally with forward ``hooks`` attached for the
    call only) on ``sample`` (default :func:`wikitext_sample`).

    Each forward takes at most ``batch_size`` windows and ``max_tokens`` tokens (at least one
    window); the blocks run to the final residual stream and the read-out is taken a chunk of
    positions at a time (:func:`~pmet_lens.core.readout.label_logprobs`), so no
    ``[batch, pos, d_vocab]`` logits are held. On a CUDA out-of-memory error the batch is halved and
    retried (:func:`~pmet_lens.core.batching.run_halving`).

    ``workers`` (an int or a :class:`~pmet_lens.parallel.Workers` pool) scores shards of
    ``shard_size`` windows (default: whole batches, about four shards per worker) on a pool
    (:func:`window_nll`); their sums are added in window order. Hooks cannot be sent to workers:
    write an edit into the weights to measure it on a pool.
    """
    require_model(model, "pmet_lens.evaluation.perplexity.perplexity")
    if sample is None:
        sample = wikitext_sample(model)
    if workers is None:
        total = window_nll(model, sample.windows, batch_size, hooks, max_tokens=max_tokens)
    else:
        if hooks:
            raise ValueError("perplexity: hooks cannot be sent to workers; write the edit into the weights "
                             "(EditResult.apply) or run without workers")
        from pmet_lens.parallel import auto_shard_size, run_shards, shard_ranges

        n = sample.windows.shape[0]
        size = shard_size or auto_shard_size(n, workers, multiple=batch_size)
        shards = [(sample.windows[a:b].cpu().clone(),) for a, b in shard_ranges(n, size)]  # a view would send it all
        total = sum(run_shards(model, window_nll, shards, common={"batch_size": batch_size, "max_tokens": max_tokens},
                               workers=workers,
                               desc="perplexity windows"))
    return math.exp(total / sample.n_predicted)
