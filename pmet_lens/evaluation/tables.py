"""The papers' reference numbers and the papers-style tables the evaluations are printed in.

Every cell is x100 with the 95% half-width in parentheses (the papers' "95% confidence interval").
The Score is the harmonic mean of the three probability metrics (MEMIT Appendix C; PMET Table 1).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd

__all__ = [
    "PAPER_TABLE1_GPTJ", "PAPER_TABLE2_GPTJ", "PAPER_TABLE3_10K", "PROBABILITY_METRICS", "format_table",
    "harmonic_mean",
]

PROBABILITY_METRICS = ("efficacy", "paraphrase", "neighborhood")
"""CounterFact's probability metrics, in the papers' column order (Table 1)."""

PAPER_TABLE1_GPTJ: dict[str, dict[str, float]] = {
    # PMET Table 1 (10,000 CounterFact edits on GPT-J 6B), x100 as printed.
    "GPT-J": {"score": 22.4, "efficacy": 15.2, "paraphrase": 17.7, "neighborhood": 83.5, "fluency": 622.4, "consistency": 29.4},
    "FT-W": {"score": 67.6, "efficacy": 99.4, "paraphrase": 77.0, "neighborhood": 46.9, "fluency": 293.9, "consistency": 15.9},
    "MEND": {"score": 23.1, "efficacy": 15.7, "paraphrase": 18.5, "neighborhood": 83.0, "fluency": 618.4, "consistency": 31.1},
    "ROME": {"score": 50.3, "efficacy": 50.2, "paraphrase": 50.4, "neighborhood": 50.2, "fluency": 589.6, "consistency": 3.3},
    "MEMIT": {"score": 85.8, "efficacy": 98.9, "paraphrase": 88.6, "neighborhood": 73.7, "fluency": 619.9, "consistency": 40.1},
    "PMET": {"score": 86.2, "efficacy": 99.5, "paraphrase": 92.8, "neighborhood": 71.4, "fluency": 620.0, "consistency": 40.6},
}
"""The papers' GPT-J numbers (PMET Table 1) for side-by-side tables."""

PAPER_TABLE2_GPTJ: dict[str, dict[str, float]] = {
    # PMET Table 2 (10,000 zsRE edits on GPT-J 6B).
    "GPT-J": {"efficacy": 26.4, "paraphrase": 25.8, "specificity": 27.0},
    "FT-W": {"efficacy": 69.6, "paraphrase": 64.8, "specificity": 24.1},
    "MEND": {"efficacy": 19.4, "paraphrase": 18.6, "specificity": 22.4},
    "ROME": {"efficacy": 21.0, "paraphrase": 19.6, "specificity": 0.9},
    "MEMIT": {"efficacy": 96.7, "paraphrase": 89.7, "specificity": 26.6},
    "PMET": {"efficacy": 96.9, "paraphrase": 90.6, "specificity": 26.7},
}
"""The papers' GPT-J zsRE numbers (PMET Table 2)."""


PAPER_TABLE3_10K: dict[str, dict[str, float]] = {
    # PMET Table 3 (PMET's ablations, 10,000 CounterFact edits on GPT-J 6B).
    "PMET": {"score": 86.2, "efficacy": 99.5, "paraphrase": 92.8, "neighborhood": 71.4, "fluency": 620.0, "consistency": 40.6},
    "PMET w/o δ_a": {"score": 85.0, "efficacy": 98.9, "paraphrase": 89.0, "neighborhood": 71.6, "fluency": 621.2, "consistency": 40.0},
    "PMET + W_O^MHSA": {"score": 84.9, "efficacy": 99.5, "paraphrase": 93.5, "neighborhood": 68.6, "fluency": 619.0, "consistency": 40.5},
    "PMET even spread": {"score": 83.3, "efficacy": 96.7, "paraphrase": 78.4, "neighborhood": 77.3, "fluency": 621.8, "consistency": 37.4},
}
"""The papers' GPT-J numbers of PMET's ablations (PMET Table 3)."""


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean (0 if any value is 0, NaN if any is NaN): the papers' Score."""
    if any(not np.isfinite(v) for v in values):
        return float("nan")
    if any(v <= 0 for v in values):
        return 0.0
    return float(len(values) / sum(1.0 / v for v in values))


def format_table(summaries: Mapping[str, Mapping[str, Any]], columns: Sequence[str] | None = None) -> pd.DataFrame:
    """A papers-style table: one row per editor, cells ``"99.5 (0.1)"`` (x100; fluency x100 too).

    ``columns`` default: the probability metrics, score and whichever generation metrics exist, after
    a ``metric`` column when the summaries name their metric (zsRE). Text values are printed as they are.
    """
    if columns is None:
        first = next(iter(summaries.values()))
        columns = ["score", *PROBABILITY_METRICS] if "neighborhood" in first else ["score", "efficacy", "paraphrase", "specificity"]
        columns += [c for c in ("fluency", "consistency", "consistency_proxy") if c in first]
        if any("metric" in s for s in summaries.values()):
            columns = ["metric", *columns]
    table = {}
    for editor, s in summaries.items():
        cells = {}
        for c in columns:
            value = s.get(c, float("nan"))
            if isinstance(value, str):
                cells[c] = value
                continue
            half = s.get(f"{c}_ci95")
            cells[c] = f"{100 * value:.1f}" + (f" ({100 * half:.1f})" if half is not None and np.isfinite(half) else "")
        table[editor] = cells
    return pd.DataFrame.from_dict(table, orient="index")[list(columns)]
