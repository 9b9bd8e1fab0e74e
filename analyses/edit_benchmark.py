"""PMET Tables 1-3 and Figures 3-4 on the default model (SmolLM2-135M-Instruct), from one command.

On the REPORT part of the fixed CounterFact split (``pmet_lens/data/files/counterfact_split.json``;
the presets were tuned on the TUNE part only):

* Table 1: the unedited model, MEMIT and PMET, all cases edited in ONE mass edit (the papers' 10K
  setting), Score / Efficacy / Generalization (paraphrase) / Specificity (neighborhood) / Fluency /
  consistency proxy, x100 with 95% CIs;
* Table 3: PMET's ablations (w/o δ_a; + W_O^MHSA update; even spread) on the same cases;
* Figure 3: metrics vs the number of simultaneous edits n_i = exp(ln(N)·i/(S-1)) (log scale, up to
  all N cases; PMET uses 17 points up to 10K, here ``--scaling-points``);
* Figure 4: per-layer ‖ΔW‖ of PMET and each ablation (W_out; and W_O for the W_O ablation);
* Table 2: MEMIT / PMET mass edits on the shipped zsRE subset, top-1 token accuracy with the papers'
  official procedure (``evaluate_zsre(metric="official")``; the teacher-forced metric is written beside it,
  labelled, see ``docs/zsre-metrics.md``), and PMET's three ablations there too (beyond the paper, whose Table 3
  is CounterFact only: the + W_O row writes δ_a into the MHSA output weights, so it tests whether the unwritten
  δ_a is what PMET loses on zsRE).

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
same targets up to float rounding.

    python analyses/edit_benchmark.py --limit 50 --gen-every 10 --methods memit,pmet
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
from pmet_lens.editing.hparams import PMETHyperParams, hparams_from_dict
from pmet_lens.evaluation import (
    PAPER_TABLE1_GPTJ,
    PAPER_TABLE2_GPTJ,
    PAPER_TABLE3_10K,
    ZSRE_METRICS,
    ZSRE_TESTS,
    evaluate_counterfact,
    evaluate_zsre,
    format_table,
)
from pmet_lens.parallel import ShardLog, Workers
from pmet_lens.viz.html import write_page

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
"""Table 2 of this run under each zsRE metric (the official one under the file name the papers' table goes by)."""


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


def run_edit(model, facts, hparams, label, store, args, generation=True, targets=None, save_to=None):
    """Edit ``facts`` (one mass edit), evaluate, restore. ``targets``: reuse optimised targets (exact:
    they do not depend on λ, the spread or which weights are updated). ``save_to``: write the edit
    (deltas and targets) there, so that ``--resume`` can reuse its targets. Returns the evaluation,
    the ΔW norms and the targets."""
    log = shard_log(args, f"{label}_{len(facts)}")
    t0 = time.perf_counter()
    result = edit(model, facts, hparams=hparams, cov_store=store, apply=True, progress=True, targets=targets,
                  compile=args.compile, workers=args.pool, checkpoint=log.child("targets") if targets is None else None)
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


def saved_targets(path: Path, model, facts, hparams) -> dict[str, torch.Tensor] | None:
    """Targets of an edit that an earlier run saved at ``path`` for exactly ``facts`` (for ``--resume``),
    or ``None`` when there is none or it was made for other facts, other hyper-parameters or another model."""
    found = _load_targets(path, model, hparams)
    if found is None:
        return None
    if found[1] != [f.to_counterfact() for f in as_facts(facts)]:
        logger.warning("--resume: not reusing %s: made for other facts", path)
        return None
    logger.info("--resume: reusing the targets saved in %s", path)
    return found[0]


def prefix_targets(path: Path, model, facts, hparams) -> tuple[dict[str, torch.Tensor], int] | None:
    """Targets that another run saved at ``path`` for the first ``k`` of ``facts``, and ``k`` (for
    ``--targets-from``); ``None`` as :func:`saved_targets`, or when the saved facts neither begin
    ``facts`` nor begin with them. A run on more facts gives back its first ``len(facts)`` rows: each
    fact's targets are optimised independently, so they are this run's targets up to float rounding."""
    found = _load_targets(path, model, hparams)
    if found is None:
        return None
    ours = [f.to_counterfact() for f in as_facts(facts)]
    k = min(len(found[1]), len(ours))
    if k == 0 or found[1][:k] != ours[:k]:
        logger.warning("--targets-from: not reusing %s: made for other facts", path)
        return None
    logger.info("--targets-from: reusing the targets of %d facts saved in %s", k, path)
    return {s: v[:k] for s, v in found[0].items()}, k


def save_progress(out: Path, meta, summaries, per_records, norms, scaling_rows, zsre_summaries) -> None:
    """Write every result so far (the files ``--resume`` reads), so an interrupted run loses at most
    the editor it was working on."""
    if summaries:
        format_table(summaries).to_csv(out / "edit_benchmark_table1_3.csv")
        pd.concat({k: v.assign(editor=k) for k, v in per_records.items()}).to_csv(out / "edit_benchmark_per_record.csv", index=False)
        (out / "edit_benchmark_summaries.json").write_text(json.dumps({"meta": meta, "summaries": summaries}, indent=1, default=float))
    # Files of results this run does not have yet are removed, not left as they are: an earlier run's
    # rows in them would otherwise be taken by --resume as this run's.
    norms_path, scaling_path = out / "edit_benchmark_fig4_delta_norms.csv", out / "edit_benchmark_fig3_scaling.csv"
    zsre_path = out / "edit_benchmark_zsre_summaries.json"
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
        zsre_path.write_text(json.dumps(zsre_summaries, indent=1, default=float))
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


def zsre_vs_paper(zsre_summaries: dict[str, dict[str, dict]], metric: str = "official") -> pd.DataFrame:
    """Table 2 of this run under ``metric`` (x100, 95% CI), with the papers' GPT-J rows when ``metric``
    is the official procedure they were scored with; every row names its metric."""
    rows = []
    for editor, by_metric in zsre_summaries.items():
        s = by_metric[metric]
        rows.append({"source": "SmolLM2-135M (this run)", "editor": editor, "metric": s["metric"],
                     **{c: f"{100 * s[c]:.1f} ({100 * s[c + '_ci95']:.1f})" for c in ZSRE_TESTS}})
    if metric == "official":
        for editor, paper in PAPER_TABLE2_GPTJ.items():
            rows.append({"source": "GPT-J 6B (paper)", "editor": editor, "metric": "official",
                         **{c: f"{v:.1f}" for c, v in paper.items()}})
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
    parser.add_argument("--methods", default="memit,pmet", help="comma-separated editors for Tables 1-2 and Fig. 3")
    parser.add_argument("--out", default="figures", help="output directory")
    parser.add_argument("--gen-every", type=int, default=10,
                        help="generation metrics (fluency, consistency proxy) on every k-th case; 0: none")
    parser.add_argument("--scaling-points", type=int, default=5, help="number of edit counts on the log scale")
    parser.add_argument("--zsre-limit", type=int, default=None, help="zsRE records (default: same as --limit)")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: table1,ablations,scaling,zsre")
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
        if m not in ("pmet", "memit"):
            parser.error(f"unknown method {m!r} (pmet, memit)")
    out = Path(args.out)
    if any(Path(d).resolve() == out.resolve() for d in args.targets_from):
        parser.error(f"--targets-from {args.out} is this run's own --out; use --resume to reuse its targets")
    missing = [d for d in args.targets_from if not (Path(d) / "edit_benchmark_edits").is_dir()]
    if missing:
        parser.error(f"--targets-from: {missing} hold no saved edits (DIR/edit_benchmark_edits/); give the --out "
                     "of an earlier edit_benchmark.py run")
    out.mkdir(parents=True, exist_ok=True)

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
    store = CovarianceStore(progress=True)
    facts = split_facts("report", limit=args.limit)
    logger.info("report split: %d cases; generation on every %d-th", len(facts), args.gen_every)
    label = {"pmet": "PMET", "memit": "MEMIT"}
    summaries: dict[str, dict] = {}
    per_records: dict[str, pd.DataFrame] = {}
    norms: list[dict] = []
    meta: dict[str, Any] = {"n_cases": len(facts), "gen_every": args.gen_every, "model": name, "compile": args.compile,
                            "hparams": {m: preset(name, m).to_dict() for m in ("pmet", "memit")}}

    scaling_rows: list[dict] = []
    zsre_summaries: dict[str, dict] = {}
    if args.resume:
        summaries, per_records, norms, scaling_rows, zsre_summaries = load_previous(out, meta)
        for other in args.merge:
            s2, p2, n2, sc2, z2 = load_previous(Path(other), meta)
            new = [k for k in s2 if k not in summaries]
            summaries.update({k: s2[k] for k in new})
            per_records.update({k: p2[k] for k in new if k in p2})
            norms += [r for r in n2 if r["editor"] in new]
            have = {(r["n_edits"], r["editor"]) for r in scaling_rows}
            scaling_rows += [r for r in sc2 if (r["n_edits"], r["editor"]) not in have]
            zsre_summaries.update({k: v for k, v in z2.items() if k not in zsre_summaries})
        logger.info("resuming: kept %s, %d scaling rows, zsRE %s", sorted(summaries), len(scaling_rows),
                    sorted(zsre_summaries))
    edits_dir = out / "edit_benchmark_edits"  # optimised edits (deltas + targets), reused by --resume

    def progress() -> None:
        save_progress(out, meta, summaries, per_records, norms, scaling_rows, zsre_summaries)

    # (kind, stem) -> optimised targets of all report cases ("cf") or zsRE records ("zsre"). The stem is the
    # method ("pmet", "memit") or an ablation that optimises its own loss ("pmet_no_attn_delta"). Reused by the
    # scaling curve and the ablations that keep PMET's loss; saved under edits_dir for --resume.
    targets: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    # Targets taken (at least in part) from --targets-from and not yet saved in edits_dir: their first
    # full edit saves them, so --resume after an interruption reuses all of them.
    unsaved: set[tuple[str, str]] = set()
    reuse_dirs = ([edits_dir] if args.resume else []) + [Path(d) / "edit_benchmark_edits" for d in args.targets_from]
    stem_of = {abl: f"pmet_{switch}" for switch, abl in ABLATION_SWITCHES.items()}

    def saved(stem: str, records, kind: str, hp) -> dict[str, torch.Tensor] | None:
        """``stem``'s targets on ``records`` from this run or saved by an earlier one: this ``--out``'s
        (``--resume``, the same records), else a ``--targets-from`` run's on records that begin these,
        the others' targets optimised now."""
        key = (kind, stem)
        if key not in targets:
            for d in reuse_dirs:
                path = d / f"{kind}_{stem}.safetensors"
                if d == edits_dir:
                    exact = saved_targets(path, model, records, hp)
                    found = None if exact is None else (exact, len(records))
                else:
                    found = prefix_targets(path, model, records, hp)
                if found is None:
                    continue
                given, k = found
                if k < len(records):
                    logger.info("%s: optimising the targets of the other %d of %d %s records", stem,
                                len(records) - k, len(records), kind)
                    log = shard_log(args, f"targets_{kind}_{stem}_rest")
                    rest = edit(model, records[k:], hparams=hp, cov_store=store, apply=False, progress=True,
                                compile=args.compile, workers=args.pool, checkpoint=log)
                    log.remove()
                    given = {s: torch.cat([v, rest.targets[s].to(v.device)]) for s, v in given.items()}
                targets[key] = given
                if d != edits_dir:
                    unsaved.add(key)
                break
        return targets.get(key)

    def save_path(stem: str, kind: str) -> Path | None:
        """Where the next full edit of ``stem`` should be saved for ``--resume``: ``None`` when its
        targets already are there."""
        key = (kind, stem)
        return None if key in targets and key not in unsaved else edits_dir / f"{kind}_{stem}.safetensors"

    def keep(stem: str, kind: str, result) -> None:
        """Remember ``result``'s targets for this run and save the edit for ``--resume``."""
        result.save(edits_dir / f"{kind}_{stem}.safetensors")
        targets[(kind, stem)] = result.targets
        unsaved.discard((kind, stem))

    def targets_of(m: str, records, kind: str = "cf") -> dict[str, torch.Tensor]:
        """The method's optimised targets on ``records``: from this run, saved by an earlier one, or optimised now."""
        if saved(m, records, kind, preset(name, m)) is None:
            log = shard_log(args, f"targets_{kind}_{m}")
            keep(m, kind, edit(model, records, hparams=preset(name, m), cov_store=store, apply=False, progress=True,
                               compile=args.compile, workers=args.pool, checkpoint=log))
            log.remove()
        return targets[(kind, m)]

    if ("table1" not in skip or "ablations" not in skip) and "SmolLM2 (unedited)" not in summaries:
        log = shard_log(args, "unedited")
        per_records["SmolLM2 (unedited)"], summaries["SmolLM2 (unedited)"] = evaluate_cf(model, facts, args, log=log)
        log.remove()
        progress()
    table1 = methods if "table1" not in skip else []
    if "ablations" not in skip and "pmet" not in table1:
        table1 = [*table1, "pmet"]  # Table 3 compares the ablations with PMET itself
    for m in table1:
        if label[m] in summaries:
            continue
        given = saved(m, facts, "cf", preset(name, m))
        pr, s, nm, targets[("cf", m)] = run_edit(model, facts, preset(name, m), label[m], store, args, targets=given,
                                                 save_to=save_path(m, "cf"))
        unsaved.discard(("cf", m))
        per_records[label[m]], summaries[label[m]] = pr, s
        norms += nm
        progress()

    # Fig. 3 and the ablations that reuse PMET's targets come before the one that optimises anew (w/o δ_a),
    # so an interrupted run has the most results per CPU hour.
    if "scaling" not in skip and len(facts) > 1:
        n_max = len(facts)
        counts = sorted({max(1, round(math.exp(math.log(n_max) * i / (args.scaling_points - 1)))) for i in range(args.scaling_points)})
        done = {(r["n_edits"], r["editor"]) for r in scaling_rows}
        for n in counts:
            for m in methods:
                if (n, label[m]) in done:
                    continue
                if n == n_max and label[m] in summaries:
                    s = summaries[label[m]]  # the Table 1 mass edit of all cases
                else:  # each fact's target is optimised independently: the first n rows are its targets
                    given = {k: v[:n] for k, v in targets_of(m, facts).items()}
                    _, s, _, _ = run_edit(model, facts[:n], preset(name, m), label[m], store, args,
                                          generation=False, targets=given)
                scaling_rows.append({"n_edits": n, "editor": label[m], **{k: s[k] for k in METRICS},
                                     **{f"{k}_ci95": s.get(f"{k}_ci95") for k in METRICS[1:]}})
                progress()

    if "ablations" not in skip:
        base = preset(name, "pmet")
        for abl, change in sorted(ablations.items(), key=lambda item: not reuses_pmet_targets(item[1])):
            if abl in summaries:
                continue
            hp = base.with_(**change)
            if reuses_pmet_targets(change):
                given, to = targets_of("pmet", facts), None
            else:  # w/o δ_a: its own targets, saved like the methods' for --resume
                given, to = saved(stem_of[abl], facts, "cf", hp), save_path(stem_of[abl], "cf")
            pr, s, nm, _ = run_edit(model, facts, hp, abl, store, args, targets=given, save_to=to)
            unsaved.discard(("cf", stem_of[abl]))
            per_records[abl], summaries[abl] = pr, s
            norms += nm
            progress()

    cons_key = "consistency_proxy"
    if "zsre" not in skip:
        records = load_zsre(limit=args.zsre_limit if args.zsre_limit is not None else args.limit)
        if "SmolLM2 (unedited)" not in zsre_summaries:
            zsre_summaries["SmolLM2 (unedited)"] = evaluate_zsre_metrics(model, records, args, shard_log(args, "zsre_unedited"))
            progress()
        # MEMIT, PMET and (unless skipped) PMET's ablations: Table 3 is on CounterFact only in the paper;
        # on zsRE the + W_O row tests whether writing δ_a into the weights closes PMET's gap to MEMIT.
        runs = [(label[m], preset(name, m), m) for m in methods]
        if "pmet" in methods and "ablations" not in skip:
            runs += [(abl, preset(name, "pmet").with_(**change), stem_of[abl]) for abl, change in ablations.items()]
        for editor, hp, stem in runs:
            if editor in zsre_summaries:
                continue
            if editor in ablations and reuses_pmet_targets(ablations[editor]):
                given, to = targets_of("pmet", records, kind="zsre"), None
            else:  # MEMIT, PMET, w/o δ_a: optimise here (one update), unless saved earlier
                given, to = saved(stem, records, "zsre", hp), save_path(stem, "zsre")
            log = shard_log(args, f"zsre_{editor}")
            result = edit(model, records, hparams=hp, cov_store=store, apply=True, progress=True, targets=given,
                          compile=args.compile, workers=args.pool, checkpoint=log.child("targets") if given is None else None)
            if to is not None:
                keep(stem, "zsre", result)
            try:
                zsre_summaries[editor] = evaluate_zsre_metrics(model, records, args, log.child("evaluation"))
            finally:
                result.restore()
            log.remove()
            progress()

    write_report(out, summaries, norms, scaling_rows, zsre_summaries, meta, cons_key)
    return 0


def load_previous(out: Path, meta: dict[str, Any]):
    """Results of an earlier run in ``out`` (for ``--resume``); refuses a run on other cases."""
    path = out / "edit_benchmark_summaries.json"
    if not path.is_file():
        return {}, {}, [], [], {}
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
    zsre_path = out / "edit_benchmark_zsre_summaries.json"
    zsre = json.loads(zsre_path.read_text()) if zsre_path.is_file() else {}
    unlabelled = sorted(k for k, v in zsre.items() if not all(isinstance(v.get(m), dict) for m in ZSRE_METRICS))
    if unlabelled:
        logger.warning("--resume: zsRE results of %s lack a metric (scored before the official metric); "
                       "recomputing them", unlabelled)
        zsre = {k: v for k, v in zsre.items() if k not in unlabelled}
    stale = stale_editors(saved["meta"].get("hparams", {}), meta["hparams"])
    if stale:
        logger.warning("--resume: %s were made with other hyper-parameters than the current presets; "
                       "recomputing them", sorted(stale))
        summaries = {k: v for k, v in summaries.items() if k not in stale}
        per_records = {k: v for k, v in per_records.items() if k not in stale}
        norms = [r for r in norms if r["editor"] not in stale]
        scaling = [r for r in scaling if r["editor"] not in stale]
        zsre = {k: v for k, v in zsre.items() if k not in stale}
    return summaries, per_records, norms, scaling, zsre


def stale_editors(saved: dict[str, dict], current: dict[str, dict]) -> set[str]:
    """Editor labels whose saved results used other hyper-parameters than ``current`` (method ->
    preset dict): PMET's change also makes its ablations stale; a run without a record of its
    hyper-parameters makes every editor stale. Fields the edit ignores (τ and α without the
    projection, :meth:`~pmet_lens.editing.EditHyperParams.effective_settings`) do not count."""
    def settings(table: dict[str, dict], method: str) -> dict[str, Any] | None:
        return hparams_from_dict(table[method]).effective_settings() if method in table else None

    editors = {"memit": {"MEMIT"}, "pmet": {"PMET", *ABLATIONS}}
    return {e for m, labels in editors.items() if settings(saved, m) != settings(current, m) for e in labels}


def write_report(out: Path, summaries, norms, scaling_rows, zsre_summaries, meta, cons_key) -> None:
    """Markdown tables beside the papers' numbers, interactive HTML and PNG figures."""
    import plotly.express as px

    from pmet_lens.viz.png import png_figure, save_png

    gen_note = (f"Generation metrics on every case i with i % {meta['gen_every']} == 0; `{cons_key}` is the offline proxy "
                "(attribute prompts + WikiText-2 paragraphs, TF-IDF fitted on WikiText-2), not the papers' Consistency.\n"
                if meta["gen_every"] > 0 else "Generation metrics (fluency, consistency) were not run (`--gen-every 0`).\n")
    md = [f"# Edit benchmark on {meta['model']} ({meta['n_cases']} report-split cases, one mass edit each)\n", gen_note]
    html_parts = []
    cols = ["score", "efficacy", "paraphrase", "neighborhood", "fluency", "consistency"]
    tables: dict[str, pd.DataFrame] = {}  # the tables beside the papers this run has, in the report's order
    main_rows = {k: v for k, v in summaries.items() if k in ("SmolLM2 (unedited)", "MEMIT", "PMET")}
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
    for table_name in ("table1_vs_paper", "table3_vs_paper", "table2_vs_paper"):
        path = out / f"edit_benchmark_{table_name}.csv"
        if table_name in tables:
            tables[table_name].to_csv(path, index=False)
        else:  # a table this run does not have: an older run's file must not stay beside this run's report
            path.unlink(missing_ok=True)

    if scaling_rows:
        df = pd.DataFrame(scaling_rows).sort_values(["editor", "n_edits"])  # a resumed run appends out of order
        long = df.melt(id_vars=["n_edits", "editor"], value_vars=METRICS, var_name="metric", value_name="value")
        fig = px.line(long, x="n_edits", y="value", color="editor", facet_col="metric", markers=True, log_x=True,
                      title="Fig. 3: metrics vs number of simultaneous edits")
        html_parts.append(fig)
        fig_m, axes = png_figure(1, len(METRICS), figsize=(4 * len(METRICS), 3.2), sharex=True)
        for ax, metric in zip(axes, METRICS):
            for editor, g in df.groupby("editor"):
                ax.plot(g["n_edits"], g[metric], marker="o", label=editor)
                if f"{metric}_ci95" in g and g[f"{metric}_ci95"].notna().all():
                    ax.fill_between(g["n_edits"], g[metric] - g[f"{metric}_ci95"], g[metric] + g[f"{metric}_ci95"], alpha=0.2)
            ax.set_xscale("log")
            ax.set_title(metric)
            ax.set_xlabel("number of edits")
        axes[0].legend()
        save_png(fig_m, out / "edit_benchmark_fig3_scaling.png")
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
    zsre_path = out / "edit_benchmark_zsre_summaries.json"
    zsre = json.loads(zsre_path.read_text()) if zsre_path.is_file() else {}
    write_report(out, saved["summaries"], norms, scaling, zsre, saved["meta"], "consistency_proxy")


def to_markdown(df: pd.DataFrame) -> str:
    """A GitHub markdown table (no tabulate dependency)."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines)

if __name__ == "__main__":
    raise SystemExit(main())
