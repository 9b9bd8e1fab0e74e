"""Calibrate a model with no preset in one call: R, then λ and the clamp c of PMET and MEMIT, then a
user preset that :func:`pmet_lens.editing.edit` picks up by the model's name.

1. R: :func:`pmet_lens.analysis.layer_scan.scan_layers`, the critical-layers rule (MEMIT section 3,
   Fig. 3) on the last subject token's plain and MLP-severed curves over known facts, with a
   bootstrap band.
2. λ and c, per method, on the TUNE part of the CounterFact split only
   (:func:`pmet_lens.data.splits.split_facts`; never the report part). The search is a grid:
   for each clamp factor c in ``clamps`` the targets of all tune facts are optimised once (PMET
   eq. 9 / MEMIT eq. 16: they depend on c but not on λ, an
   ``EditHyperParams.update_only_fields`` field), then for each λ in
   ``lams`` the update (MEMIT eq. 14 / PMET eq. 10) is solved from those targets
   (``edit(targets=...)``), the probability metrics are computed (efficacy, paraphrase,
   neighborhood and their harmonic mean, the Score), and the weights are restored bit for bit.
   The best Score wins; ties go to the setting nearest the method's defaults (summed |log ratio|
   of λ and c), so a flat region never moves a setting away from them.
3. The preset: R into the user's ``critical_layers.json`` (with its band), the chosen settings
   into the user's ``editing.json`` (:mod:`pmet_lens.core.presets`), under ``cfg.model_name``.

This module sits above evaluation (the λ search scores edits) and viz (the figure, drawn from the
result's tables); the R step alone, the layer scan, lives in :mod:`pmet_lens.analysis.layer_scan`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence, cast

import pandas as pd
from transformer_lens import HookedTransformer

from pmet_lens.analysis.layer_scan import LayerScan, scan_layers
from pmet_lens.analysis.layers import write_critical_layers
from pmet_lens.core.models import load_model, require_model
from pmet_lens.core.presets import find_entry, write_entry
from pmet_lens.data import KnownFact, load_known_facts
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, MEMITHyperParams, PMETHyperParams, edit
from pmet_lens.evaluation import evaluate_counterfact
from pmet_lens.parallel import one_pool

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_CLAMPS", "DEFAULT_LAMS", "CalibrationResult", "calibrate", "calibration_page", "search_lambda"]

EVIDENCE_FILES: tuple[str, ...] = ("calibrate_curves.csv", "calibrate_wins.csv", "calibrate_search.csv",
                                   "calibrate_summary.json", "calibrate.html")
"""What :meth:`CalibrationResult.write` puts in its folder (beside ``plotly.min.js`` for the page)."""

DEFAULT_LAMS: tuple[float, ...] = (3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0, 10000.0)
"""λ grid: half-decade steps from 3 to 10^4 (the papers' GPT-J / GPT-NeoX λ are 6000-20000; a
135M model's keys are smaller, so the grid reaches well below)."""
DEFAULT_CLAMPS: tuple[float, ...] = (0.75, 1.5)
"""Clamp factors c: the papers' 3/4 and twice that."""

_CLASSES = {"pmet": PMETHyperParams, "memit": MEMITHyperParams}


@dataclass
class CalibrationResult:
    """The evidence of :func:`calibrate`.

    Attributes:
        model_name: ``cfg.model_name`` the preset was written for.
        scan: the R scan (per-fact curves, R, bootstrap wins).
        search: one row per (method, c, λ): Score, efficacy, paraphrase, neighborhood.
        chosen: method -> the chosen settings (``lam``, ``clamp_norm_factor`` and the rest).
        preset_paths: the preset files written (empty when nothing was written).
        seconds: wall time of each stage ("layers", "search").
    """

    model_name: str
    scan: LayerScan
    search: pd.DataFrame
    chosen: dict[str, dict[str, Any]]
    preset_paths: list[Path] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        """R."""
        return list(self.scan.layers)

    def curves(self) -> pd.DataFrame:
        """Per layer: mean plain / MLP-severed effect, gap, its 95% half-width, membership of R."""
        return self.scan.curves_frame()

    def wins(self) -> pd.DataFrame:
        """Bootstrap share of each candidate run (the band on R)."""
        return self.scan.wins_frame()

    def summary(self) -> dict[str, Any]:
        """JSON-ready summary: R, its confidence and band, chosen settings, timings."""
        return {"model": self.model_name, "R": self.layers, "L": self.scan.last, "facts": self.scan.n_facts,
                "facts_seen": self.scan.n_seen, "known_only": self.scan.known_only,
                "R_bootstrap_share": self.scan.confidence, "band95": self.scan.band(0.95),
                "n_boot": self.scan.n_boot, "chosen": self.chosen,
                "preset_paths": [str(p) for p in self.preset_paths], "seconds": self.seconds}

    def figure(self) -> Any:
        """Plotly figure: the gap per layer with R shaded, and the bootstrap shares of the runs
        (:func:`pmet_lens.viz.calibration.calibration_figure`)."""
        from pmet_lens.viz.calibration import calibration_figure

        return calibration_figure(self.curves(), self.wins(), self.layers, n_facts=self.scan.n_facts,
                                  model_name=self.model_name)

    def write(self, out: str | Path) -> list[Path]:
        """Write the evidence to the folder ``out`` (:data:`EVIDENCE_FILES`): the curves, the bootstrap
        wins and the λ search as CSV, :meth:`summary` as JSON, and :meth:`figure` as ``calibrate.html``,
        which loads plotly.js from ``plotly.min.js`` beside it (:mod:`pmet_lens.viz.html`; works offline).
        Returns the paths written."""
        from pmet_lens.viz.html import write_figure

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        curves, wins, search, summary, page = (out / name for name in EVIDENCE_FILES)
        self.curves().to_csv(curves, index=False)
        self.wins().to_csv(wins, index=False)
        self.search.to_csv(search, index=False)
        summary.write_text(json.dumps(self.summary(), indent=2, default=str) + "\n")
        write_figure(self.figure(), page)
        return [curves, wins, search, summary, page]


def calibration_page(out: str | Path) -> Path:
    """Rebuild ``calibrate.html`` in the folder ``out`` from the tables :meth:`CalibrationResult.write`
    put there (``calibrate_curves.csv``, ``calibrate_wins.csv``, ``calibrate_summary.json``), without a
    model: the figure shows the saved numbers. Returns the page's path.

    Raises:
        FileNotFoundError: a table is missing (the message names it).
    """
    from pmet_lens.viz.calibration import calibration_figure
    from pmet_lens.viz.html import write_figure

    out = Path(out)
    curves_path, wins_path, _, summary_path, page = (out / name for name in EVIDENCE_FILES)
    missing = [str(p) for p in (curves_path, wins_path, summary_path) if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"cannot rebuild {page}: {', '.join(missing)} missing; give the folder that "
                                "CalibrationResult.write (pmet-lens calibrate --out) wrote")
    summary = json.loads(summary_path.read_text())
    wins = pd.read_csv(wins_path)
    wins["layers"] = [json.loads(x) for x in wins["layers"]]  # "[3, 4, 5]" in the CSV
    fig = calibration_figure(pd.read_csv(curves_path), wins, summary["R"], n_facts=summary["facts"],
                             model_name=summary["model"])
    return write_figure(fig, page)


def _distance(row: dict[str, Any], base: Any) -> float:
    return abs(math.log(row["lam"] / base.lam)) + abs(math.log(row["clamp"] / base.clamp_norm_factor))


# Not part of a method's calibrated settings: the method and R are stored elsewhere, and the null-space
# fields (AlphaEdit's τ and α) are not searched here; the model's own null-space block is kept as it is.
_NOT_STORED = ("method", "layers", "nullspace", "nullspace_threshold", "l2")


@one_pool
def search_lambda(
    model: HookedTransformer,
    method: str,
    layers: Sequence[int],
    facts: Sequence[Any],
    *,
    lams: Sequence[float] = DEFAULT_LAMS,
    clamps: Sequence[float] = DEFAULT_CLAMPS,
    base: dict[str, Any] | None = None,
    cov_store: CovarianceStore | None = None,
    progress: bool = False,
    workers: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The λ x c grid of one method on ``facts`` (module docstring, step 2). ``workers`` (an int or a
    :class:`~pmet_lens.parallel.Workers` pool) optimises each clamp's targets and scores each grid
    point's records on a pool; the solves stay in this process.

    Returns:
        ``(rows, chosen)``: the grid as a table, and the chosen hyper-parameters as a dict
        (:meth:`~pmet_lens.editing.hparams.EditHyperParams.to_dict` without ``method``, ``layers`` and the
        null-space fields, which are not searched).
    """
    require_model(model, "pmet_lens.calibration.search_lambda")
    if method not in _CLASSES:
        raise ValueError(f"method must be 'pmet' or 'memit', got {method!r}")
    if not lams or not clamps or any(not (x > 0) for x in [*lams, *clamps]):
        raise ValueError(f"lams and clamps must be non-empty lists of positive numbers, got {lams!r} and {clamps!r}")
    if not facts:
        raise ValueError("no tune facts to search λ on")
    cls = _CLASSES[method]
    defaults = cls(layers=tuple(layers), **(base or {}))
    store = cov_store if cov_store is not None else CovarianceStore(progress=progress)
    rows: list[dict[str, Any]] = []
    for c in clamps:
        hp = defaults.with_(clamp_norm_factor=float(c))
        first = edit(model, facts, hparams=hp, cov_store=store, apply=False, progress=progress, workers=workers)
        for lam in lams:
            solved = hp.with_(lam=float(lam), context_prefixes=first.prefixes)
            with edit(model, facts, hparams=solved, cov_store=store, targets=first.targets, progress=False):
                _, summary = evaluate_counterfact(model, facts, generation=False, progress=False, workers=workers)
            row = {"method": method, "clamp": float(c), "lam": float(lam), "n_facts": len(facts)}
            row.update({k: float(summary[k]) for k in ("score", "efficacy", "paraphrase", "neighborhood")})
            logger.info("%s c=%g λ=%g: Score %.3f (efficacy %.3f, paraphrase %.3f, neighborhood %.3f)", method, c,
                        lam, row["score"], row["efficacy"], row["paraphrase"], row["neighborhood"])
            rows.append(row)
    ranked = sorted(rows, key=lambda r: (-round(r["score"], 9) if math.isfinite(r["score"]) else math.inf,
                                         _distance(r, defaults)))
    best = ranked[0]
    chosen_hp = defaults.with_(lam=best["lam"], clamp_norm_factor=best["clamp"])
    chosen = {k: v for k, v in chosen_hp.to_dict().items() if k not in _NOT_STORED}
    return pd.DataFrame(rows), chosen


@one_pool
def calibrate(
    model: HookedTransformer | str | os.PathLike[str] | None = None,
    *,
    facts: Sequence[KnownFact] | None = None,
    n_facts: int = 100,
    min_facts: int | None = None,
    known_only: bool = True,
    size: int = 5,
    samples: int = 10,
    n_boot: int = 1000,
    methods: Sequence[str] = ("pmet", "memit"),
    tune_facts: int = 32,
    lams: Sequence[float] = DEFAULT_LAMS,
    clamps: Sequence[float] = DEFAULT_CLAMPS,
    base: dict[str, Any] | None = None,
    cov_store: CovarianceStore | None = None,
    write: bool = True,
    preset_dir: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    workers: Any = None,
    checkpoint: Any = None,
) -> CalibrationResult:
    """R, λ and c for ``model`` and a user preset that :func:`pmet_lens.editing.edit` then uses.

    Args:
        model: a model loaded with :func:`pmet_lens.core.models.load_model`, or anything ``load_model``
            takes, loaded here: a transformers checkpoint directory, a ``.gguf`` file, a TransformerLens
            model name, or ``None`` for the embedded default model. ``cfg.model_name`` names the preset.
        facts: known facts for R (default ROME's shipped known facts).
        n_facts: see :func:`pmet_lens.analysis.layer_scan.scan_layers`.
        min_facts: see :func:`pmet_lens.analysis.layer_scan.scan_layers`.
        known_only: see :func:`pmet_lens.analysis.layer_scan.scan_layers`.
        size: see :func:`pmet_lens.analysis.layer_scan.scan_layers`.
        samples: see :func:`pmet_lens.analysis.layer_scan.scan_layers`.
        n_boot: see :func:`pmet_lens.analysis.layer_scan.scan_layers`.
        methods: editors to search λ and c for (empty: R only).
        tune_facts: first N cases of the TUNE split edited together in each grid point.
        lams: the λ grid (:data:`DEFAULT_LAMS`).
        clamps: the clamp-factor grid (:data:`DEFAULT_CLAMPS`).
        base: other hyper-parameter fields for the search (e.g. ``{"steps": 10}``), kept in the preset.
        cov_store: covariance cache (default: the user's cache on WikiText-2).
        write: write the preset.
        preset_dir: the user preset directory to write it to (default
            :func:`pmet_lens.core.presets.user_presets_dir`).
        workers: ``None`` (this process), an int (one local pool of that many workers for the whole
            call) or a :class:`~pmet_lens.parallel.Workers` pool: the layer scan traces facts, and the
            search optimises targets and scores records, in shards on the workers (results equal the
            single process's).
        checkpoint: a :class:`~pmet_lens.parallel.ShardLog` for the layer scan's shards, so that a
            killed run resumes the scan with its unfinished shards.

    Raises:
        TypeError: ``model`` is neither a HookedTransformer nor a name or path (``None``: the default).
        ValueError: bad settings, or too few usable facts (see ``scan_layers``); nothing is written then.
        FileNotFoundError: a path that does not exist.
    """
    by_name = model is None or isinstance(model, (str, os.PathLike))
    if not by_name:
        require_model(model, "pmet_lens.calibrate", accepts_path=True)
    methods = [m.lower() for m in methods]
    bad = [m for m in methods if m not in _CLASSES]
    if bad:
        raise ValueError(f"methods must be among 'pmet', 'memit'; got {bad}")
    if isinstance(tune_facts, bool) or not isinstance(tune_facts, int) or tune_facts < 1:
        raise ValueError(f"tune_facts must be an int >= 1, got {tune_facts!r}")
    model = load_model(cast("str | os.PathLike[str] | None", model)) if by_name else cast(HookedTransformer, model)
    name = str(model.cfg.model_name)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    scan = scan_layers(model, facts if facts is not None else load_known_facts(), n_facts=n_facts,
                       min_facts=min_facts, known_only=known_only, size=size, samples=samples, seed=seed,
                       n_boot=n_boot, progress=progress, workers=workers, checkpoint=checkpoint)
    seconds["layers"] = round(time.perf_counter() - t0, 1)
    tables, chosen = [], {}
    t0 = time.perf_counter()
    if methods:
        tune = split_facts("tune", limit=tune_facts)
        store = cov_store if cov_store is not None else CovarianceStore(progress=progress)
        for method in methods:
            table, chosen[method] = search_lambda(model, method, scan.layers, tune, lams=lams, clamps=clamps,
                                                  base=base, cov_store=store, progress=progress, workers=workers)
            tables.append(table)
    seconds["search"] = round(time.perf_counter() - t0, 1)
    search = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(
        columns=["method", "clamp", "lam", "n_facts", "score", "efficacy", "paraphrase", "neighborhood"])
    result = CalibrationResult(model_name=name, scan=scan, search=search, chosen=chosen, seconds=seconds)
    if write:
        result.preset_paths.append(write_critical_layers(
            name, scan.layers, f"pmet_lens.calibrate, {scan.n_facts} facts", preset_dir,
            bootstrap_share=round(scan.confidence, 3), band95=scan.band(0.95)))
        if chosen:
            entry: dict[str, Any] = {"source": f"pmet_lens.calibrate, {tune_facts} tune facts, "
                                               f"λ in {list(lams)}, c in {list(clamps)}"}
            entry.update(chosen)
            existing = find_entry("editing.json", name, preset_dir)
            if existing is not None and "nullspace" in existing[1]:
                entry["nullspace"] = existing[1]["nullspace"]  # τ and α, chosen for this model elsewhere
            result.preset_paths.append(write_entry("editing.json", name, entry, preset_dir))
    logger.info("calibrated %s: R = %s; %s", name, scan.layers,
                ", ".join(f"{m} λ={c['lam']:g} c={c['clamp_norm_factor']:g}" for m, c in chosen.items()))
    return result

