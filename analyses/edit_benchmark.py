"""PMET Tables 1-3, PMET Figures 3-4 and MEMIT Figure 5 on the default model (SmolLM2-135M-Instruct),
from one command.

On the REPORT part of the fixed CounterFact split (``pmet_lens/data/files/counterfact_split.json``;
the presets were tuned on the TUNE part only):

* Table 1: the unedited model and every editor of ``--methods`` (the papers' rows FT-W, MEND, ROME,
  MEMIT, PMET, and beyond them r-ROME, EMMET, AlphaEdit), all cases edited in ONE edit (the papers' 10K
  setting; ROME and r-ROME edit them one after another, as MEMIT ran ROME), Score / Efficacy /
  Generalization (paraphrase) / Specificity (neighborhood) / Fluency / consistency proxy, x100 with 95% CIs;
* Table 3: PMET's ablations (w/o δ_a; + W_O^MHSA update; even spread) on the same cases;
* Figure 3: PMET's and MEMIT's metrics vs the number of simultaneous edits n_i = exp(ln(N)·i/(S-1)) (log
  scale, up to all N cases; PMET uses 17 points up to 10K, here ``--scaling-points``);
* Figure 4: per-layer ‖ΔW‖ of every editor and each ablation (W_out; and W_O for the W_O ablation);
* Figure 5 (MEMIT Fig. 5): every editor's probability metrics at n = ``--sweep-counts`` edits (1, 10,
  32, 100, 320 and all cases), beside the unedited model's on the same first n cases: ROME and r-ROME
  sequential (one run through the cases, scored after the first n; the targets of the Table 1 run are
  reused, the keys and updates recomputed), FT-W and MEND as mass edits of the first n cases, the
  target-and-solve editors with the first n rows of their targets;
* Table 2: every editor's edit of the shipped zsRE subset, top-1 token accuracy with the papers' official
  procedure (``evaluate_zsre(metric="official")``; the teacher-forced metric is written beside it, labelled,
  see ``docs/zsre-metrics.md``), and PMET's three ablations there too (beyond the paper, whose Table 3 is
  CounterFact only: the + W_O row writes δ_a into the MHSA output weights, so it tests whether the unwritten
  δ_a is what PMET loses on zsRE). The table beside the papers follows their protocol: the released ROME /
  MEMIT / PMET loaders edit towards the recorded answer ``answers[0]`` (``load_zsre(target="answer")``;
  MEMIT: zsRE "tests MEMIT's ability to add correct information"); the same records edited towards ``alt``
  (EasyEdit's reading) make a second, labelled table (``_alt`` files), with the difference between the two
  (``edit_benchmark_table2_protocols.csv``). ``--zsre-protocols`` picks them.

Generation metrics (Fluency, consistency proxy) use every ``--gen-every``-th case (cases 0, k, 2k...
of the report list) to keep the run within the CPU budget; the scaling curve uses probability metrics
only. Optimised targets are computed once per method and reused (they depend on neither λ, the
spread nor which weights are updated) by the even-spread and + W_O ablations and by the smaller edits of the
scaling curve (identical up to float rounding). Consistency is the documented offline proxy
(:mod:`pmet_lens.evaluation.consistency`), never comparable with the papers' column. Outputs go to ``--out``
(default ``figures/``): CSV, interactive HTML (plotly.js in ``plotly.min.js`` beside it), matplotlib PNG, and
``edit_benchmark.md`` with the tables beside the papers' GPT-J numbers; ``--replot`` rebuilds these from the saved results.

The full run takes hours on a CPU, so it is resumable: every result is written to ``--out`` as soon
as it exists, and each optimised mass edit (deltas and targets) is saved under
``--out/edit_benchmark_edits/``. ``--resume`` keeps the finished results and reuses the saved targets
(checked against the facts, the hyper-parameters and the model's weights), so an interrupted run loses
at most the editor it was working on. The rows that reuse PMET's targets (Fig. 3, + W_O, even spread) run
before the w/o δ_a ablation, which optimises anew. ``--targets-from DIR`` takes the targets that a run on
fewer cases saved (e.g. the 256-case run's for the 769-case one: the report cases are in a fixed order) and
optimises only the other cases' targets; each fact's targets are optimised independently, so they are the
same targets up to float rounding. In the same way a step that needs the first n cases' targets takes
them from saved targets of more cases, and optimises only those of the first n when none are saved
(Fig. 5 of an editor whose Table 1 row exists needs targets only up to its second-largest n); AlphaEdit
and EMMET take MEMIT's targets when their target settings are equal (they run MEMIT's optimisation).

    python analyses/edit_benchmark.py --limit 50 --gen-every 10 --methods memit,pmet
    python analyses/edit_benchmark.py --limit 8 --gen-every 0 --methods ft-w,rome,emmet --skip ablations,scaling
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from pmet_lens import load_model, load_zsre
from pmet_lens.data import as_facts
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, EditResult, edit, preset
from pmet_lens.editing.hparams import METHODS, PMETHyperParams, hparams_from_dict
from pmet_lens.editing.session import EditSession
from pmet_lens.evaluation import (
    PAPER_TABLE1_GPTJ,
    PAPER_TABLE2_GPTJ,
    PAPER_TABLE3_10K,
    ZSRE_METRICS,
    ZSRE_TESTS,
    evaluate_counterfact,
    evaluate_zsre,
    format_table,
    probability_summary,
)
from pmet_lens.parallel import ShardLog, Workers
from pmet_lens.viz.html import write_figure, write_page

logger = logging.getLogger("edit_benchmark")

ABLATIONS: dict[str, dict[str, Any]] = {
    "PMET w/o δ_a": {"use_attn_delta": False},
    "PMET + W_O^MHSA": {"update_attn": True},
    "PMET even spread": {"spread": "even"},
}
ABLATION_SWITCHES = {"no_attn_delta": "PMET w/o δ_a", "update_attn": "PMET + W_O^MHSA", "even_spread": "PMET even spread"}
"""Command-line names of the ablations (``--ablations``)."""
METRICS = ["score", "efficacy", "paraphrase", "neighborhood"]
ZSRE_TABLE_FILES = {"official": "edit_benchmark_table2_zsre.csv", "teacher_forced": "edit_benchmark_table2_zsre_teacher_forced.csv"}
"""Table 2 of this run under each zsRE metric, papers' protocol (the official metric under the file name the
papers' table goes by)."""
ZSRE_ALT_TABLE_FILES = {"official": "edit_benchmark_table2_zsre_alt.csv",
                        "teacher_forced": "edit_benchmark_table2_zsre_alt_teacher_forced.csv"}
"""Table 2 under each zsRE metric with the second protocol (edits towards ``alt``)."""
ZSRE_PROTOCOLS = {"answer": "the papers' protocol: edits towards the recorded answer answers[0]",
                  "alt": "second protocol: edits towards alt (EasyEdit's reading)"}
"""``--zsre-protocols``: the ``load_zsre(target=...)`` of each Table 2."""
LABELS = {"ft-w": "FT-W", "mend": "MEND", "rome": "ROME", "memit": "MEMIT", "pmet": "PMET", "r-rome": "r-ROME",
          "emmet": "EMMET", "alphaedit": "AlphaEdit"}
