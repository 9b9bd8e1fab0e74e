"""Choose the SmolLM2 editing λ, clamp c, steps and lr on the TUNE part of the CounterFact split
(never the report part).

For each method (PMET, MEMIT) with its preset (critical layers R from causal tracing) and each
combination of clamp factor c (``--clamps``; |δ| ≤ c·|initial output| after every step), number
of optimisation steps (``--steps``) and Adam learning rate (``--lrs``) (each defaults to the
preset's value only), the targets of all tune facts are optimised ONCE (they depend on c, steps
and lr but not on λ), then for every λ of the grid the weight update (MEMIT eq. 14 / PMET eq. 10) is solved,
written, the probability metrics of ROME/MEMIT (efficacy, paraphrase, neighborhood and their
harmonic mean, the Score) are computed on the tune facts, and the weights are restored
bit-for-bit. The (c, steps, lr, C's tokens, λ) with the best Score (ties: the one closest to the preset) is
reported, and with ``--write`` stored in the user's ``editing.json``
(``pmet_lens.core.presets.user_presets_dir()``, or ``--presets DIR``), which ``pmet_lens.editing.preset``
reads before the package's read-only presets. All tune facts are edited in one mass edit, as in the
benchmark (PMET Table 1).

    python analyses/tune_editing.py --limit 100 --write
    python analyses/tune_editing.py --clamps 0.75,1.5,3 --lams 30,300 --out figures/tune_clamp
    python analyses/tune_editing.py --methods pmet --steps 15,30,60 --lrs 0.1,0.2,0.4 --lams 10,30,100
    python analyses/tune_editing.py --limit 48 --cov-tokens 100000,200000,400000 --lams 30,300 --out figures/tune_cov_tokens
    python analyses/tune_editing.py --methods pmet --start 48 --limit 52 --clamps 1.5,3 --lams 30 --out figures/tune_pmet_confirm

The baseline editors have no λ to sweep: ``ft-w`` / ``ft-l`` (FT-W's weight decay, ``--wds``, FT-L's ε,
``--eps``, and the fine-tuned layer, ``--layers``) and ``rome`` / ``r-rome`` (the layer, ``--layers``) are
edited once per grid point and scored the same way (ROME and r-ROME one fact after another, as they edit).
``emmet`` takes the λ grid as its α (C ← αC; the targets are reused as for MEMIT) and ``--layers`` too.
Without a preset for the model (FT-W on a new model), a method starts from its class defaults.

    python analyses/tune_editing.py --methods ft-w --limit 48 --layers 2,4,8,12,16,20,24 --wds 0,5e-4,5e-2 --out figures/tune_ft_w
    python analyses/tune_editing.py --methods emmet --limit 48 --lams 1000,10000,100000 --out figures/tune_emmet

Writes ``<out>/tune_editing.csv`` (one row per method and grid point: c, steps, lr, C's token count and λ;
the layer, weight decay and ε of the one-layer methods) and ``<out>/tune_editing.json`` (the best row per
method). ``analyses/tune_presets.sh`` runs the search that chose the PMET and MEMIT presets.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np
import pandas as pd

from pmet_lens import load_model
from pmet_lens.core.presets import find_entry, write_entry
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import METHODS, CovarianceStore, EditHyperParams, FTHyperParams, edit, preset
from pmet_lens.evaluation import evaluate_counterfact
from pmet_lens.parallel import Workers, run_shards

logger = logging.getLogger("tune_editing")

DEFAULT_GRID = (100.0, 300.0, 1000.0, 3000.0, 10000.0, 30000.0)

TUNED = (("clamp", "clamp_norm_factor", float), ("steps", "steps", int), ("lr", "lr", float),
         ("cov_tokens", "cov_tokens", int), ("lam", "lam", float))
"""The searched settings: (column of tune_editing.csv, hyper-parameter field, type)."""

TUNED_DIRECT = (("layer", "layers", int), ("weight_decay", "weight_decay", float),
                ("norm_constraint", "norm_constraint", float))
"""The searched settings of the methods edited once per grid point (ROME, r-ROME, FT-W, FT-L): the layer
(stored as ``layers=[l]``), FT's weight decay and FT-L's ε; a method uses those its class has."""


def sweep(model, facts, hparams, lams, store, cov_tokens=None) -> list[dict]:
    """Targets once (``edit(apply=False)``), then per λ (and per covariance size, if ``cov_tokens``
    names several) an edit that reuses them (``edit(targets=...)``, same prefixes), the evaluation,
    and the exact restore on exiting it. The targets do not depend on λ or on C."""
    t0 = time.perf_counter()
    first = edit(model, facts, hparams=hparams, cov_store=store, apply=False)
    t_targets = time.perf_counter() - t0
    rows = []
    for n_tokens, lam in itertools.product(cov_tokens or [hparams.cov_tokens], lams):
        hp = hparams.with_(lam=lam, cov_tokens=n_tokens, context_prefixes=first.prefixes)
        with edit(model, facts, hparams=hp, cov_store=store, targets=first.targets, progress=False):
            _, summary = evaluate_counterfact(model, facts, generation=False, progress=False)
        row = {"method": hparams.method, "clamp": hparams.clamp_norm_factor, "steps": hparams.steps,
               "lr": hparams.lr, "cov_tokens": n_tokens, "lam": lam, "n_facts": len(facts),
               "layers": list(hparams.layers), "target_seconds": round(t_targets, 1),
               "mean_target_prob": float(np.mean(first.stats["prob"])),
               "mean_steps": float(np.mean(first.stats["steps"]))}
        row.update({k: summary[k] for k in ("score", "efficacy", "paraphrase", "neighborhood")})
        logger.info("%s c=%g steps=%d lr=%g C from %d tokens λ=%g: score %.3f efficacy %.3f paraphrase %.3f "
                    "neighborhood %.3f", hparams.method, hparams.clamp_norm_factor, hparams.steps, hparams.lr,
                    n_tokens, lam, row["score"], row["efficacy"], row["paraphrase"], row["neighborhood"])
        rows.append(row)
    return rows


def sweep_direct(model, facts, hparams, store) -> dict:
    """One edit with ``hparams`` (ROME / r-ROME one fact after another, FT-W / FT-L all at once), the
    evaluation, and the exact restore on exiting it."""
    t0 = time.perf_counter()
    with edit(model, facts, hparams=hparams, cov_store=store, progress=False) as result:
        seconds = time.perf_counter() - t0
        _, summary = evaluate_counterfact(model, facts, generation=False, progress=False)
    row = {"method": hparams.method, "layer": hparams.layers[0], "n_facts": len(facts),
           "weight_decay": getattr(hparams, "weight_decay", None), "norm_constraint": getattr(hparams, "norm_constraint", None),
           "edit_seconds": round(seconds, 1), "delta_norm": float(sum(d.double().norm() ** 2 for d in result.deltas.values()) ** 0.5)}
    row.update({k: summary[k] for k in ("score", "efficacy", "paraphrase", "neighborhood")})
    logger.info("%s layer %d wd %s ε %s: score %.3f efficacy %.3f paraphrase %.3f neighborhood %.3f (%.0f s)",
                hparams.method, row["layer"], row["weight_decay"], row["norm_constraint"], row["score"],
                row["efficacy"], row["paraphrase"], row["neighborhood"], seconds)
    return row


def grid_point(model, kind, facts, hparams, lams, store, cov_tokens=None) -> list[dict]:
    """One grid point (a shard of the search): :func:`sweep` over λ of a target-and-solve method
    (``kind`` "sweep"), or :func:`sweep_direct`'s one edit (``kind`` "direct")."""
    if kind == "sweep":
        return [{**r, "layer": hparams.layers[-1]} for r in sweep(model, facts, hparams, lams, store, cov_tokens)]
    return [sweep_direct(model, facts, hparams, store)]


