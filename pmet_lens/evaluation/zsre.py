"""zsRE evaluation of an (edited) model (MEMIT Appendix C.1, ROME ``compute_rewrite_quality_zsre``).

Teacher-forced top-1 accuracy of
each answer token, averaged over the answer's tokens, then over records: Efficacy on ``src`` with
the new answer, Paraphrase on ``rephrase``, Specificity on ``loc + "?"`` with ``loc_ans``.

Confidence intervals are the normal approximation mean ± 1.96·s/√n over records (the papers'
"95% confidence interval").
"""

from __future__ import annotations

from typing import Any, Sequence

import pandas as pd
from transformer_lens import HookedTransformer

from pmet_lens.data import DataError, ZsreRecord
from pmet_lens.evaluation.evaluate import mean_ci95
from pmet_lens.evaluation.scoring import score_continuations
from pmet_lens.evaluation.tables import harmonic_mean

__all__ = ["evaluate_zsre"]


def evaluate_zsre(
    model: HookedTransformer,
    records: Sequence[ZsreRecord],
    *,
    batch_size: int = 64,
    progress: bool = True,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """zsRE top-1 token accuracy on src / rephrase / loc (MEMIT Appendix C.1); see the module docstring.

    Returns:
        ``(per_record, summary)``: columns ``case_id, efficacy, paraphrase, specificity`` (each the
        fraction of the answer's tokens predicted top-1, teacher-forced); summary means with
        ``*_ci95``, ``score`` (harmonic mean) and ``n_records``.
    """
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    for i, r in enumerate(records):
        if not isinstance(r, ZsreRecord):
            raise DataError(f"zsRE record #{i}: expected a ZsreRecord (pmet_lens.load_zsre), got {type(r).__name__}")
    prompts, targets = [], []
    for r in records:
        prompts += [r.src, r.rephrase, r.loc + "?"]
        targets += [r.target_new, r.target_new, r.loc_ans]
    acc = score_continuations(model, prompts, targets, batch_size=batch_size, progress=progress).token_accuracy.numpy()
    per_record = pd.DataFrame({
        "case_id": [r.case_id for r in records],
        "efficacy": acc[0::3], "paraphrase": acc[1::3], "specificity": acc[2::3],
    })
    summary: dict[str, Any] = {"n_records": len(records)}
    for name in ("efficacy", "paraphrase", "specificity"):
        summary[name], summary[f"{name}_ci95"] = mean_ci95(per_record[name])
    summary["score"] = harmonic_mean([summary[m] for m in ("efficacy", "paraphrase", "specificity")])
    return per_record, summary
