"""pmet-lens command line: similarity, trace, edit, session, evaluate, calibrate, export.

Each subcommand is a thin layer over the library (imported lazily, so ``--help`` is instant):
``similarity`` -> :func:`pmet_lens.analysis.similarity.component_similarity` (PMET Fig. 2),
``trace`` -> :func:`pmet_lens.analysis.tracing.trace` / ``average_traces`` (causal tracing),
``edit`` -> :func:`pmet_lens.editing.edit` (writes a delta file),
``evaluate`` -> :func:`pmet_lens.evaluation.counterfact.evaluate_counterfact` / ``evaluate_zsre`` (optionally with a
delta file applied), ``calibrate`` -> :func:`pmet_lens.calibration.calibrate` (R, λ, c; a user
preset), ``export`` -> :func:`pmet_lens.export.export_hf` / ``export_gguf``. Every input (files, records,
preset names, hyper-parameters) is checked before the model is loaded; bad input ends with ``error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Sequence, cast

__all__ = ["main", "build_parser"]

EXIT_BAD_INPUT = 2

logger = logging.getLogger("pmet_lens.cli")


class CLIError(Exception):
    """A user error, reported as one line on stderr with exit status 2."""


def _existing_file(path: str | None, what: str) -> Path | None:
    if path is None:
        return None
    p = Path(path)
    if not p.is_file():
        raise CLIError(f"{what} not found: {p}")
    return p


def _load_model(name: str | None):
    from pmet_lens.core.models import DEFAULT_MODEL, load_model

    logger.info("loading model %s", name or DEFAULT_MODEL)
    return load_model(name)


def _write_table(df, out: str | None) -> None:
    if out is None:
        print(df.to_string(index=False))
        return
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(out, index=False)
    print(f"wrote {out}")


def _check_pool_args(args: argparse.Namespace) -> None:
    """``--workers`` / ``--address`` checked before anything is loaded."""
    workers, address = getattr(args, "workers", None), getattr(args, "address", None)
    if workers is None and address is not None:
        raise CLIError("--address needs --workers N (how many workers to run on the cluster)")
    if workers is not None and workers < 1:
        raise CLIError(f"--workers must be >= 1, got {workers}")


def _pool(args: argparse.Namespace):
    """The worker pool of ``--workers`` / ``--address`` (``None``: this process); closed by the caller."""
    _check_pool_args(args)
    workers, address = getattr(args, "workers", None), getattr(args, "address", None)
    if workers is None:
        return None
    from pmet_lens.parallel import Workers

    try:
        return Workers(workers, address=address)
    except ImportError as exc:
        raise CLIError(str(exc)) from None


def _shard_log(args: argparse.Namespace, default: Path | None):
    """The shard log of a long run: ``--shards DIR`` or ``default`` (beside ``--out``); ``--resume``
    takes its finished shards. ``None`` when the run writes no output to resume into."""
    directory = Path(args.shards) if getattr(args, "shards", None) else default
    if directory is None:
        if getattr(args, "resume", False):
            raise CLIError("--resume needs --out (or --shards DIR): the finished shards are kept beside the output")
        return None
    from pmet_lens.parallel import ShardLog

    return ShardLog(directory, resume=bool(getattr(args, "resume", False)))


def _beside(out: str | None, suffix: str = ".shards") -> Path | None:
    """``OUT.shards`` beside an output file (``None`` without one)."""
    return None if out is None else Path(out).with_name(Path(out).name + suffix)


def _add_pool_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="run the sharded work on N Ray workers (pip install 'pmet-lens[ray]'); results equal one process's")
    p.add_argument("--address", default=None,
                   help="join this Ray cluster (e.g. 'auto' after `ray start --head`, or host:6379) instead of "
                        "starting a local one; default $RAY_ADDRESS")


def _add_resume_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", default=None, metavar="DIR",
                   help="keep each finished shard here as it completes (default: beside --out); removed when the run ends")
    p.add_argument("--resume", action="store_true",
                   help="after a killed run: take the finished shards kept by it and compute only the others")


# ---------------------------------------------------------------------------- similarity
def _cmd_similarity(args: argparse.Namespace) -> int:
    from pmet_lens.analysis.similarity import component_similarity
    from pmet_lens.data import load_known_facts

    facts = load_known_facts(_existing_file(args.facts, "known-facts file"), limit=args.limit)
    model = _load_model(args.model)
    variant = ["paper", "logit_lens"] if args.variant == "both" else args.variant
    pool = _pool(args)
    try:
        df = component_similarity(model, [f.prompt for f in facts], k=args.k, variant=variant, progress=True,
                                  workers=pool)
    finally:
        if pool is not None:
            pool.close()
    _write_table(df, args.out)
    return 0


# ---------------------------------------------------------------------------- trace
def _cmd_trace(args: argparse.Namespace) -> int:
    import pandas as pd

    from pmet_lens.analysis import tracing

    if (args.prompt is None) == (args.average is None):
        raise CLIError("give either --prompt and --subject (one prompt) or --average N (averaged run)")
    if args.prompt is not None and not args.subject:
        raise CLIError("--prompt needs --subject")
    if args.prompt is not None and (args.resume or args.shards):
        raise CLIError("--resume / --shards apply to the averaged run (--average N)")
    log = _shard_log(args, _beside(args.out)) if args.average is not None else None
    model = _load_model(args.model)
    pool = _pool(args)
    try:
        if args.prompt is not None:
            result = tracing.trace(model, args.prompt, args.subject, kind=args.kind, samples=args.samples,
                                   window=args.window, target=args.target, seed=args.seed, workers=pool)
            df = pd.DataFrame(result.scores.numpy(), index=result.tokens).reset_index(names="token")
            print(f"target {result.target!r}: clean P = {result.high_score:.4f}, corrupted P = {result.low_score:.4f}")
            _write_table(df, args.out)
            return 0
        from pmet_lens.analysis.averaged import average_traces
        from pmet_lens.data import load_known_facts

        # --average N means N facts the model KNOWS: examine the known-facts file in order until N are found
        avg = average_traces(model, load_known_facts(), kinds=(args.kind,), severed=not args.no_sever,
                             samples=args.samples, window=args.window, seed=args.seed, limit=args.average,
                             progress=True, workers=pool, checkpoint=log)
    finally:
        if pool is not None:
            pool.close()
    print(f"averaged over {avg.n_facts} known facts (of {avg.n_seen} examined)")
    _write_table(avg.class_frame(), args.out)
    if avg.severed_mean:
        _write_table(avg.severed_frame(), None if args.out is None else _severed_path(args.out))
    if log is not None:
        log.remove()
    return 0


def _severed_path(out: str) -> str:
    """Where the averaged run writes its severed curves: ``<out stem>_severed<suffix>`` beside ``out``."""
    path = Path(out)
    return str(path.with_name(f"{path.stem}_severed{path.suffix or '.csv'}"))


# ---------------------------------------------------------------------------- edit
def _check_preset(name: str | None) -> None:
    from pmet_lens.editing.hparams import preset_names

    known = preset_names()
    if name is not None and name not in known:
        raise CLIError(f"unknown preset {name!r}; known presets: {', '.join(known)}")


def _hparams_overrides(value: str | None, method: str) -> tuple[dict[str, Any], str]:
    """The ``--hparams`` overrides and where they came from; ``value`` is a JSON file or an inline
    JSON object. Names are checked here; values when the hyper-parameters are built."""
    if value is None:
        return {}, ""
    from dataclasses import fields

    from pmet_lens.editing.hparams import METHODS

    if value.lstrip().startswith("{"):
        source, text = "--hparams", value
    else:
        source, text = value, _existing_file(value, "hparams file").read_text(encoding="utf-8")  # type: ignore[union-attr]
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{source} is not valid JSON ({exc}); give a JSON object such as '{{\"lam\": 600}}' "
                       "or a file holding one") from None
    if not isinstance(overrides, dict):
        raise CLIError(f"{source} must hold a JSON object of hyper-parameters, got {type(overrides).__name__}")
    if overrides.get("method", method) != method:
        raise CLIError(f"{source} names method {overrides['method']!r} but --method is {method!r}")
    cls = METHODS[method]
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(overrides) - names - {"method"})
    if unknown:
        raise CLIError(f"unknown hyper-parameter(s) in {source}: {unknown}; {cls.__name__} has {sorted(names)}")
    return overrides, source


def _hparams(args: argparse.Namespace, model_name: str, overrides: dict[str, Any], source: str):
    """The preset of ``--preset`` (default: of ``model_name``) with the overrides applied."""
    from pmet_lens.editing import preset
    from pmet_lens.editing.hparams import hparams_from_dict

    hp = preset(args.preset or model_name, args.method)
    if not overrides:
        return hp
    try:
        return hparams_from_dict({**hp.to_dict(), **overrides, "method": args.method})
    except (TypeError, ValueError) as exc:
        raise CLIError(f"bad hyper-parameters in {source}: {exc}") from None


def _cmd_edit(args: argparse.Namespace) -> int:
    from pmet_lens.core.models import DEFAULT_MODEL
    from pmet_lens.data import as_facts, read_records

    # every input is checked before the model is loaded
    records = read_records(_existing_file(args.facts, "facts file"), "facts")  # type: ignore[arg-type]
    if args.limit is not None:
        records = records[: args.limit]
    facts = as_facts(records)
    corpus = _existing_file(args.corpus, "corpus file")
    _check_preset(args.preset)
    overrides, source = _hparams_overrides(args.hparams, args.method)
    # the preset is known without the model when it is named or the model is the default one
    hp = _hparams(args, DEFAULT_MODEL, overrides, source) if args.preset or args.model is None else None
    model = _load_model(args.model)
    if hp is None:
        hp = _hparams(args, str(model.cfg.model_name), overrides, source)
    store = None
    if corpus is not None:
        from pmet_lens.editing import CovarianceStore

        store = CovarianceStore(corpus=corpus, progress=True)
    from pmet_lens.editing import edit

    pool = _pool(args)
    try:
        result = edit(model, facts, method=args.method, hparams=hp, cov_store=store, apply=False, progress=True,
                      compile=args.compile, workers=pool)
    finally:
        if pool is not None:
            pool.close()
    path = result.save(args.out)
    print(f"edited {len(facts)} fact(s) with {args.method}; wrote {path}")
    return 0


# ---------------------------------------------------------------------------- session
EDIT_METHODS = ("pmet", "memit", "alphaedit", "emmet", "rome", "r-rome", "ft-w", "ft-l", "mend")
"""The ``--method`` choices of ``edit``: every method of :data:`pmet_lens.editing.hparams.METHODS` (a test checks)."""
SESSION_METHODS = (*EDIT_METHODS, "pmet+ns")


def _cmd_session(args: argparse.Namespace) -> int:
    """Edit the facts in batches of ``--batch`` one after another (lifelong editing), saving the
    session file after every batch; ``--resume`` continues a saved session."""
    from pmet_lens.data import as_facts, read_records
    from pmet_lens.editing.session import EditSession

    records = read_records(_existing_file(args.facts, "facts file"), "facts")  # type: ignore[arg-type]
    if args.limit is not None:
        records = records[: args.limit]
    if args.batch < 1:
        raise CLIError(f"--batch must be >= 1, got {args.batch}")
    facts = as_facts(records)
    corpus = _existing_file(args.corpus, "corpus file")
    out = Path(args.out)
    if args.resume and not out.is_file():
        raise CLIError(f"--resume: no session file at {out}")
    model = _load_model(args.model)
    store = None
    if corpus is not None:
        from pmet_lens.editing import CovarianceStore

        store = CovarianceStore(corpus=corpus, progress=True)
    if args.resume:
        session = EditSession.load(out, model, cov_store=store)
    else:
        base = "pmet" if args.method == "pmet+ns" else args.method
        overrides, source = _hparams_overrides(args.hparams, base)
        hp = _hparams(argparse.Namespace(**{**vars(args), "method": base}), str(model.cfg.model_name), overrides, source)
        if args.method == "pmet+ns":
            hp = hp.with_(nullspace=True)
        session = EditSession(model, hparams=hp, cov_store=store)
    batches = [facts[i:i + args.batch] for i in range(0, len(facts), args.batch)]
    done = sum(len(r.facts) for r in session.history)
    if args.resume and done % args.batch:
        raise CLIError(f"{out} holds {done} edited facts, not a multiple of --batch {args.batch}")
    pool = _pool(args)
    try:
        for b in range(done // args.batch, len(batches)):
            session.edit(batches[b], overwrite=args.overwrite, workers=pool)
            session.save(out)
            print(f"batch {b + 1}/{len(batches)}: {len(batches[b])} fact(s); wrote {out}")
    finally:
        if pool is not None:
            pool.close()
    return 0


# ---------------------------------------------------------------------------- evaluate
def _cmd_evaluate(args: argparse.Namespace) -> int:
    from pmet_lens.data import Fact, ZsreRecord, load_counterfact, load_zsre
    from pmet_lens.evaluation import evaluate_counterfact, evaluate_zsre, format_table

    records_path = _existing_file(args.records, "records file")
    delta_path = _existing_file(args.delta, "delta file")
    records: list[Fact] | list[ZsreRecord]  # per --dataset
    if args.dataset == "counterfact":
        if records_path is None and args.split:
            from pmet_lens.data.splits import split_facts

            records = split_facts(args.split, limit=args.limit)
        else:
            records = load_counterfact(records_path, limit=args.limit)
    else:
        records = load_zsre(records_path, limit=args.limit)
    session_path = _existing_file(getattr(args, "session", None), "session file")
    if session_path is not None and delta_path is not None:
        raise CLIError("pass --delta or --session, not both")
    log = _shard_log(args, _beside(args.out))
    model = _load_model(args.model)
    result = None
    if session_path is not None:
        result = _load_session(session_path, model)
    if delta_path is not None:
        from pmet_lens.editing import EditResult

        try:
            result = EditResult.load(delta_path, model, apply=True)
        except ValueError as exc:
            raise CLIError(str(exc)) from None
        except Exception as exc:  # safetensors raises its own error type on a non-safetensors file
            raise CLIError(f"{delta_path} is not a readable pmet-lens delta file ({exc})") from None
    pool = None
    try:
        pool = _pool(args)
        if args.dataset == "counterfact":
            per_record, summary = evaluate_counterfact(model, cast("list[Fact]", records), generation=not args.no_generation,
                                                       gen_every=args.gen_every, seed=args.seed, progress=True,
                                                       workers=pool, checkpoint=log)
        else:
            per_record, summary = evaluate_zsre(model, cast("list[ZsreRecord]", records), metric=args.zsre_metric,
                                                progress=True, workers=pool, checkpoint=log)
    finally:
        if pool is not None:
            pool.close()
        if result is not None:
            result.restore()
    print(format_table({"edited" if result is not None else "unedited": summary}).to_string())
    print(json.dumps(summary, indent=1, default=float))
    _write_table(per_record, args.out)
    if args.summary:
        Path(args.summary).write_text(json.dumps(summary, indent=1, default=float))
    if log is not None:
        log.remove()
    return 0


def _load_session(path: Path, model):
    """The session in ``path`` written into ``model``, as an object whose ``restore()`` undoes it."""
    from pmet_lens.editing.session import EditSession

    try:
        session = EditSession.load(path, model)
    except ValueError as exc:
        raise CLIError(str(exc)) from None

    class _Undo:
        def restore(self) -> None:
            session.undo(to=0)

    return _Undo()


# ---------------------------------------------------------------------------- parser
# ------------------------------------------------------------------------ calibrate, export
def _floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise CLIError(f"{what} must be comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 for v in values):
        raise CLIError(f"{what} must be positive numbers, got {text!r}")
    return values


def _cmd_calibrate(args: argparse.Namespace) -> int:
    from pmet_lens.calibration import calibrate, calibration_page

    if args.replot:
        if not args.out:
            raise CLIError("--replot rebuilds --out's calibrate.html from the tables there: give --out DIR")
        try:
            page = calibration_page(args.out)
        except FileNotFoundError as exc:
            raise CLIError(str(exc)) from None
        print(f"rebuilt {page}")
        return 0
    methods = [m for m in args.methods.split(",") if m] if args.methods else []
    bad = [m for m in methods if m not in ("pmet", "memit")]
    if bad:
        raise CLIError(f"--methods takes pmet and/or memit, got {bad}")
    lams, clamps = _floats(args.lams, "--lams"), _floats(args.clamps, "--clamps")
    base = {k: v for k, v in (("steps", args.steps), ("cov_tokens", args.cov_tokens)) if v is not None}
    out = Path(args.out) if args.out else None
    log = _shard_log(args, None if out is None else out / "shards")
    model = _load_model(args.model)
    pool = _pool(args)
    try:
        result = calibrate(model, n_facts=args.facts, min_facts=args.min_facts, known_only=not args.any_facts,
                           size=args.size, samples=args.samples, n_boot=args.boot, methods=methods,
                           tune_facts=args.tune_facts, lams=lams, clamps=clamps, base=base or None,
                           write=not args.no_write, preset_dir=args.presets, seed=args.seed, progress=True,
                           workers=pool, checkpoint=log)
    finally:
        if pool is not None:
            pool.close()
    summary = result.summary()
    scan = result.scan
    print(f"{result.model_name}: R = {result.layers} (L = {scan.last}) from {scan.n_facts} facts "
          f"({scan.n_seen} examined) in {result.seconds['layers']:.0f} s; R wins {100 * scan.confidence:.1f}% of "
          f"{scan.n_boot} bootstrap resamples; 95% band: {summary['band95']}")
    for method, chosen in result.chosen.items():
        print(f"{method}: λ = {chosen['lam']:g}, clamp c = {chosen['clamp_norm_factor']:g} "
              f"(grid of {len(lams)} λ x {len(clamps)} c on {args.tune_facts} tune facts)")
    if len(result.search):
        print(result.search.to_string(index=False))
    for path in result.preset_paths:
        print(f"preset written: {path}")
    if out is not None:
        result.write(out)
        print(f"wrote {out}/calibrate_{{curves,wins,search}}.csv, calibrate_summary.json, calibrate.html "
              "(plotly.js beside it in plotly.min.js)")
    if log is not None:
        log.remove()
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from pmet_lens.export import export_gguf, export_hf

    out = Path(args.out)
    if out.exists() and not args.overwrite:
        raise CLIError(f"{out} exists; pass --overwrite to replace it")
    delta = _existing_file(args.delta, "delta file")
    model = _load_model(args.model)
    if delta is not None:
        from pmet_lens.editing import EditResult

        try:
            EditResult.load(delta, model, apply=True)
        except Exception as exc:  # a truncated or foreign file: report it as bad input
            if isinstance(exc, ValueError):
                raise
            raise CLIError(f"cannot read delta file {delta}: {exc}") from exc
    if args.format == "gguf":
        export_gguf(model, out, dtype=args.dtype, overwrite=args.overwrite)
    else:
        export_hf(model, out, overwrite=args.overwrite)
    print(f"wrote {out} ({args.format}{', ' + args.dtype if args.format == 'gguf' else ''}"
          f"{', edited by ' + str(delta) if delta else ''})")
    return 0


def _add_own_model_commands(sub: Any) -> None:
    """The ``calibrate`` and ``export`` subcommands (a model of the user's own: its R, λ and export)."""
    p = sub.add_parser("calibrate", help="choose R, λ and the clamp for a model; writes a user preset",
                       description="R from the critical-layers rule on the last subject token's plain and MLP-severed "
                                   "traces over known facts (with a bootstrap band), then λ and the clamp c of PMET and "
                                   "MEMIT on the tune split; the preset goes to the user preset directory, where "
                                   "`edit` finds it by the model's name.")
    p.add_argument("model", nargs="?", default=None,
                   help="model name, checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--facts", type=int, default=100, help="known facts for R (default 100)")
    p.add_argument("--min-facts", type=int, default=None, help="fewest usable facts accepted (default: --facts)")
    p.add_argument("--any-facts", action="store_true", help="trace facts the model gets wrong too (its own answers)")
    p.add_argument("--size", type=int, default=5, help="layers in R (default 5)")
    p.add_argument("--samples", type=int, default=10, help="noise samples per trace (default 10)")
    p.add_argument("--boot", type=int, default=1000, help="bootstrap resamples for the band on R (default 1000)")
    p.add_argument("--methods", default="pmet,memit", help="editors to search λ and c for ('' for R only)")
    p.add_argument("--tune-facts", type=int, default=32, help="tune-split cases edited per grid point (default 32)")
    p.add_argument("--lams", default="3,10,30,100,300,1000,3000,10000", help="λ grid")
    p.add_argument("--clamps", default="0.75,1.5", help="clamp factor grid")
    p.add_argument("--steps", type=int, default=None, help="optimisation steps (default: the method's)")
    p.add_argument("--cov-tokens", type=int, default=None, help="corpus tokens for C (default: the method's)")
    p.add_argument("--presets", default=None,
                   help="user preset directory to write (default: $PMET_LENS_PRESETS, else $PMET_LENS_CACHE/presets)")
    p.add_argument("--no-write", action="store_true", help="do not write a preset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="directory for the evidence: CSV tables, summary JSON, figure (HTML, works offline); "
                                 "the layer scan's finished shards are kept in OUT/shards until the run ends")
    p.add_argument("--replot", action="store_true",
                   help="only rebuild --out's calibrate.html from the tables a run wrote there (no model)")
    _add_pool_options(p)
    _add_resume_options(p)
    p.set_defaults(func=_cmd_calibrate)

    p = sub.add_parser("export", help="write a model (optionally with a delta file applied) as a transformers "
                                      "checkpoint or GGUF",
                       description="Export the model as it is after applying --delta: a transformers checkpoint "
                                   "directory (safetensors, config, tokenizer) or, for a model loaded from GGUF, a "
                                   "GGUF file (f32/f16). Nothing is written until the export is complete.")
    p.add_argument("model", nargs="?", default=None,
                   help="model name, checkpoint directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")
    p.add_argument("--out", required=True, help="directory (hf) or file (gguf) to write")
    p.add_argument("--delta", help="delta file from `pmet-lens edit` to apply first")
    p.add_argument("--format", choices=["hf", "gguf"], default="hf")
    p.add_argument("--dtype", choices=["f32", "f16"], default="f32", help="GGUF weight type (default f32)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.set_defaults(func=_cmd_export)


def build_parser() -> argparse.ArgumentParser:
    """The argparse parser of ``pmet-lens`` (seven subcommands)."""
    parser = argparse.ArgumentParser(prog="pmet-lens", description=__doc__.split("\n\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="log INFO messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", default=None, help="TransformerLens model name (default: the embedded SmolLM2-135M-Instruct)")

    p = sub.add_parser("similarity", help="MHSA vs FFN similarity per layer (PMET Fig. 2)",
                       description="Cosine and top-k Jaccard similarity of each component's input and output "
                                   "at the last token of ROME's known facts (PMET Fig. 2).")
    common(p)
    p.add_argument("--facts", help="known_1000.json-format file (default: the shipped one)")
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts")
    p.add_argument("-k", "--k", type=int, default=50, help="top-k tokens for the Jaccard similarity (default 50)")
    p.add_argument("--variant", choices=["paper", "logit_lens", "both"], default="paper")
    p.add_argument("--out", help="CSV path (default: print)")
    _add_pool_options(p)
    p.set_defaults(func=_cmd_similarity)

    p = sub.add_parser("trace", help="causal tracing of one prompt or the averaged run",
                       description="Causal tracing (ROME; MEMIT Appendix A): restore states in a subject-corrupted run.")
    common(p)
    p.add_argument("--prompt", help="prompt to trace, e.g. 'The Eiffel Tower is located in the city of'")
    p.add_argument("--subject", help="subject inside the prompt (its tokens are corrupted)")
    p.add_argument("--target", help="answer to score (default: the model's greedy token)")
    p.add_argument("--average", type=int, metavar="N", help="average over the first N known facts instead")
    p.add_argument("--kind", choices=["hidden", "mlp", "attn"], default="hidden")
    p.add_argument("--samples", type=int, default=10, help="noise samples (default 10)")
    p.add_argument("--window", type=int, default=10, help="layers restored together for mlp/attn (default 10)")
    p.add_argument("--no-sever", action="store_true", help="averaged run: skip the severed MLP/attention curves")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="CSV path (default: print); the averaged run writes its severed curves beside it, "
                                 "as NAME_severed.csv")
    _add_pool_options(p)
    _add_resume_options(p)
    p.set_defaults(func=_cmd_trace)

    p = sub.add_parser("edit", help="edit facts from a JSON file; writes a delta file",
                       description="Edit facts (CounterFact records or {subject, prompt, target_new} dicts) "
                                   "with PMET, MEMIT, AlphaEdit, EMMET, ROME, r-ROME, FT-W, FT-L or MEND and save the weight "
                                   "deltas (safetensors).")
    common(p)
    p.add_argument("--facts", required=True, help="JSON list (or .jsonl) of records")
    p.add_argument("--method", choices=EDIT_METHODS, default="pmet",
                   help="editor (default pmet; alphaedit: MEMIT's targets with AlphaEdit's null-space projected "
                        "update; rome / r-rome: one fact after another; ft-w / ft-l: fine-tuning; mend: a trained "
                        "editor network, e.g. --hparams '{\"network\": \"zsre\"}'; see docs/editing.md)")
    p.add_argument("--preset", help="hyper-parameter preset (SmolLM2-135M-Instruct, gpt-j-6B, gpt-neox-20b; default: the model's)")
    p.add_argument("--hparams", help="hyper-parameter overrides: a JSON object, inline (e.g. '{\"lam\": 600}') or "
                                     "in a file")
    p.add_argument("--limit", type=int, default=None, help="edit the first N records")
    p.add_argument("--out", required=True, help="delta file to write (.safetensors)")
    p.add_argument("--corpus", help="text file for the key statistics C (default: the shipped WikiText-2 text); it "
                                    "needs at least the preset's cov_tokens tokens")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the target optimisation (needs a C++ compiler; compiling adds start-up time)")
    _add_pool_options(p)
    p.set_defaults(func=_cmd_edit)

    p = sub.add_parser("session", help="lifelong editing: facts in batches, one after another; writes a session file",
                       description="Edit facts in batches of --batch into one model, one batch after another "
                                   "(AlphaEdit's protocol; alphaedit and pmet+ns use the null-space projected update), "
                                   "saving the session (every batch's deltas and statistics) after each batch.")
    common(p)
    p.add_argument("--facts", required=True, help="JSON list (or .jsonl) of records")
    p.add_argument("--method", choices=SESSION_METHODS, default="alphaedit")
    p.add_argument("--batch", type=int, required=True, help="facts per batch")
    p.add_argument("--preset", help="hyper-parameter preset (default: the model's)")
    p.add_argument("--hparams", help="JSON object of hyper-parameter overrides, e.g. {\"nullspace_threshold\": 0.01}")
    p.add_argument("--limit", type=int, default=None, help="edit the first N records")
    p.add_argument("--out", required=True, help="session file to write (.safetensors)")
    p.add_argument("--resume", action="store_true", help="continue the session saved in --out")
    p.add_argument("--overwrite", action="store_true", help="allow re-editing a subject and prompt of an earlier batch")
    p.add_argument("--corpus", help="text file for the key statistics C (default: the shipped WikiText-2 text)")
    _add_pool_options(p)
    p.set_defaults(func=_cmd_session)

    p = sub.add_parser("evaluate", help="CounterFact / zsRE metrics, optionally with a delta file applied",
                       description="CounterFact (efficacy, paraphrase, neighborhood, score, fluency, consistency proxy) "
                                   "or zsRE (top-1 token accuracy) evaluation.")
    common(p)
    p.add_argument("--dataset", choices=["counterfact", "zsre"], default="counterfact")
    p.add_argument("--records", help="records file (default: the shipped subset)")
    p.add_argument("--split", choices=["tune", "report"], help="CounterFact: only this part of the shipped split")
    p.add_argument("--delta", help="delta file from `pmet-lens edit` to apply first")
    p.add_argument("--session", help="session file from `pmet-lens session` to apply first (all its batches)")
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N records")
    p.add_argument("--no-generation", action="store_true", help="skip fluency / consistency (fast)")
    p.add_argument("--gen-every", type=int, default=1, help="generation metrics on every k-th record")
    p.add_argument("--zsre-metric", choices=["teacher_forced", "official"], default="teacher_forced",
                   help="zsRE: teacher-forced token accuracy, or the papers' official procedure (docs/zsre-metrics.md)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="per-record CSV (default: print)")
    p.add_argument("--summary", help="also write the summary as JSON here")
    _add_pool_options(p)
    _add_resume_options(p)
    p.set_defaults(func=_cmd_evaluate)
    _add_own_model_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``pmet-lens``; returns the exit status (0 ok, 2 bad input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from pmet_lens.data import DataError

    try:
        _check_pool_args(args)
        return int(args.func(args) or 0)
    except CLIError as exc:
        print(f"error: {exc}", file=sys.stderr)
    except (FileNotFoundError, FileExistsError, DataError) as exc:
        print(f"error: {exc}", file=sys.stderr)
    except ValueError as exc:  # the library's validation errors (EditError is a ValueError)
        print(f"error: {exc}", file=sys.stderr)
    return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
