"""The 95% confidence interval shared by the evaluation tables (MEMIT / PMET "95% confidence interval").

The evaluations themselves live in :mod:`pmet_lens.evaluation.counterfact` and
:mod:`pmet_lens.evaluation.zsre`, the papers' tables in :mod:`pmet_lens.evaluation.tables`.
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np

__all__ = ["mean_ci95"]


def mean_ci95(values: Iterable[float]) -> tuple[float, float]:
    """Mean and 95% half-width 1.96·s/√n of the finite values (half-width 0 for n < 2; NaN mean if empty)."""
    arr = np.asarray([v for v in values if v is not None and np.isfinite(v)], dtype=np.float64)
    if arr.size == 0:
        return float("nan"), float("nan")
    half = 1.96 * arr.std(ddof=1) / math.sqrt(arr.size) if arr.size > 1 else 0.0
    return float(arr.mean()), float(half)
