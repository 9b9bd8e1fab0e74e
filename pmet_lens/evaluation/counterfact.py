"""CounterFact evaluation of an (edited) model, as MEMIT Appendix C / PMET Appendix B define it.

CounterFact (per record, then averaged over records; tables print x100):

* Efficacy Success ES: ``P(o*) > P(o^c)`` on the edit prompt p(s) (MEMIT eq. 24);
* Paraphrase Success PS: the fraction of paraphrase prompts with ``P(o*) > P(o^c)`` (eq. 25);
* Neighborhood Success NS: the fraction of neighborhood prompts with ``P(o^c) > P(o*)`` (eq. 26);
* Score S: the harmonic mean of ES, PS, NS;
* magnitudes (ROME's "diff"): mean ``P(o*) - P(o^c)`` (edit, paraphrase), ``P(o^c) - P(o*)``
  (neighborhood);
* Fluency GE: n-gram entropy of text generated from the generation prompts (eq. 27, see
  :mod:`pmet_lens.evaluation.textmetrics`); ROME/MEMIT: top-k = 5 sampling to 100 tokens, prompt included;
* Consistency RS: TF-IDF cosine of the generated text with reference text about o*. With ROME's
  files (see :class:`pmet_lens.evaluation.consistency.RomeReference`) it is reported as ``consistency``;
  otherwise the documented offline proxy :class:`pmet_lens.evaluation.consistency.ProxyReference`, always
  reported as ``consistency_proxy``.

P(o) of a multi-token object is ``exp`` of its mean token log-probability (ROME/MEMIT compare mean
token NLLs; a tie is a failure, as in ROME's strict ``>``).

Confidence intervals are the normal approximation mean ± 1.96·s/√n over records (the papers'
"95% confidence interval", :func:`pmet_lens.core.stats.mean_ci95`).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pandas as pd
from transformer_lens import HookedTransformer

from pmet_lens.core.generation import sample_texts
from pmet_lens.core.models import require_model
from pmet_lens.core.stats import mean_ci95
from pmet_lens.data import DataError, Fact, as_facts
from pmet_lens.evaluation.consistency import ConsistencyReference, ProxyReference, RomeReference
from pmet_lens.evaluation.scoring import score_continuations
from pmet_lens.evaluation.tables import PROBABILITY_METRICS, harmonic_mean
from pmet_lens.evaluation.textmetrics import ngram_entropy

logger = logging.getLogger(__name__)

__all__ = ["counterfact_outputs", "evaluate_counterfact"]


def _consistency_reference(
    rome_snippets: str | Path | None,
    rome_idf: str | Path | None,
    rome_vocab: str | Path | None,
    counterfact_path: str | Path | None,
) -> ConsistencyReference:
    given = [p is not None for p in (rome_snippets, rome_idf, rome_vocab)]
    if any(given) and not all(given):
        raise ValueError("ROME's consistency needs all three files: rome_snippets, rome_idf and rome_vocab")
    if all(given):
        return RomeReference.from_paths(rome_snippets, rome_idf, rome_vocab, counterfact_path)  # type: ignore[arg-type]
    return ProxyReference.from_wikitext()


def _pair_rows(facts: Sequence[Fact]) -> tuple[list[str], list[str], list[dict[str, tuple[int, int]]]]:
    """The scored (prompt, object) rows of ``facts``, record by record, and each record's row span per test."""
    prompts: list[str] = []
    targets: list[str] = []
    spans: list[dict[str, tuple[int, int]]] = []
    for f in facts:
        groups = {"efficacy": [f.text], "paraphrase": list(f.paraphrase_prompts), "neighborhood": list(f.neighborhood_prompts)}
        span = {}
        for name, group in groups.items():
            start = len(prompts)
            for p in group:  # rows alternate: (p, o*), (p, o^c)
                prompts += [p, p]
                targets += [f.target_new, f.target_true]  # type: ignore[list-item]
            span[name] = (start, len(prompts))
        spans.append(span)
    return prompts, targets, spans


