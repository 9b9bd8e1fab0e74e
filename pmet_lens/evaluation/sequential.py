"""Cheap per-batch figures of a sequential editing session (AlphaEdit's protocol, tracked as it runs).

After each batch j: for every batch k ≤ j, each of its requests' edit-prompt probabilities P(o*)
and P(o^c) (Efficacy Success ``P(o*) > P(o^c)``, MEMIT eq. 24; for requests without a true object,
such as zsRE's, ``P(o*) > 1/2`` is not meaningful, so only ``p_new`` is reported and success is the
teacher-forced top-1 accuracy of o*'s tokens, MEMIT Appendix C.1), the perplexity of the fixed
WikiText-2 sample (:mod:`pmet_lens.evaluation.perplexity`), and the weight norms the session keeps.
The table of batch k's success after every later batch j shows whether early edits survive.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from pmet_lens.data import Fact
from pmet_lens.evaluation.scoring import score_continuations

__all__ = ["batch_efficacy", "curve_row"]


def batch_efficacy(model: HookedTransformer, batches: Sequence[Sequence[Fact]], after: int,
                   batch_size: int = 64) -> pd.DataFrame:
    """Per request of each batch in ``batches`` (1-based batch numbers), its edit-prompt figures on
    ``model`` as it is now, labelled ``after`` (the number of batches written so far).

    Columns: ``after, batch, case_id, p_new, p_true, success``.
    """
    prompts, targets, owner = [], [], []
    for k, facts in enumerate(batches, 1):
        for f in facts:
            if f.target_new is None:
                raise ValueError(f"batch_efficacy needs edit requests, but {f.where} has no target_new")
            prompts.append(f.text)
            targets.append(f.target_new)
            owner.append((k, f, "new"))
            if f.target_true is not None:
                prompts.append(f.text)
                targets.append(f.target_true)
                owner.append((k, f, "true"))
    scores = score_continuations(model, prompts, targets, batch_size=batch_size)
    lp = scores.mean_logprob.numpy()
    acc = scores.token_accuracy.numpy()
    rows: dict[tuple[int, int], dict[str, Any]] = {}
    for i, (k, f, kind) in enumerate(owner):
        row = rows.setdefault((k, id(f)), {"after": after, "batch": k, "case_id": f.case_id})
        if kind == "new":
            row["p_new"] = float(np.exp(lp[i]))
            row["_lp_new"], row["_acc"] = float(lp[i]), float(acc[i])
        else:
            row["p_true"] = float(np.exp(lp[i]))
            row["_lp_true"] = float(lp[i])
    out = []
    for row in rows.values():
        if "_lp_true" in row:
            row["success"] = float(row["_lp_new"] > row["_lp_true"])
        else:
            row["p_true"] = float("nan")
            row["success"] = row["_acc"]
        out.append({k: v for k, v in row.items() if not k.startswith("_")})
    return pd.DataFrame(out, columns=["after", "batch", "case_id", "p_new", "p_true", "success"])


def curve_row(efficacy: pd.DataFrame, metrics: dict[str, Any], after: int) -> dict[str, Any]:
    """One row of the per-batch curves from :func:`batch_efficacy`'s table and the session's metrics
    of batch ``after``: efficacy of the batch just edited and of batch 1, all edits so far, perplexity,
    and ‖ΔW‖ / ‖ΣΔW‖ / ‖W + ΣΔW‖ as the mean over edited weights."""
    now = efficacy[efficacy["after"] == after]
    row: dict[str, Any] = {
        "batch": after,
        "efficacy_batch": float(now[now["batch"] == after]["success"].mean()),
        "efficacy_first": float(now[now["batch"] == 1]["success"].mean()),
        "efficacy_all": float(now["success"].mean()),
        "perplexity": metrics.get("perplexity", float("nan")),
        "seconds": metrics.get("seconds", float("nan")),
    }
    for key in ("delta_norm", "weight_change_norm", "weight_norm"):
        values = list(metrics.get(key, {}).values())
        row[key] = float(np.mean(values)) if values else float("nan")
    return row
