"""The 95% confidence interval every table and figure of the package reports.

The interval is the normal approximation ``mean ± z · s / √n`` with ``z = 1.96``, ``s`` the sample
standard deviation (``ddof = 1``) and ``n`` the number of finite values (ROME, MEMIT and PMET
report their means with this "95% confidence interval").

Behaviour at small ``n`` (one rule for every caller):

* ``n = 0``: mean and half-width are NaN (nothing to average);
* ``n = 1``: the mean is the value and the half-width is NaN: ``s`` is undefined for a single
  value, so there is no interval (a zero width would claim a certainty the data do not give).
  Tables print such a mean without an interval and plots draw no band.

Non-finite values (NaN, ±inf, ``None``) are skipped: they mark a measurement that was not
taken (for example a record without generation prompts), not a value.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Sequence, overload

import numpy as np
import pandas as pd
import torch

__all__ = ["Z95", "mean_ci95", "paired_ci95"]

Z95 = 1.96
"""Two-sided 95% quantile of the standard normal distribution (1.95996...), to two decimals."""


@overload
def mean_ci95(values: torch.Tensor | np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@overload
def mean_ci95(values: Iterable[float | None]) -> tuple[float, float]: ...


def mean_ci95(values: Any) -> tuple[Any, Any]:
    """Mean and 95% half-width ``Z95 · s / √n`` over the first axis, skipping non-finite values.

    Args:
        values: a tensor or array ``[n, *shape]`` (samples along the first axis), or any iterable
            of numbers (a list, a pandas Series; ``None`` counts as missing).

    Returns:
        ``(mean, half_width)``: float64 arrays of ``shape`` for a tensor / array (0-d for a 1-D
        one), plain floats for any other iterable. ``n`` counts the finite values of each
        element separately; see the module docstring for ``n = 0`` and ``n = 1``.
    """
    if isinstance(values, torch.Tensor):
        arr = values.detach().to("cpu", torch.float64).numpy()
    elif isinstance(values, np.ndarray):
        arr = values.astype(np.float64)
    else:
        flat = np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)
        mean, half = _mean_half(flat[np.isfinite(flat)])
        return float(mean), float(half)
    if arr.ndim == 0:
        raise ValueError("mean_ci95 needs samples along a first axis, got a 0-d value")
    return _mean_half(arr)


def paired_ci95(a: pd.DataFrame, b: pd.DataFrame, columns: Sequence[str], on: str = "case_id") -> pd.DataFrame:
    """Paired differences ``a − b`` of per-record results on the same records: for each column, the
    mean of the per-record differences and its 95% half-width (:func:`mean_ci95` of the differences).

    A paired interval is the one to read when two methods were scored on the same cases: the
    between-case spread, which both share, cancels, so it is narrower than either method's own.

    Args:
        a: per-record results of one method, one row per record, with an ``on`` column.
        b: the same for the method it is compared with.
        columns: the metric columns to compare (present in both).
        on: the column that identifies a record in both tables.

    Returns:
        One row per column: ``metric``, ``n`` (records in both with a finite difference),
        ``difference`` (mean of a − b) and ``ci95`` (half-width).

    Raises:
        ValueError: a column missing from either table, or ``on`` repeated within one.
    """
    for name, t in (("a", a), ("b", b)):
        missing = [c for c in (on, *columns) if c not in t.columns]
        if missing:
            raise ValueError(f"paired_ci95: table {name} has no column(s) {missing}")
        if t[on].duplicated().any():
            raise ValueError(f"paired_ci95: table {name} repeats records in {on!r}; pair one row per record")
    both = a[[on, *columns]].merge(b[[on, *columns]], on=on, suffixes=("_a", "_b"))
    rows = []
    for c in columns:
        diff = (both[f"{c}_a"] - both[f"{c}_b"]).to_numpy(dtype=np.float64)
        mean, half = mean_ci95(diff)
        rows.append({"metric": c, "n": int(np.isfinite(diff).sum()), "difference": float(mean), "ci95": float(half)})
    return pd.DataFrame(rows)


def _mean_half(arr: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and half-width over axis 0, per element over its finite values."""
    finite = np.isfinite(arr)
    n = finite.sum(axis=0)
    x = np.where(finite, arr, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = x.sum(axis=0) / n  # NaN where n = 0
        dev = np.where(finite, arr - mean, 0.0)
        var = (dev * dev).sum(axis=0) / (n - 1)
        half = Z95 * np.sqrt(var) / np.sqrt(n)
    return np.where(n > 0, mean, np.nan), np.where(n > 1, half, np.nan)