def _distance(values: pd.Series, reference: float, column: str) -> pd.Series:
    """How far a searched setting is from the preset's: |Δ| for a layer, |log ratio| otherwise (a 0 weight
    decay counts as 1e-6)."""
    v = values.astype(float)
    if column == "layer":
        return (v - reference).abs()
    return np.abs(np.log(np.maximum(v, 1e-6) / max(reference, 1e-6)))


def tuned_columns(base) -> tuple[tuple[str, str, type], ...]:
    """The searched settings of ``base``'s method: :data:`TUNED` for the target-and-solve methods,
    the fields of :data:`TUNED_DIRECT` its class has otherwise."""
    if isinstance(base, EditHyperParams) and base.method not in ("rome", "r-rome"):
        return TUNED
    return tuple(t for t in TUNED_DIRECT if hasattr(base, t[1]) and (t[0] != "norm_constraint" or base.norm_constraint is not None))


def _reference(base, attr: str) -> float:
    value = getattr(base, attr)
    return float(value[0] if attr == "layers" else value)


def pick_best(rows: pd.DataFrame, base) -> dict:
    """The row with the best Score; among rows with the same Score (few tune facts make ties common),
    the one closest to the preset ``base`` (summed |log ratio| of c, steps, lr, covariance tokens and
    λ; of the one-layer methods the layer's distance plus the |log ratio| of the weight decay and ε),
    so a tie never moves a setting away from the preset."""
    distance = sum(_distance(rows[col], _reference(base, attr), col) for col, attr, _ in tuned_columns(base))
    ranked = rows.assign(_score=rows["score"].round(9), _distance=distance)
    ranked = ranked.sort_values(["_score", "_distance"], ascending=[False, True], kind="stable")
    return ranked.drop(columns=["_score", "_distance"]).iloc[0].to_dict()