def counterfact_outputs(
    model: HookedTransformer,
    facts: Sequence[Fact],
    generate: Sequence[int],
    seed: int,
    *,
    max_length: int = 100,
    top_k: int = 5,
    batch_size: int = 64,
    progress: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """The model's work of :func:`evaluate_counterfact` on ``facts``: the mean token log-probability of
    every scored (prompt, object) row (records in order; per test, rows alternate o*, o^c), and the
    texts generated from the generation prompts of the records at the positions ``generate``
    (prompt ``j`` of them with seed ``seed + j``)."""
    require_model(model, "pmet_lens.evaluation.counterfact.counterfact_outputs")
    prompts, targets, _ = _pair_rows(facts)
    logger.info("CounterFact: scoring %d (prompt, object) pairs of %d records", len(prompts), len(facts))
    lp = score_continuations(model, prompts, targets, batch_size=batch_size, progress=progress).mean_logprob.numpy()
    gen_prompts = [p for i in generate for p in facts[i].generation_prompts]
    texts: list[str] = []
    if gen_prompts:
        logger.info("CounterFact: generating %d texts for %d records", len(gen_prompts), len(generate))
        texts = sample_texts(model, gen_prompts, max_length=max_length, top_k=top_k, seed=seed,
                             batch_size=batch_size, progress=progress)
    return lp, texts


def probability_summary(per_record: pd.DataFrame) -> dict[str, Any]:
    """The probability metrics of CounterFact records (MEMIT Appendix C) summarised from their
    per-record rows as :func:`evaluate_counterfact` returns them: each test's success rate and magnitude
    with its 95% CI half-width (``efficacy``, ``efficacy_ci95``, ``efficacy_magnitude``, ...), ``score``
    (the harmonic mean of the three success rates, the papers' Score) and ``n_records``. A subset of the
    rows (e.g. the first n cases) gives that subset's summary."""
    summary: dict[str, Any] = {"n_records": len(per_record)}
    for name in PROBABILITY_METRICS:
        summary[name], summary[f"{name}_ci95"] = mean_ci95(per_record[f"{name}_success"])
    for name in PROBABILITY_METRICS:
        summary[f"{name}_magnitude"], summary[f"{name}_magnitude_ci95"] = mean_ci95(per_record[f"{name}_magnitude"])
    summary["score"] = harmonic_mean([summary[m] for m in PROBABILITY_METRICS])
    return summary


def evaluate_counterfact(
    model: HookedTransformer,
    records: Sequence[Fact | Mapping[str, Any]],
    generation: bool = True,
    *,
    gen_every: int = 1,
    max_length: int = 100,
    top_k: int = 5,
    seed: int = 0,
    batch_size: int = 64,
    consistency: ConsistencyReference | None = None,
    rome_snippets: str | Path | None = None,
    rome_idf: str | Path | None = None,
    rome_vocab: str | Path | None = None,
    counterfact_path: str | Path | None = None,
    progress: bool = True,
    workers: Any = None,
    shard_size: int | None = None,
    checkpoint: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Evaluate ``model`` (edited or not) on CounterFact records; see the module docstring.

    Args:
        model: the model as it is now (apply an edit first, or attach its hooks with
            ``model.hooks(fwd_hooks=result.as_hooks())`` around this call).
        records: :class:`Fact` s or CounterFact dicts, each with ``target_new`` and ``target_true``.
        generation: also compute Fluency and Consistency (slow: one sampled text per generation prompt).
        gen_every: generation metrics on every ``gen_every``-th record only (records 0, k, 2k, ...).
        max_length: tokens per generated sequence, prompt included (ROME's 100).
        top_k: top-k of the sampling (ROME's 5).
        seed: sampling seed (generation prompt ``j`` uses ``seed + j``).
        batch_size: rows per forward.
        consistency: a reference provider; default: ROME's files when all three ``rome_*`` paths are
            given, else :class:`ProxyReference` on the shipped WikiText-2.
        rome_snippets: ROME's ``attribute_snippets.json``.
        rome_idf: ROME's ``idf.npy``.
        rome_vocab: ROME's ``tfidf_vocab.json``.
        counterfact_path: the CounterFact file the records come from (for o*'s Wikidata ids with
            ROME's snippets; default: the shipped subset).
        progress: tqdm bars.
        workers: ``None`` (this process), an int (a local pool of that many workers) or a
            :class:`~pmet_lens.parallel.Workers` pool: the records are scored and their texts generated
            in shards of ``shard_size`` records on the workers (:func:`counterfact_outputs`, the same
            function as in one process; generation prompt ``j`` keeps seed ``seed + j``), and the
            metrics are computed here from their outputs in record order.
        shard_size: records per shard (default: about two shards per worker; 64 with ``checkpoint``
            alone).
        checkpoint: a :class:`~pmet_lens.parallel.ShardLog` recording each finished shard, so that a
            killed run resumes with the unfinished ones.

    Returns:
        ``(per_record, summary)``. ``per_record`` has one row per record: ``case_id``,
        ``efficacy_success`` (0/1), ``paraphrase_success``, ``neighborhood_success`` (fractions),
        the three ``*_magnitude`` columns, ``p_new`` / ``p_true`` on the edit prompt, and with
        generation ``fluency`` and ``consistency_proxy`` (or ``consistency``; NaN on records
        skipped by ``gen_every``). ``summary`` holds the means (fractions, not x100) with
        ``*_ci95`` half-widths, ``score``, ``n_records``, ``n_generation``, ``gen_every`` and
        ``consistency_kind``.

    Raises:
        pmet_lens.DataError: a record without ``target_new`` / ``target_true``.
    """
    require_model(model, "pmet_lens.evaluate_counterfact")
    if gen_every < 1:
        raise ValueError(f"gen_every must be >= 1, got {gen_every}")
    facts = as_facts(records)
    if not facts:
        raise ValueError("no records to evaluate")
    for f in facts:
        if f.target_new is None or f.target_true is None:
            raise DataError(f"{f.where}: CounterFact evaluation needs both target_new and target_true")

    chosen = [i for i in range(len(facts)) if i % gen_every == 0 and facts[i].generation_prompts] if generation else []
    reference = (consistency or _consistency_reference(rome_snippets, rome_idf, rome_vocab, counterfact_path)) \
        if generation else None
    spans = _pair_rows(facts)[2]
    common = {"max_length": max_length, "top_k": top_k, "batch_size": batch_size}
    if workers is None and checkpoint is None:
        lp, texts = counterfact_outputs(model, facts, chosen, seed, progress=progress, **common)
    else:
        from pmet_lens.parallel import auto_shard_size, run_shards, shard_ranges

        size = shard_size or auto_shard_size(len(facts), workers, per_worker=2, at_most=None if workers is not None else 64)
        shards, offset = [], 0
        for a, b in shard_ranges(len(facts), size):
            local = [i - a for i in chosen if a <= i < b]
            shards.append((list(facts[a:b]), local, seed + offset))  # generation prompt j keeps seed + j
            offset += sum(len(facts[a + i].generation_prompts) for i in local)
        parts = run_shards(model, counterfact_outputs, shards, common={**common, "progress": False}, workers=workers,
                           checkpoint=checkpoint, desc="CounterFact records (shards)", progress=progress)
        lp = np.concatenate([p[0] for p in parts])
        texts = [t for p in parts for t in p[1]]

    rows = []
    for f, span in zip(facts, spans):
        row: dict[str, Any] = {"case_id": f.case_id}
        for name in PROBABILITY_METRICS:
            a, b = span[name]
            new, true = lp[a:b:2], lp[a + 1 : b : 2]
            if len(new) == 0:
                success, magnitude = float("nan"), float("nan")
            elif name == "neighborhood":
                success = float(np.mean(true > new))
                magnitude = float(np.mean(np.exp(true) - np.exp(new)))
            else:
                success = float(np.mean(new > true))
                magnitude = float(np.mean(np.exp(new) - np.exp(true)))
            row[f"{name}_success"] = success
            row[f"{name}_magnitude"] = magnitude
            if name == "efficacy":
                row["p_new"], row["p_true"] = float(np.exp(new[0])), float(np.exp(true[0]))
        rows.append(row)
    per_record = pd.DataFrame(rows)
    summary = probability_summary(per_record)

    if generation:
        assert reference is not None
        flu = np.full(len(facts), np.nan)
        cons = np.full(len(facts), np.nan)
        offset = 0
        for i in chosen:
            mine = texts[offset : offset + len(facts[i].generation_prompts)]
            offset += len(mine)
            flu[i] = float(np.mean([ngram_entropy(t) for t in mine]))
            cons[i] = reference.tfidf.similarity(" ".join(mine), reference.reference_text(facts[i]))
        per_record["fluency"] = flu
        per_record[reference.name] = cons
        summary["fluency"], summary["fluency_ci95"] = mean_ci95(flu)
        summary[reference.name], summary[f"{reference.name}_ci95"] = mean_ci95(cons)
        summary["n_generation"] = len(chosen)
        summary["gen_every"] = gen_every
        summary["consistency_kind"] = reference.name
    return per_record, summary