"""Method -> row label, in the tables' order (the papers' rows FT-W, MEND, ROME, MEMIT, PMET, then r-ROME,
EMMET and AlphaEdit). MEND's row runs once method ``"mend"`` is registered in ``METHODS``."""
UNEDITED = "SmolLM2 (unedited)"
SEQUENTIAL = ("rome", "r-rome")
"""Editors that edit the cases one after another: Fig. 5 scores one run of them after the first n cases."""
FIG3_METHODS = ("memit", "pmet")
"""The editors of PMET's Fig. 3 (log-spaced counts); MEMIT's Fig. 5 has every editor."""
SWEEP_COUNTS = "1,10,32,100,320,769"
"""MEMIT Fig. 5's numbers of edits up to this split's 769 report cases (capped at ``--limit``)."""


def in_table_order(editors) -> list[str]:
    """``editors`` in the tables' order: the unedited model, the methods (:data:`LABELS`), PMET's ablations,
    then any other row."""
    order = [UNEDITED, *LABELS.values(), *ABLATIONS]
    return sorted(editors, key=lambda e: order.index(e) if e in order else len(order))


def available_methods() -> list[str]:
    """The methods of :data:`LABELS` that are registered (MEND once its editor exists)."""
    return [m for m in LABELS if m in METHODS]


def has_targets(model_name: str, method: str) -> bool:
    """Whether ``method`` optimises target vectors (that later runs can reuse)."""
    hp = preset(model_name, method)
    return bool(hp.editor().optimises_targets)


def delta_norms(result, label: str) -> list[dict[str, Any]]:
    """Per-layer Frobenius norms of an edit's ΔW (PMET Appendix A, Fig. 4)."""
    return [{"editor": label, **row} for row in result.delta_norms()]


def shard_log(args, name: str) -> ShardLog:
    """The shard log of one long step of the run (``--out/edit_benchmark_shards/NAME``): its finished
    shards are kept there until the step ends, so ``--resume`` after a killed run computes only the others."""
    return ShardLog(Path(args.out) / "edit_benchmark_shards" / re.sub(r"[^A-Za-z0-9_.-]+", "_", name), resume=args.resume)


def evaluate_cf(model, facts, args, generation=True, log: ShardLog | None = None):
    """``evaluate_counterfact`` with this run's generation setting (``--gen-every 0``: no generation),
    on ``--workers`` when given, its finished shards kept in ``log``."""
    return evaluate_counterfact(model, facts, generation=generation and args.gen_every > 0,
                                gen_every=max(1, args.gen_every), workers=args.pool, checkpoint=log)


def sharding(hparams, args, log: ShardLog, targets=None) -> dict[str, Any]:
    """``edit``'s ``workers`` and ``checkpoint`` for ``hparams``: the pool and a sub-log of the target
    shards for the methods that shard their targets (none when ``targets`` are given), nothing for the
    others (ROME, FT, MEND run in this process)."""
    if not hparams.editor().shards_facts:
        return {}
    return {"workers": args.pool, "checkpoint": log.child("targets") if targets is None else None}


def run_edit(model, facts, hparams, label, store, args, generation=True, targets=None, save_to=None):
    """Edit ``facts`` (one mass edit), evaluate, restore. ``targets``: reuse optimised targets (exact:
    they do not depend on λ, the spread or which weights are updated). ``save_to``: write the edit
    (deltas and targets) there, so that ``--resume`` can reuse its targets. Returns the evaluation,
    the ΔW norms and the targets."""
    log = shard_log(args, f"{label}_{len(facts)}")
    t0 = time.perf_counter()
    result = edit(model, facts, hparams=hparams, cov_store=store, apply=True, progress=True, targets=targets,
                  compile=args.compile and hparams.editor().optimises_targets, **sharding(hparams, args, log, targets))
    t_edit = time.perf_counter() - t0
    if save_to is not None:
        result.save(save_to)
    try:
        per_record, summary = evaluate_cf(model, facts, args, generation, log.child("evaluation"))
    finally:
        norms = delta_norms(result, label)
        result.restore()
    log.remove()
    summary["edit_seconds"] = t_edit
    summary["targets_reused"] = targets is not None
    logger.info("%s: %d facts edited in %.0f s; efficacy %.3f", label, len(facts), t_edit, summary["efficacy"])
    return per_record, summary, norms, result.targets


def _load_targets(path: Path, model, hparams) -> tuple[dict[str, torch.Tensor], list[dict]] | None:
    """The targets that an earlier run saved at ``path`` and their facts (as CounterFact records), or
    ``None`` when there is none or it was made for other target settings or another model."""
    if not path.is_file():
        return None
    try:
        saved = EditResult.load(path, model)
    except ValueError as err:
        logger.warning("not reusing %s: %s", path, err)
        return None
    # λ, C's corpus size and the spread enter only the solve: targets optimised under other values are the same
    if hparams_from_dict(saved.hparams).target_settings() != hparams.target_settings():
        logger.warning("not reusing %s: made for other hyper-parameters", path)
        return None
    return saved.targets, [f.to_counterfact() for f in saved.facts]


def prefix_targets(path: Path, model, facts, hparams) -> tuple[dict[str, torch.Tensor], int] | None:
    """Targets that a run saved at ``path`` for the first ``k`` of ``facts``, and ``k``; ``None`` when
    there are none, when they were made for other target settings or another model (:func:`_load_targets`),
    or when the saved facts neither begin ``facts`` nor begin with them. A run on more facts gives back its
    first ``len(facts)`` rows: each fact's targets are optimised independently, so they are this run's
    targets up to float rounding."""
    found = _load_targets(path, model, hparams)
    if found is None:
        return None
    ours = [f.to_counterfact() for f in as_facts(facts)]
    k = min(len(found[1]), len(ours))
    if k == 0 or found[1][:k] != ours[:k]:
        logger.warning("not reusing %s: made for other facts", path)
        return None
    logger.info("reusing the targets of %d facts saved in %s", k, path)
    return {s: v[:k] for s, v in found[0].items()}, k


def n_rows(targets: dict[str, torch.Tensor]) -> int:
    """How many records ``targets`` (site -> [records, d_model]) hold."""
    return len(next(iter(targets.values())))


