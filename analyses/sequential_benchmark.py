"""Lifelong editing on the default model: AlphaEdit's sequential protocol, scaled to this machine.

AlphaEdit (Fang et al., ICLR 2025, Table 1) edits 2,000 CounterFact / zsRE cases in 20 batches of
100 into one model and evaluates every edit once at the end. Here, by default:

* CounterFact: the first ``--cases`` (400) REPORT cases of the fixed split
  (:mod:`pmet_lens.data.splits`; τ and α were chosen on the TUNE part only) in batches of
  ``--batch`` (50), then :func:`~pmet_lens.evaluation.counterfact.evaluate_counterfact` on all edited
  cases (Efficacy, Generalization = paraphrase, Specificity = neighborhood, Fluency, consistency
  proxy, 95% CIs; generation metrics on every ``--gen-every``-th case);
* zsRE: the first ``--zsre`` (200) shipped records in batches of ``--zsre-batch`` (50), then
  :func:`~pmet_lens.evaluation.zsre.evaluate_zsre` under both metrics: the official procedure for the
  table set beside AlphaEdit's, the teacher-forced one labelled beside it (``docs/zsre-metrics.md``;
  ``--zsre 0`` skips zsRE);
* per-batch curves (cheap): after every batch, edit-prompt efficacy of every batch so far (the
  batch just edited, batch 1, all), perplexity of a fixed WikiText-2 test sample
  (:mod:`pmet_lens.evaluation.perplexity`; AlphaEdit's GLUE is not available offline), ‖ΔW‖ of the
  batch, ‖ΣΔW‖ and ‖W + ΣΔW‖ (means over the edited layers; per layer in the session files).

Methods (``--methods``): ``memit`` and ``pmet`` (each batch a plain mass edit of the current model),
``alphaedit`` (MEMIT's targets with the null-space projected update) and ``pmet+ns`` (PMET's
targets with the same projection, new). Each method starts from the unedited model (the previous
method's session is undone bit for bit). Every batch's session is saved under ``--out/sessions/``;
``--resume`` continues each method's session from its file (a resumed run equals an uninterrupted
one bit for bit) and keeps finished tables.

Outputs in ``--out`` (default ``figures/sequential``): ``sequential_table.csv`` (CounterFact),
``sequential_zsre.csv`` (official metric), ``sequential_zsre_teacher_forced.csv``, ``sequential_curves.csv``,
``sequential_efficacy.csv`` (per request after each batch), ``sequential_null_dims.csv``,
``sequential.html`` (interactive session view; plotly.js in ``plotly.min.js`` beside it), PNG curves,
``sequential_summaries.json`` and ``sequential_tables.md``; per method and dataset the per-record results
(``sessions/*_records.csv``) and, for each pair of :data:`PAIRS` with both, the paired per-case
differences (``sequential_paired.csv``: on the same cases the between-case spread cancels, so these CIs
are the ones to read when comparing two methods). A ``--resume`` run scores the per-record results of
finished methods that lack them (no generation).

``--replot`` rebuilds ``sequential.html`` from the curves a finished run saved, without a model.

    python analyses/sequential_benchmark.py --cases 100 --batch 25 --methods memit,alphaedit
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from pmet_lens import load_model, load_zsre
from pmet_lens.core.stats import paired_ci95
from pmet_lens.data import Fact
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, preset
from pmet_lens.editing.nullspace import NullspaceStore
from pmet_lens.editing.session import EditSession
from pmet_lens.evaluation import ZSRE_METRICS, ZsreMetric, evaluate_counterfact, evaluate_zsre, format_table
from pmet_lens.evaluation.perplexity import perplexity, wikitext_sample
from pmet_lens.evaluation.sequential import batch_efficacy, curve_row
from pmet_lens.parallel import ShardLog, Workers
from pmet_lens.viz.dashboard import session_dashboard
from pmet_lens.viz.sequential import curves_png

logger = logging.getLogger("sequential_benchmark")

METHODS = ("memit", "alphaedit", "pmet", "pmet+ns")

PAPER_TABLE1: dict[str, dict[str, float]] = {
    # AlphaEdit Table 1: 2,000 sequential edits in batches of 100. CounterFact Eff. / Gen. / Spe. /
    # Flu. / Consis.; zsRE Eff. / Gen. / Spe.
    "LLaMA3-8B MEMIT": {"efficacy": 65.65, "paraphrase": 64.65, "neighborhood": 51.56, "fluency": 437.43,
                        "consistency": 6.58, "zsre_efficacy": 34.62, "zsre_paraphrase": 31.28, "zsre_specificity": 18.49},
    "LLaMA3-8B AlphaEdit": {"efficacy": 98.90, "paraphrase": 94.22, "neighborhood": 67.88, "fluency": 622.49,
                            "consistency": 32.40, "zsre_efficacy": 94.47, "zsre_paraphrase": 91.13, "zsre_specificity": 32.55},
    "GPT-J MEMIT": {"efficacy": 98.55, "paraphrase": 95.50, "neighborhood": 63.64, "fluency": 546.28,
                    "consistency": 34.89, "zsre_efficacy": 94.91, "zsre_paraphrase": 90.22, "zsre_specificity": 30.39},
    "GPT-J AlphaEdit": {"efficacy": 99.75, "paraphrase": 96.38, "neighborhood": 75.48, "fluency": 618.50,
                        "consistency": 42.08, "zsre_efficacy": 99.79, "zsre_paraphrase": 96.00, "zsre_specificity": 28.29},
    "GPT2-XL MEMIT": {"efficacy": 94.70, "paraphrase": 85.82, "neighborhood": 60.50, "fluency": 477.26,
                      "consistency": 22.72},
    "GPT2-XL AlphaEdit": {"efficacy": 99.50, "paraphrase": 93.95, "neighborhood": 66.39, "fluency": 597.88,
                          "consistency": 39.38},
}
"""AlphaEdit Table 1 (x100 as printed; fluency as printed)."""


ZSRE_SECTIONS: dict[str, str] = {"official": "zsre", "teacher_forced": "zsre_teacher_forced"}
"""The summaries' section holding each zsRE metric's results (the official one goes beside the paper)."""


PAIRS: tuple[tuple[str, str], ...] = (("alphaedit", "memit"), ("pmet+ns", "pmet"), ("pmet", "memit"),
                                      ("pmet+ns", "alphaedit"))
"""The paired comparisons (method, against) the tables report: the projection for each editor, then the
editors with and without it."""

PAIRED_METRICS: dict[str, list[str]] = {"cf": ["efficacy_success", "paraphrase_success", "neighborhood_success"],
                                        "zsre": ["efficacy", "paraphrase", "specificity"]}
"""Per-record columns compared case by case (zsRE under the official metric)."""


def score_zsre(model, records, metrics: tuple[ZsreMetric, ...] = ZSRE_METRICS,
               progress: bool = True, workers=None, checkpoint: ShardLog | None = None
               ) -> tuple[pd.DataFrame, dict[str, dict[str, Any]]]:
    """The official metric's per-record results, and the zsRE summary of ``model`` under each of
    ``metrics`` (which must include "official"), keyed by its section of the summaries. ``workers``
    and ``checkpoint`` (one sub-log per metric) as in :func:`~pmet_lens.evaluation.zsre.evaluate_zsre`."""
    per_record = pd.DataFrame()
    summaries: dict[str, dict[str, Any]] = {}
    for m in metrics:
        rows, summaries[ZSRE_SECTIONS[m]] = evaluate_zsre(model, records, metric=m, progress=progress, workers=workers,
                                                          checkpoint=None if checkpoint is None else checkpoint.child(m))
        if m == "official":
            per_record = rows
    return per_record, summaries


def session_file(out: Path, method: str, kind: str, suffix: str) -> Path:
    """Where a run keeps ``method``'s files on ``kind`` under ``out/sessions``: the session itself
    (``suffix`` ".safetensors"), its per-batch curves ("_curves.json") and its per-record results
    ("_records.csv", for the paired comparisons)."""
    return out / "sessions" / f"{method.replace('+', '_')}_{kind}{suffix}"


def records_path(out: Path, method: str, kind: str) -> Path:
    """Where a run keeps ``method``'s per-record results on ``kind`` (for the paired comparisons)."""
    return session_file(out, method, kind, "_records.csv")


