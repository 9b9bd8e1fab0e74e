"""zsRE evaluation of an (edited) model: top-1 token accuracy (MEMIT Appendix C.1, eqs. 21-23).

Per record, three tests, each the fraction of the answer's tokens that the model predicts top-1,
then averaged over records (tables print x100):

* Efficacy: the question ``src`` with the edit's answer ``target_new`` (eq. 21);
* Paraphrase: the paraphrase ``rephrase`` with the same answer (eq. 22);
* Specificity: the unrelated Natural Questions prompt ``loc + "?"`` with its recorded answer
  ``loc_ans`` (eq. 23).

Two ways of building the contexts the tokens are predicted from (``metric=``):

* ``"teacher_forced"`` (the default): the answer ``" " + answer`` (no second space when it already
  starts with one) is tokenised once, and token ``t_j`` is predicted from ``prompt ⊕ t_<j`` in one
  teacher-forced pass (:func:`pmet_lens.evaluation.scoring.score_continuations`).
* ``"official"``: the procedure of ROME / MEMIT's released evaluator (``compute_rewrite_quality_zsre``
  and its zsRE loader), from which the papers' zsRE tables come. For the answer's ids
  ``t_1..t_n = tokenize(" " + answer)``, token ``t_i`` is predicted at the last position of
  ``tokenize(prompt + decode(t_1..t_<i))``, the decoded prefix re-tokenised with the prompt as one
  text, and it counts as correct when the argmax equals the FIRST id of ``tokenize(decode(t_i))``.
  So an answer that already starts with a space is scored after a double space, and a character
  split over byte-level tokens decodes to U+FFFD, which breaks both its context and its expected
  id. ``docs/zsre-metrics.md`` explains these quirks with measured counts.

Every output carries its metric: a ``metric`` column and a ``"metric"`` summary key. The two metrics
agree on answers whose decoded prefixes re-tokenise to the same ids; tables set beside the papers'
numbers use ``"official"``.

Tokenisation: contexts use the model's BOS convention (:func:`pmet_lens.core.tokens.encode`), the
answer and expected ids none. The official code calls the tokenizer with its default special tokens,
which for the GPT-2 / GPT-J tokenizers it was written for (and SmolLM2's) adds none, so the two agree
there; with a tokenizer that adds BOS the official code would also score BOS as an answer token,
which is not reproduced. Rows are right-padded and read at their last real token.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence, cast

import pandas as pd
from transformer_lens import HookedTransformer

from pmet_lens.core.models import require_model
from pmet_lens.core.stats import mean_ci95
from pmet_lens.core.tokens import encode, pad_id
from pmet_lens.data import DataError, ZsreRecord
from pmet_lens.evaluation.scoring import score_continuations, score_next_tokens
from pmet_lens.evaluation.tables import harmonic_mean

__all__ = ["ZSRE_METRICS", "ZSRE_TESTS", "ZsreMetric", "evaluate_zsre", "official_rows", "zsre_accuracy"]

ZsreMetric = Literal["teacher_forced", "official"]
ZSRE_METRICS: tuple[ZsreMetric, ...] = ("teacher_forced", "official")
"""The two ways of scoring zsRE (see the module docstring)."""
ZSRE_TESTS: tuple[str, ...] = ("efficacy", "paraphrase", "specificity")
"""The three tests, in the papers' column order (PMET Table 2)."""


def official_rows(model: HookedTransformer, prompt: str, answer: str) -> list[tuple[list[int], int]]:
    """The official procedure's ``(context ids, expected id)`` for each token of ``answer`` after ``prompt``.

    For ``t_1..t_n = tokenize(" " + answer)``, row ``i`` is ``(encode(prompt + decode(t_<i)),
    first id of tokenize(decode(t_i)))``. A token that decodes to nothing is compared with the pad id,
    as the official code's padded target batch does.
    """
    tok = model.tokenizer
    if tok is None:
        raise ValueError("the official zsRE metric needs the model's tokenizer (model.tokenizer is None)")
    ids = tok(" " + answer, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"answer {answer!r} tokenises to nothing")
    rows = []
    for i, t in enumerate(ids):
        context = encode(model, prompt + cast(str, tok.decode(ids[:i])))
        expected = tok(tok.decode(t), add_special_tokens=False)["input_ids"]
        rows.append((context, int(expected[0]) if expected else pad_id(model)))
    return rows


def _tests(r: ZsreRecord) -> tuple[tuple[str, str], ...]:
    """(prompt, answer) of efficacy, paraphrase and specificity."""
    return (r.src, r.target_new), (r.rephrase, r.target_new), (r.loc + "?", r.loc_ans)