class TargetBank:
    """The optimised targets of one run, by ``(kind, stem)``: ``kind`` is ``"cf"`` (the report cases) or a
    zsRE protocol's records (``"zsre_answer"``, ``"zsre"``), ``stem`` the method (``"pmet"``) or an ablation
    that optimises its own loss (``"pmet_no_attn_delta"``). Each entry holds the targets of the first ``k``
    records of its kind: a request for fewer gets the first rows, and one for more optimises the others
    (each fact's targets are optimised independently of the others', MEMIT eq. 16; not so for the sequential
    editors, whose targets depend on the earlier edits, so theirs are never extended). A method that runs
    another's target optimisation (``targets_of_method``: AlphaEdit and EMMET run MEMIT's) takes that
    method's targets when their ``target_settings()`` are equal. Targets come from this run, from
    ``edits_dir`` (an earlier run into the same ``--out``, with ``--resume``) or from a ``--targets-from``
    run's directory; those not saved in full under the stem's own name in ``edits_dir`` are saved by its
    next full edit (:meth:`save_path`), so ``--resume`` after an interruption reuses all of them.

    ``optimise(records, hparams, name)`` optimises the targets of ``records`` (an ``EditResult`` made with
    ``apply=False``; ``name`` names its shard log)."""

    def __init__(self, model, optimise, edits_dir: Path, reuse_dirs: list[Path]) -> None:
        self.model, self.optimise, self.edits_dir, self.reuse_dirs = model, optimise, edits_dir, list(reuse_dirs)
        self.targets: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        self.settings: dict[tuple[str, str], dict[str, Any]] = {}  # the target_settings() of each entry
        self.unsaved: set[tuple[str, str]] = set()

    def _found(self, stem: str, records, kind: str, hparams) -> tuple[dict[str, torch.Tensor], int, bool] | None:
        """The most records' targets that another entry of this run or a saved run has for these records:
        (targets, how many, whether they are saved under ``stem`` in ``edits_dir``)."""
        settings = hparams.target_settings()
        stems = [stem] + ([settings["method"]] if stem == hparams.method and settings["method"] != stem else [])
        best = None
        for other in stems:
            mine = self.targets.get((kind, other))
            if other != stem and mine is not None and self.settings.get((kind, other)) == settings:
                best = (mine, n_rows(mine), False)
            for d in self.reuse_dirs:
                found = prefix_targets(d / f"{kind}_{other}.safetensors", self.model, records, hparams)
                if found is not None and (best is None or found[1] > best[1]):
                    best = (found[0], found[1], d == self.edits_dir and other == stem)
        return best

    def get(self, stem: str, records, kind: str, hparams) -> dict[str, torch.Tensor] | None:
        """``stem``'s targets on ``records`` (the first ``len(records)`` of this run's ``kind`` records) from
        this run or a saved run, those of the records beyond the saved ones optimised now; ``None`` when
        nothing is there to start from (or a sequential editor's saved targets are too few)."""
        key = (kind, stem)
        have = self.targets.get(key)
        if have is None or n_rows(have) < len(records):
            best = self._found(stem, records, kind, hparams)
            if best is not None and (have is None or best[1] > n_rows(have)):
                have = best[0]
                if not best[2]:
                    self.unsaved.add(key)
            if have is None:
                return None
            k = n_rows(have)
            if k < len(records):
                if hparams.method in SEQUENTIAL:
                    return None
                logger.info("%s: optimising the targets of the other %d of %d %s records", stem,
                            len(records) - k, len(records), kind)
                rest = self.optimise(records[k:], hparams, f"targets_{kind}_{stem}_rest")
                have = {s: torch.cat([v, rest.targets[s].to(v.device)]) for s, v in have.items()}
                self.unsaved.add(key)
            self.targets[key], self.settings[key] = have, hparams.target_settings()
        return {s: v[:len(records)] for s, v in self.targets[key].items()}

    def of(self, stem: str, records, kind: str, hparams) -> dict[str, torch.Tensor]:
        """:meth:`get`, or all of them optimised now (and saved) when nothing is there to start from."""
        given = self.get(stem, records, kind, hparams)
        if given is None:
            self.keep(stem, kind, self.optimise(records, hparams, f"targets_{kind}_{stem}"), hparams)
            given = self.targets[(kind, stem)]
        return given

    def save_path(self, stem: str, kind: str) -> Path | None:
        """Where the next full edit of ``stem`` should be saved for ``--resume``: ``None`` when its
        targets already are there."""
        key = (kind, stem)
        return None if key in self.targets and key not in self.unsaved else self.edits_dir / f"{kind}_{stem}.safetensors"

    def put(self, stem: str, kind: str, targets: dict[str, torch.Tensor], hparams) -> None:
        """Remember the targets of a full edit made with ``hparams`` that was saved at :meth:`save_path`
        (or needed not be)."""
        key = (kind, stem)
        self.targets[key], self.settings[key] = targets, hparams.target_settings()
        self.unsaved.discard(key)

    def keep(self, stem: str, kind: str, result, hparams) -> None:
        """Remember ``result``'s targets (an edit made with ``hparams``) and save the edit for ``--resume``."""
        result.save(self.edits_dir / f"{kind}_{stem}.safetensors")
        self.put(stem, kind, result.targets, hparams)


def save_progress(out: Path, meta, summaries, per_records, norms, scaling_rows, zsre_summaries, zsre_alt=None,
                  sweep_rows=None) -> None:
    """Write every result so far (the files ``--resume`` reads), so an interrupted run loses at most
    the editor it was working on. ``zsre_summaries``: Table 2 with the papers' protocol; ``zsre_alt``: with
    the ``alt`` protocol; ``sweep_rows``: Fig. 5."""
    if summaries:
        format_table(summaries).to_csv(out / "edit_benchmark_table1_3.csv")
        pd.concat({k: v.assign(editor=k) for k, v in per_records.items()}).to_csv(out / "edit_benchmark_per_record.csv", index=False)
        (out / "edit_benchmark_summaries.json").write_text(json.dumps({"meta": meta, "summaries": summaries}, indent=1, default=float))
    # Files of results this run does not have yet are removed, not left as they are: an earlier run's
    # rows in them would otherwise be taken by --resume as this run's.
    norms_path, scaling_path = out / "edit_benchmark_fig4_delta_norms.csv", out / "edit_benchmark_fig3_scaling.csv"
    zsre_path = out / "edit_benchmark_zsre_summaries.json"
    alt_path, sweep_path = out / "edit_benchmark_zsre_alt_summaries.json", out / "edit_benchmark_fig5_sweep.csv"
    if sweep_rows:
        pd.DataFrame(sweep_rows).sort_values(["editor", "n_edits"]).to_csv(sweep_path, index=False)
    else:
        sweep_path.unlink(missing_ok=True)
    if zsre_alt:
        for metric in ZSRE_METRICS:
            format_table({e: s[metric] for e, s in zsre_alt.items()}).to_csv(out / ZSRE_ALT_TABLE_FILES[metric])
        alt_path.write_text(json.dumps(zsre_alt, indent=1, default=float))
    else:
        alt_path.unlink(missing_ok=True)
    if norms:
        pd.DataFrame(norms).to_csv(norms_path, index=False)
    else:
        norms_path.unlink(missing_ok=True)
    if scaling_rows:
        pd.DataFrame(scaling_rows).sort_values(["editor", "n_edits"]).to_csv(scaling_path, index=False)
    else:
        scaling_path.unlink(missing_ok=True)
    if zsre_summaries:
        for metric in ZSRE_METRICS:
            format_table({e: s[metric] for e, s in zsre_summaries.items()}).to_csv(out / ZSRE_TABLE_FILES[metric])
        zsre_path.write_text(json.dumps({"_protocol": "answer", **zsre_summaries}, indent=1, default=float))
    else:
        zsre_path.unlink(missing_ok=True)


