"""Batches that shrink when the accelerator runs out of memory.

Evaluation, perplexity, generation and causal tracing plan their forwards by a token budget; a long
run can still meet a batch that does not fit (a long prompt, memory taken by another process). On a
CUDA out-of-memory error (``torch.cuda.OutOfMemoryError``) :func:`run_halving` frees the allocator's
cached blocks, halves the number of items per forward and retries the failed batch, then keeps the
smaller size for the rest of the call, logging each halving. A batch of one item that does not fit
re-raises the error.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterable, Sequence, TypeVar

import torch

logger = logging.getLogger(__name__)

__all__ = ["run_halving"]

T = TypeVar("T")


def run_halving(batches: Iterable[Sequence[T]], fn: Callable[[Sequence[T]], None], *, what: str) -> int:
    """Call ``fn`` on each batch of ``batches`` in order, split into parts of at most the current
    size; on ``torch.cuda.OutOfMemoryError`` halve that size and retry the part that failed.

    ``fn`` must leave no partial result behind when it raises (it is called again on the same
    items): write results only after its forward has succeeded.

    Args:
        batches: the planned batches (e.g. by a token budget), each a sequence of items (iterated once).
        fn: processes one batch of items.
        what: the stage's name, for the log message.

    Returns:
        The largest batch size in use at the end (the planned one if nothing was halved).

    Raises:
        torch.cuda.OutOfMemoryError: a batch of a single item does not fit.
    """
    cap: int | None = None
    planned = 0
    for batch in batches:
        items = list(batch)
        planned = max(planned, len(items))
        i = 0
        while i < len(items):
            size = len(items) - i if cap is None else min(cap, len(items) - i)
            part = items[i:i + size]
            try:
                fn(part)
            except torch.cuda.OutOfMemoryError:
                if size <= 1:
                    raise
                cap = size // 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                logger.warning("%s: CUDA out of memory on a batch of %d; retrying with batches of at most %d",
                               what, size, cap)
                continue
            i += size
    return cap if cap is not None else planned