def starting_point(name: str, method: str):
    """The method's preset for ``name``, or its class defaults when it has none (FT-W on a new model)."""
    try:
        return preset(name, method)
    except ValueError as err:
        logger.warning("%s; searching from %s's defaults", err, METHODS[method].__name__)
        return METHODS[method]()


def grid(text: str | None, cast, default) -> list | None:
    """A comma-separated option as a list of ``cast`` values; unset: ``[default]`` (``None`` if no default)."""
    if text:
        return [cast(x) for x in text.split(",")]
    return None if default is None else [default]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=100, help="tune facts to edit (at most 100)")
    parser.add_argument("--start", type=int, default=0,
                        help="skip the first START tune facts, e.g. --start 48 --limit 52 to confirm a search made "
                             "on the first 48 on the tune facts it did not use")
    parser.add_argument("--methods", default="pmet,memit", help=f"comma-separated, of {','.join(METHODS)}")
    parser.add_argument("--lams", default=",".join(str(x) for x in DEFAULT_GRID), help="comma-separated λ grid")
    parser.add_argument("--clamps", default=None,
                        help="comma-separated clamp factors c (targets are re-optimised per c); default: the preset's")
    parser.add_argument("--steps", default=None,
                        help="comma-separated step counts (targets are re-optimised per value); default: the preset's")
    parser.add_argument("--lrs", default=None,
                        help="comma-separated learning rates (targets are re-optimised per value); default: the preset's")
    parser.add_argument("--cov-tokens", default=None,
                        help="comma-separated corpus token counts for C (the targets are reused); default: the preset's")
    parser.add_argument("--layers", default=None,
                        help="rome, r-rome, ft-w, ft-l, emmet: comma-separated layers, each edited alone; default: the preset's")
    parser.add_argument("--wds", default=None, help="ft-w, ft-l: comma-separated weight decays on ΔW; default: the preset's")
    parser.add_argument("--eps", default=None, help="ft-l: comma-separated L∞ bounds ε; default: the preset's")
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--write", action="store_true",
                        help="store the best (c, steps, lr, cov_tokens, λ) in the user's editing.json (read before the shipped presets)")
    parser.add_argument("--presets", type=Path, default=None,
                        help="user preset directory for --write (default: pmet_lens.core.presets.user_presets_dir())")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run the grid points (method, c, steps, lr) on N Ray workers, one point per shard "
                             "(pip install 'pmet-lens[ray]'); the rows equal one process's")
    parser.add_argument("--address", default=None, help="with --workers: join this Ray cluster (default: a local one)")
    args = parser.parse_args(argv)
    tune = split_facts("tune")
    if not 0 <= args.start < len(tune):
        parser.error(f"--start must be in [0, {len(tune)}) (the tune split has {len(tune)} facts), got {args.start}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    model = load_model()
    name = model.cfg.model_name
    facts = tune[args.start:args.start + args.limit]
    lams = grid(args.lams, float, None)
    cov_tokens = grid(args.cov_tokens, int, None)
    store = CovarianceStore()
    points = []  # one shard per grid point; a target-and-solve point's λ (and C size) sweep runs inside it
    bases = {}
    for method in args.methods.split(","):
        if method not in METHODS:
            parser.error(f"unknown method {method!r}; choose from {','.join(METHODS)}")
        bases[method] = base = starting_point(name, method)
        layer_grid = grid(args.layers, int, None)
        layer_sets = [(l,) for l in layer_grid] if layer_grid else [base.layers]
        if isinstance(base, EditHyperParams) and method not in ("rome", "r-rome"):
            clamps = grid(args.clamps, float, base.clamp_norm_factor)
            steps = grid(args.steps, int, base.steps)
            lrs = grid(args.lrs, float, base.lr)
            assert clamps is not None and steps is not None and lrs is not None  # each has the preset's default
            if layer_grid and method != "emmet":
                parser.error("--layers applies to rome, r-rome, ft-w, ft-l and emmet (the others use R)")
            for layers, c, n_steps, lr in itertools.product(layer_sets, clamps, steps, lrs):
                hp = base.with_(layers=layers, clamp_norm_factor=c, steps=n_steps, lr=lr)
                points.append(("sweep", facts, hp, lams))
        else:
            ft = isinstance(base, FTHyperParams)
            wds = (grid(args.wds, float, base.weight_decay) if ft else None) or [None]
            eps = (grid(args.eps, float, base.norm_constraint) if ft else None) or [None]
            if not ft and (args.wds or args.eps):
                parser.error("--wds and --eps apply to ft-w and ft-l")
            for layers, wd, e in itertools.product(layer_sets, wds, eps):
                changes = {"layers": layers, **({} if wd is None else {"weight_decay": wd}),
                           **({} if e is None else {"norm_constraint": e})}
                points.append(("direct", facts, base.with_(**changes), None))
    pool = Workers(args.workers, address=args.address) if args.workers else None
    try:
        parts = run_shards(model, grid_point, points, common={"store": store, "cov_tokens": cov_tokens}, workers=pool,
                           desc="grid points", progress=True)
    finally:
        if pool is not None:
            pool.close()
    rows = [row for part in parts for row in part]
    df = pd.DataFrame(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    df.to_csv(args.out / "tune_editing.csv", index=False)
    best = {m: pick_best(df[df.method == m], bases[m]) for m in df.method.unique()}
    (args.out / "tune_editing.json").write_text(json.dumps(best, indent=2, default=str) + "\n")
    for m, row in best.items():
        logger.info("best %s: %s (score %.3f on %d tune facts)", m,
                    ", ".join(f"{col} {row[col]}" for col, _, _ in tuned_columns(bases[m])), row["score"], row["n_facts"])
    if args.write:
        found = find_entry("editing.json", name, args.presets)
        entry = json.loads(json.dumps(found[1])) if found is not None else {}
        for m, row in best.items():
            entry.setdefault(m, {}).update({attr: [cast(row[col])] if attr == "layers" else cast(row[col])
                                            for col, attr, cast in tuned_columns(bases[m])})
            if m == "emmet":
                entry[m]["layers"] = [int(row["layer"])]
        path = write_entry("editing.json", name, entry, args.presets)
        logger.info("wrote %s", path)
    print(df.to_string(index=False))


if __name__ == "__main__":
    main()