def evaluate_zsre_metrics(model, records, args=None, log: ShardLog | None = None) -> dict[str, dict[str, Any]]:
    """The zsRE summary of ``model`` under each metric: ``{"official": ..., "teacher_forced": ...}``
    (on ``args.pool`` when given; finished shards kept in ``log``, one sub-log per metric)."""
    out = {metric: evaluate_zsre(model, records, metric=metric, workers=getattr(args, "pool", None),
                                 checkpoint=None if log is None else log.child(metric))[1] for metric in ZSRE_METRICS}
    if log is not None:
        log.remove()
    return out


def zsre_vs_paper(zsre_summaries: dict[str, dict[str, dict]], metric: str = "official",
                  protocol: str = "answer") -> pd.DataFrame:
    """Table 2 of this run under ``metric`` (x100, 95% CI), with the papers' GPT-J rows when ``metric``
    is the official procedure they were scored with and ``protocol`` theirs (edits towards ``answers[0]``);
    every row names its metric and protocol."""
    rows = []
    for editor in in_table_order(zsre_summaries):
        by_metric = zsre_summaries[editor]
        s = by_metric[metric]
        rows.append({"source": "SmolLM2-135M (this run)", "editor": editor, "metric": s["metric"], "protocol": protocol,
                     **{c: f"{100 * s[c]:.1f} ({100 * s[c + '_ci95']:.1f})" for c in ZSRE_TESTS}})
    if metric == "official" and protocol == "answer":
        for editor, paper in PAPER_TABLE2_GPTJ.items():
            rows.append({"source": "GPT-J 6B (paper)", "editor": editor, "metric": "official", "protocol": "answer",
                         **{c: f"{v:.1f}" for c, v in paper.items()}})
    return pd.DataFrame(rows)


def zsre_protocol_difference(answer: dict[str, dict[str, dict]], alt: dict[str, dict[str, dict]],
                             metric: str = "official") -> pd.DataFrame:
    """How far the two zsRE protocols differ: per editor in both, each test's accuracy x100 with the papers'
    protocol (towards ``answers[0]``), with ``alt``, and the difference (answer − alt)."""
    rows = []
    for editor in in_table_order(answer):
        if editor not in alt:
            continue
        a, b = answer[editor][metric], alt[editor][metric]
        row: dict[str, Any] = {"editor": editor, "metric": metric}
        for c in ZSRE_TESTS:
            row.update({f"{c}_answer": round(100 * a[c], 1), f"{c}_alt": round(100 * b[c], 1),
                        f"{c}_difference": round(100 * (a[c] - b[c]), 1)})
        rows.append(row)
    return pd.DataFrame(rows)


def reuses_pmet_targets(change: dict[str, Any]) -> bool:
    """Whether the ablation ``change`` can reuse PMET's optimised targets: even spread and + W_O can
    (v^m and v^a do not depend on the spread or on which weights are updated), w/o δ_a cannot (it
    optimises a different loss)."""
    return set(change) <= PMETHyperParams.update_only_fields


