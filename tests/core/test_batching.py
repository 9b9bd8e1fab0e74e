"""run_halving (pmet_lens.core.batching): halve the batch on a CUDA out-of-memory error and retry."""

from __future__ import annotations

import logging

import pytest
import torch

from pmet_lens.core.batching import run_halving


def test_halves_and_retries_until_the_batches_fit(caplog):
    seen: list[list[int]] = []
    done: list[int] = []

    def fn(items):
        seen.append(list(items))
        if len(items) > 3:  # a "device" that holds 3 items
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        done.extend(items)

    with caplog.at_level(logging.WARNING, logger="pmet_lens.core.batching"):
        cap = run_halving([list(range(0, 10)), list(range(10, 14))], fn, what="test")
    assert done == list(range(14))  # every item once, in order
    assert seen[:3] == [list(range(10)), list(range(5)), [0, 1]]  # 10 -> 5 -> 2 rows
    assert max(len(s) for s in seen[3:]) == 2 and cap == 2  # the smaller size is kept for the rest
    assert caplog.text.count("out of memory") == 2 and "at most 5" in caplog.text and "at most 2" in caplog.text


def test_nothing_halved_keeps_the_plan_and_a_single_item_reraises():
    calls: list[int] = []
    assert run_halving([[1, 2], [3]], lambda items: calls.extend(items), what="test") == 2
    assert calls == [1, 2, 3]

    def never(items):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")

    with pytest.raises(torch.cuda.OutOfMemoryError):
        run_halving([[1, 2, 3]], never, what="test")
    with pytest.raises(ValueError):  # other errors pass through untouched
        run_halving([[1]], lambda items: (_ for _ in ()).throw(ValueError("bad")), what="test")