def score_edited(model, kind: str, records: list[Any], args, summarise: bool) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Per-record results of the model as edited now on ``kind`` and, with ``summarise``, its summaries
    by section (without, only what the paired comparisons need: no generation, one zsRE metric)."""
    log = shard_log(args, f"{method_of(args)}_{kind}")
    if kind == "cf":
        rows, summary = evaluate_counterfact(model, records, summarise and not args.no_generation,
                                             gen_every=args.gen_every, progress=not args.quiet, workers=args.pool,
                                             checkpoint=log)
        log.remove()
        return rows, ({"cf": summary} if summarise else {})
    rows, summaries = score_zsre(model, records, ZSRE_METRICS if summarise else ("official",),
                                 progress=not args.quiet, workers=args.pool, checkpoint=log)
    log.remove()
    return rows, (summaries if summarise else {})


def method_of(args) -> str:
    """The method being scored (``args.current``, set by the run; "unedited" for the baseline)."""
    return str(getattr(args, "current", "unedited")).replace("+", "_")


def shard_log(args, name: str) -> ShardLog:
    """The shard log of one evaluation of the run (``--out/shards/NAME``): every finished shard is kept
    there until the evaluation ends, so ``--resume`` after a killed run scores only the unfinished shards."""
    return ShardLog(Path(args.out) / "shards" / name, resume=args.resume)


def paired_table(out: Path) -> pd.DataFrame:
    """Every pair of :data:`PAIRS` whose per-record results both exist in ``out``: the mean per-case
    difference (method − against) and its 95% half-width, per dataset and metric."""
    parts = []
    for kind, columns in PAIRED_METRICS.items():
        for method, against in PAIRS:
            a, b = records_path(out, method, kind), records_path(out, against, kind)
            if a.is_file() and b.is_file():
                diff = paired_ci95(pd.read_csv(a), pd.read_csv(b), columns)
                parts.append(diff.assign(dataset=kind, method=method, against=against))
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()


def drop_unlabelled_zsre(summaries: dict[str, Any]) -> list[str]:
    """Remove zsRE results that are not under the metric their section names (results saved before the
    official metric existed were teacher-forced); ``--resume`` then scores them again. Returns their names."""
    stale = [name for section, metric in ((ZSRE_SECTIONS[m], m) for m in ZSRE_METRICS)
             for name, s in summaries.get(section, {}).items() if s.get("metric") != metric]
    for name in dict.fromkeys(stale):
        for section in ZSRE_SECTIONS.values():
            summaries.get(section, {}).pop(name, None)
    return list(dict.fromkeys(stale))


def hparams_for(model, method: str):
    """The preset of ``method`` ("pmet+ns" = PMET's preset with the projection)."""
    name = str(model.cfg.model_name)
    if method == "pmet+ns":
        return preset(name, "pmet").with_(nullspace=True)
    return preset(name, method)


def batches_of(items: list[Any], size: int) -> list[list[Any]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def curves_path(out: Path, method: str, kind: str) -> Path:
    """Where a run keeps ``method``'s per-batch curves on ``kind`` (beside its session file)."""
    return session_file(out, method, kind, "_curves.json")


def run_session(model, method: str, kind: str, batches: list[list[Fact]], args, stores, ppl_sample,
                out: Path) -> tuple[EditSession, list[dict[str, Any]], pd.DataFrame]:
    """Edit ``batches`` one after another with ``method``; after each, the cheap curves. Resumable."""
    path = session_file(out, method, kind, ".safetensors")
    track = curves_path(out, method, kind)
    kwargs = dict(cov_store=stores[0], nullspace_store=stores[1], perplexity_sample=ppl_sample,
                  perplexity_fn=partial(perplexity, workers=args.pool), progress=not args.quiet)
    curves: list[dict[str, Any]] = []
    eff_rows: list[pd.DataFrame] = []
    if args.resume and path.is_file() and track.is_file():
        session = EditSession.load(path, model, **kwargs)
        saved = json.loads(track.read_text())
        done = len(session)
        planned = [[(f.case_id, f.text, f.target_new) for f in b] for b in batches[:done]]
        got = [[(f.case_id, f.text, f.target_new) for f in r.facts] for r in session.history]
        if planned != got or len(saved["curves"]) != done:
            raise SystemExit(f"{path} holds other batches than this run plans; remove it or drop --resume")
        curves = saved["curves"]
        eff_rows = [pd.DataFrame(saved["efficacy"])]
        logger.info("%s/%s: resumed after batch %d", method, kind, done)
    else:
        session = EditSession(model, hparams=hparams_for(model, method), **kwargs)
    logger.info("%s/%s: null-space dimensions %s", method, kind, session.null_dims)
    for b in range(len(session), len(batches)):
        start = time.perf_counter()
        session.edit(batches[b], workers=args.pool)
        eff = batch_efficacy(model, batches[:b + 1], after=b + 1)
        eff_rows.append(eff)
        row = curve_row(eff, session.history[-1].metrics, b + 1)
        row["wall_seconds"] = time.perf_counter() - start
        curves.append(row)
        logger.info("%s/%s batch %d/%d: %s", method, kind, b + 1, len(batches),
                    {k: round(v, 4) for k, v in row.items() if isinstance(v, float)})
        session.save(path)
        effs = pd.concat(eff_rows, ignore_index=True)
        track.write_text(json.dumps({"curves": curves, "efficacy": effs.to_dict("records")}))
    effs = pd.concat(eff_rows, ignore_index=True) if eff_rows else pd.DataFrame()
    return session, curves, effs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=400, help="first N CounterFact REPORT cases (0: skip)")
    parser.add_argument("--batch", type=int, default=50, help="CounterFact cases per batch")
    parser.add_argument("--zsre", type=int, default=200, help="first N zsRE records (0: skip)")
    parser.add_argument("--zsre-batch", type=int, default=50, help="zsRE records per batch")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated, of {', '.join(METHODS)}")
    parser.add_argument("--gen-every", type=int, default=10, help="generation metrics on every k-th edited case")
    parser.add_argument("--no-generation", action="store_true", help="skip Fluency / consistency (smoke runs)")
    parser.add_argument("--ppl-tokens", type=int, default=8192, help="WikiText-2 test tokens for the perplexity")
    parser.add_argument("--no-baseline", action="store_true", help="skip the unedited model's rows")
    parser.add_argument("--resume", action="store_true", help="continue saved sessions and keep finished tables")
    parser.add_argument("--out", default="figures/sequential", help="output directory")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--replot", action="store_true",
                        help="only rebuild sequential.html from the curves a run saved in --out (no model, no edit)")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run target optimisation, evaluation and perplexity on N Ray workers (pip install "
                             "'pmet-lens[ray]'); results equal one process's up to float rounding")
    parser.add_argument("--address", default=None, help="with --workers: join this Ray cluster (default: a local one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.replot:
        replot(Path(args.out))
        return 0
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model()
    args.pool = Workers(args.workers, address=args.address) if args.workers else None
    try:
        return run(args, model, methods, out, t0)
    finally:
        if args.pool is not None:
            args.pool.close()


def run(args, model, methods: list[str], out: Path, t0: float) -> int:
    """The benchmark on ``model`` (``args.pool``: the worker pool or ``None``)."""
    stores = (CovarianceStore(progress=not args.quiet), NullspaceStore())
    ppl_sample = wikitext_sample(model, n_tokens=args.ppl_tokens)
    datasets: dict[str, tuple[list[list[Any]], list[Any]]] = {}
    if args.cases:
        cf = split_facts("report", limit=args.cases)
        datasets["cf"] = (batches_of(cf, args.batch), cf)
    if args.zsre:
        zs = load_zsre(limit=args.zsre)
        datasets["zsre"] = (batches_of([r.to_fact() for r in zs], args.zsre_batch), zs)

    summaries_path = out / "sequential_summaries.json"
    summaries: dict[str, Any] = json.loads(summaries_path.read_text()) if args.resume and summaries_path.is_file() else {}
    summaries.setdefault("cf", {})
    for section in ZSRE_SECTIONS.values():
        summaries.setdefault(section, {})
    stale = drop_unlabelled_zsre(summaries)
    if stale:
        logger.warning("--resume: zsRE results of %s carry no metric label (scored before the official metric); "
                       "scoring them again under both metrics", stale)
    summaries.setdefault("null_dims", {})
    summaries.setdefault("baseline_perplexity", None)
    summaries["meta"] = run_meta(summaries.get("meta", {}), args, methods, str(model.cfg.model_name))
    runs: dict[tuple[str, str], tuple[list[dict[str, Any]], pd.DataFrame]] = {}

    def write() -> None:
        summaries_path.write_text(json.dumps(summaries, indent=1, default=float))

    if not args.no_baseline:
        if summaries["baseline_perplexity"] is None:
            summaries["baseline_perplexity"] = perplexity(model, ppl_sample, workers=args.pool)
        args.current = "unedited"
        if "cf" in datasets and "unedited" not in summaries["cf"]:
            summaries["cf"]["unedited"] = score_edited(model, "cf", datasets["cf"][1], args, summarise=True)[1]["cf"]
        if "zsre" in datasets and "unedited" not in summaries["zsre"]:
            for section, summary in score_edited(model, "zsre", datasets["zsre"][1], args, summarise=True)[1].items():
                summaries[section]["unedited"] = summary
        write()
    for method in methods:
        args.current = method
        for kind, (batches, records) in datasets.items():
            session, curves, effs = run_session(model, method, kind, batches, args, stores, ppl_sample, out)
            summaries["null_dims"][method] = session.null_dims
            per_record = records_path(out, method, kind)
            if method not in summaries[kind]:
                rows, scored = score_edited(model, kind, records, args, summarise=True)
                for section, summary in scored.items():
                    summary["edit_seconds"] = float(sum(c["seconds"] for c in curves))
                    summaries[section][method] = summary
                rows.to_csv(per_record, index=False)
                write()
            elif not per_record.is_file():  # scored by a run that kept no per-record results
                logger.info("%s/%s: scoring the per-record results for the paired comparisons", method, kind)
                score_edited(model, kind, records, args, summarise=False)[0].to_csv(per_record, index=False)
            runs[(method, kind)] = (curves, effs)
            session.undo(to=0)  # the next method starts from the unedited model, bit for bit
    summaries["seconds"] = time.perf_counter() - t0
    write()
    kinds = [k for k, n in (("cf", "cases"), ("zsre", "zsre")) if summaries["meta"][n]]
    curves_df, eff_df = all_curves(out, runs, kinds)
    write_outputs(out, summaries, curves_df, eff_df)
    return 0


def run_meta(previous: dict[str, Any], args, methods: list[str], model_name: str) -> dict[str, Any]:
    """The settings the outputs describe. A ``--resume`` run that skips a dataset (``--cases 0`` or
    ``--zsre 0``) keeps the earlier run's settings for it, whose results the outputs still show."""
    meta = {"cases": args.cases, "batch": args.batch, "zsre": args.zsre, "zsre_batch": args.zsre_batch,
            "gen_every": args.gen_every, "ppl_tokens": args.ppl_tokens,
            "methods": list(dict.fromkeys([*previous.get("methods", []), *methods])), "model": model_name}
    if previous and not args.cases:
        meta.update({k: previous[k] for k in ("cases", "batch", "gen_every") if k in previous})
    if previous and not args.zsre:
        meta.update({k: previous[k] for k in ("zsre", "zsre_batch") if k in previous})
    return meta


def saved_curves(out: Path, method: str, kind: str) -> tuple[list[dict[str, Any]], pd.DataFrame] | None:
    """The per-batch curves and efficacy table a run saved for ``method`` on ``kind``, or ``None``."""
    track = curves_path(out, method, kind)
    if not track.is_file():
        return None
    saved = json.loads(track.read_text())
    return saved["curves"], pd.DataFrame(saved["efficacy"])


def all_curves(out: Path, runs: dict[tuple[str, str], tuple[list[dict[str, Any]], pd.DataFrame]],
               kinds: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The curves of this run's methods and of every other method an earlier run saved in ``out`` (so a
    ``--resume`` run with other ``--methods`` keeps the earlier methods in the figures), in ``METHODS`` order."""
    curves: list[dict[str, Any]] = []
    effs: list[pd.DataFrame] = []
    for method in METHODS:
        for kind in kinds:
            found = runs.get((method, kind)) or saved_curves(out, method, kind)
            if found is None:
                continue
            curves += [dict(c, method=method, dataset=kind) for c in found[0]]
            if len(found[1]):
                effs.append(found[1].assign(method=method, dataset=kind))
    return pd.DataFrame(curves), (pd.concat(effs, ignore_index=True) if effs else pd.DataFrame())


def write_outputs(out: Path, summaries: dict[str, Any], curves: pd.DataFrame, eff: pd.DataFrame) -> None:
    """Tables (CSV, markdown), curves (CSV, PNG) and the HTML session view."""
    if summaries["cf"]:
        table = format_table(summaries["cf"])
        table.to_csv(out / "sequential_table.csv")
    for section in ZSRE_SECTIONS.values():
        if summaries.get(section):
            format_table(summaries[section], columns=["efficacy", "paraphrase", "specificity", "score"]).to_csv(
                out / f"sequential_{section}.csv")
    dims = [{"method": m, "hook": h, "null_dim": d} for m, hooks in summaries["null_dims"].items() for h, d in hooks.items()]
    pd.DataFrame(dims).to_csv(out / "sequential_null_dims.csv", index=False)
    if len(curves):
        curves.to_csv(out / "sequential_curves.csv", index=False)
        eff.to_csv(out / "sequential_efficacy.csv", index=False)
        for kind in dict.fromkeys(curves["dataset"]):
            part = curves[curves["dataset"] == kind]
            curves_png(part, out / f"sequential_curves_{kind}.png", title=f"Sequential editing ({kind})")
        write_session_view(out, curves, eff)
    paired = paired_table(out)
    if len(paired):
        paired.to_csv(out / "sequential_paired.csv", index=False)
    (out / "sequential_tables.md").write_text(markdown_tables(summaries) + paired_markdown(paired)
                                             + curves_markdown(curves, summaries.get("baseline_perplexity")))


def write_session_view(out: Path, curves: pd.DataFrame, eff: pd.DataFrame) -> Path:
    """``sequential.html``: the session view of the CounterFact curves (zsRE's when CounterFact was not
    run), loading plotly.js from ``plotly.min.js`` beside it (:mod:`pmet_lens.viz.html`)."""
    cf_curves = curves[curves["dataset"] == "cf"] if "cf" in set(curves["dataset"]) else curves
    cf_eff = eff[eff["dataset"] == cf_curves["dataset"].iloc[0]]
    path = out / "sequential.html"
    session_dashboard(cf_curves, cf_eff, batch=1, html_path=path, plotlyjs="directory")
    return path


def replot(out: Path) -> Path:
    """Rebuild ``sequential.html`` from the curves a run saved in ``out`` (``sequential_summaries.json``
    and ``sessions/*_curves.json``), without a model: the numbers are the run's."""
    summaries_path = out / "sequential_summaries.json"
    if not summaries_path.is_file():
        raise SystemExit(f"--replot: {summaries_path} does not exist; give the --out of a finished run")
    meta = json.loads(summaries_path.read_text())["meta"]
    kinds = [k for k, n in (("cf", "cases"), ("zsre", "zsre")) if meta[n]]
    curves, eff = all_curves(out, {}, kinds)
    if not len(curves):
        raise SystemExit(f"--replot: {out}/sessions holds no saved curves")
    return write_session_view(out, curves, eff)


def paired_markdown(paired: pd.DataFrame) -> str:
    """The paired differences as markdown: x100 points, 95% CI of the per-case difference."""
    if not len(paired):
        return ""
    lines = ["", "Paired differences on the same cases (method − against, x100 points, 95% CI of the per-case "
             "difference; zsRE under the official metric):", "",
             "| dataset | method − against | Eff. | Gen. | Spe. | n |", "|---|---|---|---|---|---|"]
    for (kind, method, against), part in paired.groupby(["dataset", "method", "against"], sort=False):
        cells = [f"{100 * r['difference']:+.1f} ± {100 * r['ci95']:.1f}" for _, r in part.iterrows()]
        lines.append(f"| {kind} | {method} − {against} | {' | '.join(cells)} | {int(part['n'].min())} |")
    return "\n".join(lines) + "\n"


def curves_markdown(curves: pd.DataFrame, baseline_perplexity: float | None = None) -> str:
    """The per-batch curves as markdown, one table per dataset: edit-prompt efficacy (x100) of the batch
    just edited, of batch 1 and of all edits so far, perplexity, mean ‖ΔW‖ of the batch and ‖ΣΔW‖, and the
    seconds the batch's edit took."""
    if not len(curves):
        return ""
    lines = []
    for kind in dict.fromkeys(curves["dataset"]):
        part = curves[curves["dataset"] == kind]
        lines += ["", f"Per-batch curves ({kind}; efficacy on the edit prompts, x100):", "",
                  "| method | batch | this batch | batch 1 | all so far | perplexity | mean ‖ΔW‖ | mean ‖ΣΔW‖ | edit s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        if baseline_perplexity is not None:
            lines.append(f"| unedited | 0 | – | – | – | {baseline_perplexity:.2f} | – | – | – |")
        for _, r in part.iterrows():
            lines.append(f"| {r['method']} | {r['batch']} | {100 * r['efficacy_batch']:.1f} | "
                         f"{100 * r['efficacy_first']:.1f} | {100 * r['efficacy_all']:.1f} | {r['perplexity']:.2f} | "
                         f"{r['delta_norm']:.2f} | {r['weight_change_norm']:.2f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def markdown_tables(summaries: dict[str, Any]) -> str:
    """The CounterFact and zsRE tables (x100, fluency x100 as the papers print it) beside AlphaEdit's."""
    meta = summaries["meta"]
    zsre = (f"{meta['zsre']} zsRE records in batches of {meta['zsre_batch']}" if meta["zsre"] else "no zsRE")
    has_gen = any("fluency" in v for v in summaries["cf"].values())
    gen = f"generation metrics on every {meta['gen_every']}th case" if has_gen else "no generation metrics"
    lines = [f"SmolLM2-135M-Instruct: {meta['cases']} CounterFact report cases in batches of {meta['batch']}, "
             f"{zsre}; {gen}. AlphaEdit Table 1: 2,000 edits in batches of 100.", ""]
    lines += ["| model / method | Eff. | Gen. | Spe. | Flu. | Consis. (proxy here) |", "|---|---|---|---|---|---|"]

    def cell(s: dict[str, Any], key: str, scale: float = 100.0) -> str:
        if key not in s or s[key] is None:
            return "–"
        ci = s.get(f"{key}_ci95")
        return f"{s[key] * scale:.1f}" + (f" ± {ci * scale:.1f}" if ci is not None else "")

    for name, s in summaries["cf"].items():
        cons = "consistency_proxy" if "consistency_proxy" in s else "consistency"
        lines.append(f"| SmolLM2 {name} | {cell(s, 'efficacy')} | {cell(s, 'paraphrase')} | {cell(s, 'neighborhood')} | "
                     f"{cell(s, 'fluency')} | {cell(s, cons)} |")
    for name, p in PAPER_TABLE1.items():
        lines.append(f"| {name} (paper) | {p['efficacy']:.1f} | {p['paraphrase']:.1f} | {p['neighborhood']:.1f} | "
                     f"{p['fluency']:.1f} | {p['consistency']:.1f} |")
    if summaries["zsre"]:
        lines += ["", "zsRE, official metric (the papers' procedure, docs/zsre-metrics.md):", "",
                  "| model / method | metric | zsRE Eff. | Gen. | Spe. |", "|---|---|---|---|---|"]
        for name, s in summaries["zsre"].items():
            lines.append(f"| SmolLM2 {name} | {s['metric']} | {cell(s, 'efficacy')} | {cell(s, 'paraphrase')} | "
                         f"{cell(s, 'specificity')} |")
        for name, p in PAPER_TABLE1.items():
            if "zsre_efficacy" in p:
                lines.append(f"| {name} (paper) | official | {p['zsre_efficacy']:.1f} | {p['zsre_paraphrase']:.1f} | "
                             f"{p['zsre_specificity']:.1f} |")
    if summaries.get("zsre_teacher_forced"):
        lines += ["", "zsRE, teacher-forced metric (not the papers' procedure; no paper rows):", "",
                  "| model / method | metric | zsRE Eff. | Gen. | Spe. |", "|---|---|---|---|---|"]
        for name, s in summaries["zsre_teacher_forced"].items():
            lines.append(f"| SmolLM2 {name} | {s['metric']} | {cell(s, 'efficacy')} | {cell(s, 'paraphrase')} | "
                         f"{cell(s, 'specificity')} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