def paper_side_by_side(ours: dict[str, dict], paper: dict[str, dict], columns: list[str], cons_key: str) -> pd.DataFrame:
    rows = []
    for editor, s in ours.items():
        row = {"source": "SmolLM2-135M (this run)", "editor": editor}
        for c in columns:
            key = cons_key if c == "consistency" else c
            value = s.get(key, float("nan"))
            half = s.get(f"{key}_ci95")
            ci = f" ({100 * half:.1f})" if half is not None and not math.isnan(half) else ""
            row[c if c != "consistency" else cons_key] = f"{100 * value:.1f}{ci}" if value == value else ""
        rows.append(row)
    for editor, s in paper.items():
        row = {"source": "GPT-J 6B (paper)", "editor": editor}
        for c in columns:
            row[c if c != "consistency" else cons_key] = f"{s[c]:.1f}" + (" (paper's RS)" if c == "consistency" else "")
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N cases of the report split (default: all)")
    parser.add_argument("--methods", default=",".join(available_methods()),
                        help=f"comma-separated editors for Tables 1-2 and Figs. 3 (memit, pmet) and 5, of {','.join(LABELS)} "
                             "(default: every registered one)")
    parser.add_argument("--sweep-counts", default=SWEEP_COUNTS,
                        help="Fig. 5: comma-separated numbers of edits (capped at the number of cases)")
    parser.add_argument("--zsre-protocols", default="answer,alt",
                        help="Table 2's zsRE protocols: answer (the papers', beside their numbers) and/or alt")
    parser.add_argument("--out", default="figures", help="output directory")
    parser.add_argument("--gen-every", type=int, default=10,
                        help="generation metrics (fluency, consistency proxy) on every k-th case; 0: none")
    parser.add_argument("--scaling-points", type=int, default=5, help="number of edit counts on the log scale")
    parser.add_argument("--zsre-limit", type=int, default=None, help="zsRE records (default: same as --limit)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: table1,ablations,scaling,sweep,zsre")
    parser.add_argument("--ablations", default=",".join(ABLATION_SWITCHES),
                        help=f"comma-separated PMET Table 3 ablations to run (default all: {','.join(ABLATION_SWITCHES)})")
    parser.add_argument("--compile", action="store_true",
                        help="optimise the targets with edit(..., compile=True) (torch.compile; equal up to float rounding)")
    parser.add_argument("--resume", action="store_true",
                        help="keep the results already in --out (same cases) and compute only what is missing, "
                             "e.g. run --methods pmet first and --methods memit --resume later")
    parser.add_argument("--merge", action="append", default=[], metavar="DIR",
                        help="with --resume: also take the results of a run made in DIR (same cases), e.g. "
                             "--methods memit run at the same time with its own --out")
    parser.add_argument("--targets-from", action="append", default=[], metavar="DIR",
                        help="reuse the optimised targets saved by a run in DIR (its --out) on cases that begin "
                             "this run's, e.g. the 256-case run's for the 769-case one: only the other cases' "
                             "targets are optimised (same presets; each fact's targets are independent)")
    parser.add_argument("--replot", action="store_true",
                        help="only rebuild the report (markdown, figures, HTML) from the results a run saved in --out")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="optimise targets and evaluate on N Ray workers (pip install 'pmet-lens[ray]'); results "
                             "equal one process's up to float rounding")
    parser.add_argument("--address", default=None, help="with --workers: join this Ray cluster (default: a local one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.replot:
        replot(Path(args.out))
        return 0
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    chosen = [a.strip() for a in args.ablations.split(",") if a.strip()]
    unknown = sorted(set(chosen) - set(ABLATION_SWITCHES))
    if unknown:
        parser.error(f"unknown ablation(s) {unknown}; choose from {','.join(ABLATION_SWITCHES)}")
    ablations = {ABLATION_SWITCHES[a]: ABLATIONS[ABLATION_SWITCHES[a]] for a in chosen}
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in LABELS:
            parser.error(f"unknown method {m!r} (choose from {','.join(LABELS)})")
        if m not in METHODS:
            parser.error(f"method {m!r} is not available in this installation (registered: {','.join(METHODS)})")
    methods = [m for m in LABELS if m in methods]  # the tables' order
    protocols = [p.strip() for p in args.zsre_protocols.split(",") if p.strip()]
    if not protocols or set(protocols) - set(ZSRE_PROTOCOLS):
        parser.error(f"--zsre-protocols takes {','.join(ZSRE_PROTOCOLS)}, got {args.zsre_protocols!r}")
    try:
        sweep_counts = sorted({int(c) for c in args.sweep_counts.split(",") if c.strip()})
    except ValueError:
        parser.error(f"--sweep-counts takes comma-separated integers, got {args.sweep_counts!r}")
    if not sweep_counts or sweep_counts[0] < 1:
        parser.error(f"--sweep-counts takes integers >= 1, got {args.sweep_counts!r}")
    out = Path(args.out)
    if any(Path(d).resolve() == out.resolve() for d in args.targets_from):
        parser.error(f"--targets-from {args.out} is this run's own --out; use --resume to reuse its targets")
    missing = [d for d in args.targets_from if not (Path(d) / "edit_benchmark_edits").is_dir()]
    if missing:
        parser.error(f"--targets-from: {missing} hold no saved edits (DIR/edit_benchmark_edits/); give the --out "
                     "of an earlier edit_benchmark.py run")
    out.mkdir(parents=True, exist_ok=True)

    args.protocols, args.sweep_count_list = protocols, sweep_counts  # read by run()
    model = load_model()
    args.pool = Workers(args.workers, address=args.address) if args.workers else None
    try:
        return run(args, model, out, methods, ablations, skip)
    finally:
        if args.pool is not None:
            args.pool.close()


def run(args, model, out: Path, methods: list[str], ablations: dict[str, dict[str, Any]], skip: set[str]) -> int:
    """The benchmark on ``model`` (``args.pool``: the worker pool or ``None``)."""
    name = str(model.cfg.model_name)
    protocols, sweep_counts = args.protocols, args.sweep_count_list
    store = CovarianceStore(progress=True)
    facts = split_facts("report", limit=args.limit)
    logger.info("report split: %d cases; generation on every %d-th", len(facts), args.gen_every)
    label = LABELS
    summaries: dict[str, dict] = {}
    per_records: dict[str, pd.DataFrame] = {}
    norms: list[dict] = []
    meta: dict[str, Any] = {"n_cases": len(facts), "gen_every": args.gen_every, "model": name, "compile": args.compile,
                            "hparams": {m: preset(name, m).to_dict() for m in sorted({*methods, "pmet", "memit"})}}

    scaling_rows: list[dict] = []
    sweep_rows: list[dict] = []
    zsre_summaries: dict[str, dict] = {}  # the papers' protocol (towards answers[0])
    zsre_alt: dict[str, dict] = {}        # the second protocol (towards alt)
    if args.resume:
        summaries, per_records, norms, scaling_rows, zsre_summaries, zsre_alt, sweep_rows = load_previous(out, meta)
        for other in args.merge:
            s2, p2, n2, sc2, z2, a2, sw2 = load_previous(Path(other), meta)
            new = [k for k in s2 if k not in summaries]
            summaries.update({k: s2[k] for k in new})
            per_records.update({k: p2[k] for k in new if k in p2})
            norms += [r for r in n2 if r["editor"] in new]
            for rows, more in ((scaling_rows, sc2), (sweep_rows, sw2)):
                have = {(r["n_edits"], r["editor"]) for r in rows}
                rows += [r for r in more if (r["n_edits"], r["editor"]) not in have]
            zsre_summaries.update({k: v for k, v in z2.items() if k not in zsre_summaries})
            zsre_alt.update({k: v for k, v in a2.items() if k not in zsre_alt})
        logger.info("resuming: kept %s, %d scaling rows, %d Fig. 5 rows, zsRE %s, zsRE alt %s", sorted(summaries),
                    len(scaling_rows), len(sweep_rows), sorted(zsre_summaries), sorted(zsre_alt))
    edits_dir = out / "edit_benchmark_edits"  # optimised edits (deltas + targets), reused by --resume

    def progress() -> None:
        save_progress(out, meta, summaries, per_records, norms, scaling_rows, zsre_summaries, zsre_alt, sweep_rows)

    def optimise(records, hp, log_name: str):
        log = shard_log(args, log_name)
        result = edit(model, records, hparams=hp, cov_store=store, apply=False, progress=True,
                      compile=args.compile, workers=args.pool, checkpoint=log)
        log.remove()
        return result

    bank = TargetBank(model, optimise, edits_dir,
                      ([edits_dir] if args.resume else []) + [Path(d) / "edit_benchmark_edits" for d in args.targets_from])
    stem_of = {abl: f"pmet_{switch}" for switch, abl in ABLATION_SWITCHES.items()}

    def targets_of(m: str, records, kind: str = "cf") -> dict[str, torch.Tensor]:
        """The method's optimised targets on ``records``: from this run, saved by an earlier one, or optimised now."""
        return bank.of(m, records, kind, preset(name, m))

    if ("table1" not in skip or "ablations" not in skip) and UNEDITED not in summaries:
        log = shard_log(args, "unedited")
        per_records[UNEDITED], summaries[UNEDITED] = evaluate_cf(model, facts, args, log=log)
        log.remove()
        progress()
    table1 = methods if "table1" not in skip else []
    if "ablations" not in skip and "pmet" not in table1:
        table1 = [*table1, "pmet"]  # Table 3 compares the ablations with PMET itself
    for m in table1:
        if label[m] in summaries:
            continue
        if has_targets(name, m):
            given = bank.get(m, facts, "cf", preset(name, m))
            pr, s, nm, found = run_edit(model, facts, preset(name, m), label[m], store, args,
                                        targets=given, save_to=bank.save_path(m, "cf"))
            bank.put(m, "cf", found, preset(name, m))
        else:  # FT-W, MEND: nothing to reuse
            pr, s, nm, _ = run_edit(model, facts, preset(name, m), label[m], store, args)
        per_records[label[m]], summaries[label[m]] = pr, s
        norms += nm
        progress()

    def scaling_row(n: int, editor: str, s: dict[str, Any]) -> dict[str, Any]:
        return {"n_edits": n, "editor": editor, **{k: s[k] for k in METRICS},
                **{f"{k}_ci95": s.get(f"{k}_ci95") for k in METRICS[1:]}}

    def mass_point(m: str, n: int, todo: list[int]) -> dict[str, Any]:
        """The probability metrics of one edit of the first ``n`` cases by the mass editor ``m``, one of the
        points ``todo`` of Fig. 3 or 5. All cases: Table 1's summary. Else the first ``n`` rows of the
        targets of the first cases up to the largest point Table 1 does not give (each fact's target is
        optimised on its own, so the first n rows are the first n facts' targets); FT-W and MEND edit
        without targets."""
        from_table1 = label[m] in summaries
        if n == len(facts) and from_table1:
            return summaries[label[m]]
        if not has_targets(name, m):
            return run_edit(model, facts[:n], preset(name, m), label[m], store, args, generation=False)[1]
        upto = max(c for c in todo if not (c == len(facts) and from_table1))
        given = {k: v[:n] for k, v in targets_of(m, facts[:upto]).items()}  # each [n, ...]
        return run_edit(model, facts[:n], preset(name, m), label[m], store, args, generation=False,
                        targets=given)[1]

    # Fig. 3 and the ablations that reuse PMET's targets come before the one that optimises anew (w/o δ_a),
    # so an interrupted run has the most results per CPU hour.
    if "scaling" not in skip and len(facts) > 1:
        n_max = len(facts)
        counts = sorted({max(1, round(math.exp(math.log(n_max) * i / (args.scaling_points - 1)))) for i in range(args.scaling_points)})
        done = {(r["n_edits"], r["editor"]) for r in scaling_rows}
        todo_of = {m: [n for n in counts if (n, label[m]) not in done] for m in methods if m in FIG3_METHODS}
        for n in counts:
            for m, todo in todo_of.items():
                if n in todo:
                    scaling_rows.append(scaling_row(n, label[m], mass_point(m, n, todo)))
                    progress()

    if "sweep" not in skip:
        counts = sorted({min(c, len(facts)) for c in sweep_counts})
        done = {(r["n_edits"], r["editor"]) for r in sweep_rows}
        if UNEDITED in per_records:  # the reference line: the unedited model on the same first n cases
            new_rows = [scaling_row(n, UNEDITED, probability_summary(per_records[UNEDITED].iloc[:n]))
                        for n in counts if (n, UNEDITED) not in done]
            if new_rows:
                sweep_rows += new_rows
                progress()
        for m in methods:
            todo = [n for n in counts if (n, label[m]) not in done]
            if not todo:
                continue
            logger.info("Fig. 5: %s at n = %s", label[m], todo)
            if m in SEQUENTIAL:  # one run through the cases, scored after the first n
                def record(n: int, s: dict[str, Any], _editor: str = label[m]) -> None:
                    sweep_rows.append(scaling_row(n, _editor, s))
                    progress()

                if todo[-1] == len(facts) and label[m] in summaries:  # Table 1's run through all cases
                    record(todo.pop(), summaries[label[m]])
                    if not todo:
                        continue
                sequential_sweep(model, facts, preset(name, m), todo, store,
                                 bank.get(m, facts[:todo[-1]], "cf", preset(name, m)), record)
                continue
            for n in todo:
                sweep_rows.append(scaling_row(n, label[m], mass_point(m, n, todo)))
                progress()

    if "ablations" not in skip:
        base = preset(name, "pmet")
        for abl, change in sorted(ablations.items(), key=lambda item: not reuses_pmet_targets(item[1])):
            if abl in summaries:
                continue
            hp = base.with_(**change)
            own = not reuses_pmet_targets(change)  # w/o δ_a: its own targets, saved like the methods' for --resume
            if own:
                given, to = bank.get(stem_of[abl], facts, "cf", hp), bank.save_path(stem_of[abl], "cf")
            else:
                given, to = targets_of("pmet", facts), None
            pr, s, nm, found = run_edit(model, facts, hp, abl, store, args, targets=given, save_to=to)
            if own:
                bank.put(stem_of[abl], "cf", found, hp)
            per_records[abl], summaries[abl] = pr, s
            norms += nm
            progress()

    cons_key = "consistency_proxy"
    if "zsre" not in skip:
        for protocol in protocols:
            # the papers' protocol's targets are saved as "zsre_answer"; "zsre" are alt's, as before it existed
            kind, table = ("zsre_answer", zsre_summaries) if protocol == "answer" else ("zsre", zsre_alt)
            records = load_zsre(limit=args.zsre_limit if args.zsre_limit is not None else args.limit, target=protocol)
            if UNEDITED not in table:
                table[UNEDITED] = evaluate_zsre_metrics(model, records, args, shard_log(args, f"{kind}_unedited"))
                progress()
            # every editor and (unless skipped) PMET's ablations: Table 3 is on CounterFact only in the paper; on
            # zsRE the + W_O row tests whether writing δ_a into the weights closes PMET's gap to MEMIT.
            # MEND edits zsRE with the network trained on zsRE's training records (CounterFact's on Table 1)
            runs = [(label[m], preset(name, m).with_(network="zsre") if m == "mend" else preset(name, m), m)
                    for m in methods]
            if "pmet" in methods and "ablations" not in skip:
                runs += [(abl, preset(name, "pmet").with_(**change), stem_of[abl]) for abl, change in ablations.items()]
            for editor, hp, stem in runs:
                if editor in table:
                    continue
                if not hp.editor().optimises_targets:  # FT-W, MEND
                    given, to = None, None
                elif editor in ablations and reuses_pmet_targets(ablations[editor]):
                    given, to = targets_of("pmet", records, kind=kind), None
                else:  # the methods and w/o δ_a: optimise here (one update), unless saved earlier
                    given, to = bank.get(stem, records, kind, hp), bank.save_path(stem, kind)
                log = shard_log(args, f"{kind}_{editor}")
                result = edit(model, records, hparams=hp, cov_store=store, apply=True, progress=True, targets=given,
                              compile=args.compile and hp.editor().optimises_targets, **sharding(hp, args, log, given))
                if to is not None:
                    bank.keep(stem, kind, result, hp)
                try:
                    table[editor] = evaluate_zsre_metrics(model, records, args, log.child("evaluation"))
                finally:
                    result.restore()
                log.remove()
                progress()

    write_report(out, summaries, norms, scaling_rows, zsre_summaries, meta, cons_key, zsre_alt, sweep_rows)
    return 0


def sequential_sweep(model, facts, hparams, counts: list[int], store, targets, record) -> None:
    """Fig. 5 for an editor that edits the cases one after another (ROME, r-ROME): one
    :class:`~pmet_lens.editing.session.EditSession` through the first ``max(counts)`` cases, each batch the
    cases up to the next count, scored on the cases edited so far (probability metrics, passed to
    ``record(n, summary)``); undone at the end. ``targets`` (the Table 1 run's, ``{"mlp_out": [cases, d]}``)
    replace the optimisation: they were optimised in the same order from the same model states, so only
    the keys and updates are recomputed (the same edits up to float rounding)."""
    session = EditSession(model, hparams=hparams, cov_store=store, progress=True)
    done = 0
    try:
        for n in counts:
            given = None if targets is None else {k: v[done:n] for k, v in targets.items()}
            session.edit(facts[done:n], targets=given)
            done = n
            _, s = evaluate_counterfact(model, facts[:n], generation=False)
            logger.info("Fig. 5: %s after %d cases: efficacy %.3f specificity %.3f", hparams.method, n,
                        s["efficacy"], s["neighborhood"])
            record(n, s)
    finally:
        session.undo(to=0)


def load_previous(out: Path, meta: dict[str, Any]):
    """Results of an earlier run in ``out`` (for ``--resume``): summaries, per-record rows, ‖ΔW‖ rows, Fig. 3
    rows, Table 2 with the papers' zsRE protocol and with ``alt``, Fig. 5 rows; refuses a run on other cases.
    Drops the results made with other presets than ``meta["hparams"]``, and adds to ``meta["hparams"]`` the
    saved presets of the methods it does not list (whose results are kept).
    A zsRE file without a protocol is an older run's, which edited towards ``alt``."""
    path = out / "edit_benchmark_summaries.json"
    if not path.is_file():
        return {}, {}, [], [], {}, {}, []
    saved = json.loads(path.read_text())
    if saved["meta"]["n_cases"] != meta["n_cases"] or saved["meta"]["gen_every"] != meta["gen_every"]:
        raise SystemExit(f"--resume: {path} holds a run on {saved['meta']['n_cases']} cases (gen every "
                         f"{saved['meta']['gen_every']}); this run has {meta['n_cases']} ({meta['gen_every']})")
    summaries = saved["summaries"]
    per = pd.read_csv(out / "edit_benchmark_per_record.csv")
    per_records = {k: g.drop(columns="editor") for k, g in per.groupby("editor", sort=False)}
    norms_path, scaling_path = out / "edit_benchmark_fig4_delta_norms.csv", out / "edit_benchmark_fig3_scaling.csv"
    norms = pd.read_csv(norms_path).to_dict("records") if norms_path.is_file() else []
    scaling = pd.read_csv(scaling_path).to_dict("records") if scaling_path.is_file() else []
    zsre, alt, sweep = read_zsre_and_sweep(out)

    def labelled(table: dict[str, Any]) -> dict[str, Any]:
        unlabelled = sorted(k for k, v in table.items() if not all(isinstance(v.get(m), dict) for m in ZSRE_METRICS))
        if unlabelled:
            logger.warning("--resume: zsRE results of %s lack a metric (scored before the official metric); "
                           "recomputing them", unlabelled)
        return {k: v for k, v in table.items() if k not in unlabelled}

    zsre, alt = labelled(zsre), labelled(alt)
    have = {*summaries, *zsre, *alt, *(r["editor"] for r in (*scaling, *sweep))}
    stale = stale_editors(saved["meta"].get("hparams", {}), meta["hparams"]) & have  # those with results to drop
    if stale:
        logger.warning("--resume: %s were made with other hyper-parameters than the current presets; "
                       "recomputing them", sorted(stale))
        summaries = {k: v for k, v in summaries.items() if k not in stale}
        per_records = {k: v for k, v in per_records.items() if k not in stale}
        norms = [r for r in norms if r["editor"] not in stale]
        scaling = [r for r in scaling if r["editor"] not in stale]
        sweep = [r for r in sweep if r["editor"] not in stale]
        zsre = {k: v for k, v in zsre.items() if k not in stale}
        alt = {k: v for k, v in alt.items() if k not in stale}
    # The kept results of methods this run does not list were made with the saved presets: record those, so
    # that a later --resume that lists them again does not take their results for stale.
    for method, saved_hparams in saved["meta"].get("hparams", {}).items():
        meta["hparams"].setdefault(method, saved_hparams)
    return summaries, per_records, norms, scaling, zsre, alt, sweep


def read_zsre_and_sweep(out: Path) -> tuple[dict[str, Any], dict[str, Any], list[dict]]:
    """The zsRE summaries a run saved in ``out`` under the papers' protocol and under ``alt``, and its Fig. 5
    rows. A zsRE file without a protocol is an older run's, which edited towards ``alt``: it is read as the
    ``alt`` table."""
    sweep_path = out / "edit_benchmark_fig5_sweep.csv"
    sweep = pd.read_csv(sweep_path).to_dict("records") if sweep_path.is_file() else []
    zsre_path, alt_path = out / "edit_benchmark_zsre_summaries.json", out / "edit_benchmark_zsre_alt_summaries.json"
    zsre = json.loads(zsre_path.read_text()) if zsre_path.is_file() else {}
    alt = json.loads(alt_path.read_text()) if alt_path.is_file() else {}
    if zsre and zsre.pop("_protocol", None) != "answer":
        logger.warning("%s edited towards alt (before the papers' protocol was the main one): read as the alt table",
                       zsre_path)
        alt, zsre = {**zsre, **alt}, {}
    return zsre, alt, sweep


def stale_editors(saved: dict[str, dict], current: dict[str, dict]) -> set[str]:
    """Editor labels whose saved results used other hyper-parameters than ``current`` (method ->
    preset dict): PMET's change also makes its ablations stale; a run without a record of its
    hyper-parameters makes every editor stale. Fields the edit ignores (τ and α without the
    projection, :meth:`~pmet_lens.editing.EditHyperParams.effective_settings`) do not count. A method
    ``current`` does not list is left as it is."""
    def settings(table: dict[str, dict], method: str) -> dict[str, Any] | None:
        return hparams_from_dict(table[method]).effective_settings() if method in table else None

    editors = {m: {label} for m, label in LABELS.items()}
    editors["pmet"] = {"PMET", *ABLATIONS}
    return {e for m, labels in editors.items() if m in current and settings(saved, m) != settings(current, m)
            for e in labels}


def write_report(out: Path, summaries, norms, scaling_rows, zsre_summaries, meta, cons_key, zsre_alt=None,
                 sweep_rows=None) -> None:
    """Markdown tables beside the papers' numbers, interactive HTML and PNG figures."""
    import plotly.express as px

    from pmet_lens.viz.png import png_figure, save_png

    gen_note = (f"Generation metrics on every case i with i % {meta['gen_every']} == 0; `{cons_key}` is the offline proxy "
                "(attribute prompts + WikiText-2 paragraphs, TF-IDF fitted on WikiText-2), not the papers' Consistency.\n"
                if meta["gen_every"] > 0 else "Generation metrics (fluency, consistency) were not run (`--gen-every 0`).\n")
    md = [f"# Edit benchmark on {meta['model']} ({meta['n_cases']} report-split cases, one edit each; ROME and r-ROME "
          "edit them one after another)\n", gen_note]
    html_parts = []
    cols = ["score", "efficacy", "paraphrase", "neighborhood", "fluency", "consistency"]
    tables: dict[str, pd.DataFrame] = {}  # the tables beside the papers this run has, in the report's order
    order = [UNEDITED, *LABELS.values()]
    main_rows = {k: summaries[k] for k in order if k in summaries}
    if main_rows:
        tables["table1_vs_paper"] = paper_side_by_side(main_rows, PAPER_TABLE1_GPTJ, cols, cons_key)
        md += ["## Table 1 (CounterFact, x100, 95% CI)\n", to_markdown(tables["table1_vs_paper"]), ""]
    abl_rows = {k: v for k, v in summaries.items() if k.startswith("PMET")}
    if len(abl_rows) > 1:
        tables["table3_vs_paper"] = paper_side_by_side(abl_rows, PAPER_TABLE3_10K, cols, cons_key)
        md += ["## Table 3 (PMET ablations; paper: 10K edits on GPT-J)\n", to_markdown(tables["table3_vs_paper"]), ""]
    if zsre_summaries:
        tables["table2_vs_paper"] = zsre_vs_paper(zsre_summaries, "official")
        md += ["## Table 2 (zsRE, top-1 token accuracy x100, the papers' official procedure)\n",
               to_markdown(tables["table2_vs_paper"]), ""]
        t2_tf = zsre_vs_paper(zsre_summaries, "teacher_forced")
        t2_tf.to_csv(out / "edit_benchmark_table2_teacher_forced.csv", index=False)
        md += ["## Table 2, teacher-forced metric (x100; not the papers' procedure, see docs/zsre-metrics.md)\n",
               to_markdown(t2_tf), ""]
    frames: list[pd.DataFrame] = []
    alt_files = ("edit_benchmark_table2_alt.csv", "edit_benchmark_table2_alt_teacher_forced.csv",
                 "edit_benchmark_table2_protocols.csv")
    if zsre_alt:
        t2_alt = [zsre_vs_paper(zsre_alt, metric, protocol="alt") for metric in ("official", "teacher_forced")]
        md += [f"## Table 2, second protocol ({ZSRE_PROTOCOLS['alt']}; official metric, x100)\n", to_markdown(t2_alt[0]), "",
               "## Table 2, second protocol, teacher-forced metric (x100)\n", to_markdown(t2_alt[1]), ""]
        frames += t2_alt
        if zsre_summaries:
            diff = zsre_protocol_difference(zsre_summaries, zsre_alt)
            md += ["## Table 2: the two protocols side by side (official metric, x100; difference = answer − alt)\n",
                   to_markdown(diff), ""]
            frames.append(diff)
        for path_name, frame in zip(alt_files, frames):
            frame.to_csv(out / path_name, index=False)
    for path_name in alt_files[len(frames) if zsre_alt else 0:]:  # an older run's tables must not stay beside this one's
        (out / path_name).unlink(missing_ok=True)
    for table_name in ("table1_vs_paper", "table3_vs_paper", "table2_vs_paper"):
        path = out / f"edit_benchmark_{table_name}.csv"
        if table_name in tables:
            tables[table_name].to_csv(path, index=False)
        else:  # a table this run does not have: an older run's file must not stay beside this run's report
            path.unlink(missing_ok=True)

    if scaling_rows:
        fig = scaling_figure(scaling_rows, "Fig. 3: metrics vs number of simultaneous edits",
                             out / "edit_benchmark_fig3_scaling.png")
        html_parts.append(fig)
    if sweep_rows:
        sweep = pd.DataFrame(sweep_rows).pivot_table(index="editor", columns="n_edits", values="score")
        sweep = sweep.reindex(in_table_order(sweep.index))
        md += ["## Fig. 5 (MEMIT): Score x100 vs the number of edits (probability metrics only; CSV: "
               "edit_benchmark_fig5_sweep.csv)\n", to_markdown((100 * sweep).round(1).reset_index()), ""]
        fig = scaling_figure(sweep_rows, "Fig. 5 (MEMIT): metrics vs number of edits (ROME, r-ROME sequential; the "
                             "others one edit)", out / "edit_benchmark_fig5_sweep.png")
        write_figure(fig, out / "edit_benchmark_fig5_sweep.html", plotlyjs="directory")
        html_parts.append(fig)
    else:
        for suffix in ("html", "png"):
            (out / f"edit_benchmark_fig5_sweep.{suffix}").unlink(missing_ok=True)
    if norms:
        nd = pd.DataFrame(norms)
        nd["series"] = nd["editor"] + " (" + nd["weight"] + ")"
        fig = px.line(nd, x="layer", y="delta_norm", color="series", markers=True, title="Fig. 4: per-layer ‖ΔW‖")
        html_parts.append(fig)
        fig_m, ax = png_figure(figsize=(6, 3.5))
        for series, g in nd.groupby("series"):
            ax.plot(g["layer"], g["delta_norm"], marker="o", label=series)
        ax.set_xlabel("layer")
        ax.set_ylabel("‖ΔW‖ (Frobenius)")
        ax.legend(fontsize=7)
        save_png(fig_m, out / "edit_benchmark_fig4_delta_norms.png")
    (out / "edit_benchmark.md").write_text("\n".join(md) + "\n")
    page: list[Any] = []
    for table_name, table in tables.items():
        page += [f"<h2>{table_name}</h2>", table.to_html(index=False)]
    write_page(out / "edit_benchmark.html", page + html_parts, title="Edit benchmark", plotlyjs="directory")


def replot(out: Path) -> None:
    """Rebuild the report (``edit_benchmark.md``, the tables beside the papers, the figures and
    ``edit_benchmark.html``) from the results a run saved in ``out``, without a model: the numbers are the run's."""
    path = out / "edit_benchmark_summaries.json"
    if not path.is_file():
        raise SystemExit(f"--replot: {path} does not exist; give the --out of a finished run")
    saved = json.loads(path.read_text())
    norms_path, scaling_path = out / "edit_benchmark_fig4_delta_norms.csv", out / "edit_benchmark_fig3_scaling.csv"
    norms = pd.read_csv(norms_path).to_dict("records") if norms_path.is_file() else []
    scaling = pd.read_csv(scaling_path).to_dict("records") if scaling_path.is_file() else []
    zsre, alt, sweep = read_zsre_and_sweep(out)
    write_report(out, saved["summaries"], norms, scaling, zsre, saved["meta"], "consistency_proxy", alt, sweep)


def scaling_figure(rows: list[dict], title: str, png_path: Path):
    """Metrics vs the number of edits (log x, one line per editor, 95% CI bands in the PNG): writes the
    matplotlib PNG to ``png_path`` and returns the plotly figure."""
    import plotly.express as px
    from matplotlib import colormaps

    from pmet_lens.viz.png import png_figure, save_png

    df = pd.DataFrame(rows).sort_values(["editor", "n_edits"])  # a resumed run appends out of order
    editors = in_table_order(df["editor"].unique())  # the legend in the tables' order
    # grey is the unedited reference's alone: the editors take tab10's other nine colours
    palette = [c for i, c in enumerate(colormaps["tab10"].colors) if i != 7]
    colour = {e: palette[i % len(palette)] for i, e in enumerate(e for e in editors if e != UNEDITED)}
    long = df.melt(id_vars=["n_edits", "editor"], value_vars=METRICS, var_name="metric", value_name="value")
    fig = px.line(long, x="n_edits", y="value", color="editor", facet_col="metric", markers=True, log_x=True, title=title,
                  category_orders={"editor": editors})
    # the unedited model is a reference, not an editor: a dashed grey line in both renderings
    fig.for_each_trace(lambda t: t.update(line={"dash": "dash", "color": "grey"}, marker={"color": "grey"}),
                       selector={"name": UNEDITED})
    fig_m, axes = png_figure(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), sharex=True)
    for ax, metric in zip(axes, METRICS):
        for editor in editors:
            g = df[df["editor"] == editor]
            style = {"linestyle": "--", "color": "grey"} if editor == UNEDITED else {"color": colour[editor]}
            (line,) = ax.plot(g["n_edits"], g[metric], marker="o", label=editor, **style)
            # the points that have a CI (none at n = 1: one case has no spread; a column of None is no CI)
            ci = pd.to_numeric(g.get(f"{metric}_ci95", pd.Series(index=g.index, dtype=float)), errors="coerce")
            has = ci.notna()
            if has.any():
                ax.fill_between(g["n_edits"][has], (g[metric] - ci)[has], (g[metric] + ci)[has], alpha=0.2,
                                color=line.get_color())
        ax.set_xscale("log")
        ax.set_title(metric)
        ax.set_xlabel("number of edits")
    axes[0].legend(fontsize=7)
    save_png(fig_m, png_path)
    return fig


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)

if __name__ == "__main__":
    raise SystemExit(main())
