"""Scoring and the papers' evaluations: CounterFact and zsRE metrics, text metrics, consistency references, the papers' reference tables.

:mod:`.scoring` scores continuations in batched forwards; :mod:`.counterfact` and :mod:`.zsre` are the
papers' evaluations (MEMIT Appendix C); :mod:`.tables` holds the papers' reference numbers and the
papers-style table; :mod:`.textmetrics` and :mod:`.consistency` the generation metrics. Every table's
95% confidence interval is :func:`pmet_lens.core.stats.mean_ci95`.
"""

from pmet_lens.core.stats import mean_ci95
from pmet_lens.evaluation.counterfact import evaluate_counterfact, probability_summary
from pmet_lens.evaluation.tables import (
    PAPER_TABLE1_GPTJ,
    PAPER_TABLE2_GPTJ,
    PAPER_TABLE3_10K,
    PROBABILITY_METRICS,
    format_table,
    harmonic_mean,
)
from pmet_lens.evaluation.zsre import ZSRE_METRICS, ZSRE_TESTS, ZsreMetric, evaluate_zsre

__all__ = [
    "PAPER_TABLE1_GPTJ",
    "PAPER_TABLE2_GPTJ",
    "PAPER_TABLE3_10K",
    "PROBABILITY_METRICS",
    "ZSRE_METRICS",
    "ZSRE_TESTS",
    "ZsreMetric",
    "evaluate_counterfact",
    "evaluate_zsre",
    "format_table",
    "harmonic_mean",
    "mean_ci95",
    "probability_summary",
]