def zsre_accuracy(model: HookedTransformer, records: Sequence[ZsreRecord], *, metric: ZsreMetric = "teacher_forced",
                  batch_size: int = 64, progress: bool = False) -> list[float]:
    """The model's work of :func:`evaluate_zsre`: per record, the efficacy, paraphrase and specificity
    token accuracies under ``metric``, flattened (three values per record, in record order)."""
    require_model(model, "pmet_lens.evaluation.zsre.zsre_accuracy")
    if metric == "teacher_forced":
        pairs = [pair for r in records for pair in _tests(r)]
        return score_continuations(model, [p for p, _ in pairs], [a for _, a in pairs], batch_size=batch_size,
                                   progress=progress).token_accuracy.tolist()
    contexts: list[list[int]] = []
    expected: list[int] = []
    spans: list[tuple[int, int]] = []  # per (record, test): its rows
    for r in records:
        for prompt, answer in _tests(r):
            rows = official_rows(model, prompt, answer)
            spans.append((len(contexts), len(contexts) + len(rows)))
            contexts += [c for c, _ in rows]
            expected += [e for _, e in rows]
    correct = score_next_tokens(model, contexts, expected, batch_size=batch_size, progress=progress).token_correct
    return [sum(bool(c) for c in correct[a:b]) / (b - a) for a, b in spans]


def evaluate_zsre(
    model: HookedTransformer,
    records: Sequence[ZsreRecord],
    *,
    metric: ZsreMetric = "teacher_forced",
    batch_size: int = 64,
    progress: bool = True,
    workers: Any = None,
    shard_size: int | None = None,
    checkpoint: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """zsRE top-1 token accuracy on src / rephrase / loc (MEMIT Appendix C.1); see the module docstring.

    Args:
        model: the model as it is now (apply an edit first, or attach its hooks around this call).
        records: :class:`~pmet_lens.data.records.ZsreRecord` s (:func:`~pmet_lens.data.records.load_zsre`).
        metric: ``"teacher_forced"`` (default) or ``"official"`` (the papers' procedure; use it for
            tables set beside the papers' numbers).
        batch_size: most rows per forward.
        progress: a tqdm bar over the forwards.
        workers: ``None`` (this process), an int (a local pool of that many workers) or a
            :class:`~pmet_lens.parallel.Workers` pool: shards of ``shard_size`` records are scored on the
            workers (:func:`zsre_accuracy`, the same function as in one process), in record order.
        shard_size: records per shard (default: about two shards per worker; 64 with ``checkpoint`` alone).
        checkpoint: a :class:`~pmet_lens.parallel.ShardLog` recording each finished shard, so that a
            killed run resumes with the unfinished ones.

    Returns:
        ``(per_record, summary)``: columns ``case_id, metric, efficacy, paraphrase, specificity``
        (each the fraction of the answer's tokens predicted top-1); summary means with ``*_ci95``,
        ``score`` (harmonic mean), ``n_records`` and ``metric``.

    Raises:
        ValueError: an unknown ``metric`` or no records.
        pmet_lens.DataError: a record that is not a :class:`~pmet_lens.data.records.ZsreRecord`.
    """
    require_model(model, "pmet_lens.evaluate_zsre")
    if metric not in ZSRE_METRICS:
        raise ValueError(f"unknown zsRE metric {metric!r}; choose one of {list(ZSRE_METRICS)}")
    records = list(records)
    if not records:
        raise ValueError("no records to evaluate")
    for i, r in enumerate(records):
        if not isinstance(r, ZsreRecord):
            raise DataError(f"zsRE record #{i}: expected a ZsreRecord (pmet_lens.load_zsre), got {type(r).__name__}")
    if workers is None and checkpoint is None:
        acc = zsre_accuracy(model, records, metric=metric, batch_size=batch_size, progress=progress)
    else:
        from pmet_lens.parallel import auto_shard_size, run_shards, shard_ranges

        size = shard_size or auto_shard_size(len(records), workers, per_worker=2,
                                             at_most=None if workers is not None else 64)
        parts = run_shards(model, zsre_accuracy, [(records[a:b],) for a, b in shard_ranges(len(records), size)],
                           common={"metric": metric, "batch_size": batch_size, "progress": False}, workers=workers,
                           checkpoint=checkpoint, desc="zsRE records (shards)", progress=progress)
        acc = [a for part in parts for a in part]
    per_record = pd.DataFrame({
        "case_id": [r.case_id for r in records], "metric": metric,
        "efficacy": acc[0::3], "paraphrase": acc[1::3], "specificity": acc[2::3],
    })
    summary: dict[str, Any] = {"metric": metric, "n_records": len(records)}
    for name in ZSRE_TESTS:
        summary[name], summary[f"{name}_ci95"] = mean_ci95(per_record[name])
    summary["score"] = harmonic_mean([summary[m] for m in ZSRE_TESTS])
    return per_record, summary
