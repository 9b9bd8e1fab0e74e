"""Benchmark: each sharded stage at full size in one process (2 threads), on 2 Ray workers (1 thread
each) and on 1 Ray worker (1 thread), in the same run, on the default model.

Stages (full size; ``--quick`` shrinks them for a smoke test):

* Fig. 2: :func:`~pmet_lens.analysis.similarity.component_similarity` on the 1209 known facts' prompts;
* targets: the target optimisation of a 32-fact PMET edit (:func:`~pmet_lens.editing.targets.optimise_targets`),
  plus, once, the rest of the edit that stays in one process (keys, residuals, solve);
* evaluation: :func:`~pmet_lens.evaluation.counterfact.evaluate_counterfact` with generation on 128
  report-split records;
* C: the key statistics of one layer (:class:`~pmet_lens.editing.CovarianceStore`, no disk cache);
* layer scan: :func:`~pmet_lens.analysis.layer_scan.scan_layers` (the fast path to R) until 32 known facts.

For every stage: wall time of each configuration, the speed-up of 2 workers over one process, the
parallel efficiency T(1 worker) / (2 · T(2 workers)), the number of shards and the per-shard
overhead (a shard's wall time on the driver minus its compute time on the worker, mean); fixed
costs: starting Ray, starting the workers, sending the model to them. Each pool result is checked
against the single process's (largest difference printed). Figures go to ``--out``
(``benchmarks/results/parallel.json``), which ``scripts/render_scaling.py`` turns into the tables
and the projection of ``docs/scaling.md``.

    python benchmarks/bench_parallel.py            # full size, run ALONE on the machine (~40 min on 2 cores)
    python benchmarks/bench_parallel.py --quick --out /tmp/parallel_quick.json   # smoke test, ~3 min
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from pmet_lens import load_counterfact, load_known_facts, load_model
from pmet_lens.analysis.layer_scan import scan_layers
from pmet_lens.analysis.similarity import component_similarity
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, context_prefixes, edit, preset
from pmet_lens.editing.engine import edit_sites
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.targets import optimise_targets
from pmet_lens.evaluation.counterfact import evaluate_counterfact
from pmet_lens.parallel import Workers

from machine import cpu_name, machine_line  # benchmarks/machine.py (the script's folder is on sys.path)

REPO = Path(__file__).resolve().parents[1]


def sizes(quick: bool) -> dict[str, Any]:
    """Items per stage (full size, or the smoke test's)."""
    if quick:
        return {"fig2": 48, "targets": 4, "steps": 4, "evaluation": 6, "max_length": 24, "cov_tokens": 6000,
                "scan": 3, "samples": 2}
    return {"fig2": None, "targets": 32, "steps": None, "evaluation": 128, "max_length": 100, "cov_tokens": None,
            "scan": 32, "samples": 10}


def make_stages(model, quick: bool) -> dict[str, dict[str, Any]]:
    """Each stage: its item count and unit, and ``run(workers) -> comparable result``."""
    size = sizes(quick)
    name = str(model.cfg.model_name)
    prompts = [f.prompt for f in load_known_facts(limit=size["fig2"])]
    hp = preset(name, "pmet")
    if size["steps"]:
        hp = hp.with_(steps=size["steps"])
    hp = hp.with_(context_prefixes=context_prefixes(model, hp))
    requests = prepare_requests(model, load_counterfact(limit=size["targets"]), hp.context_prefixes)
    records = split_facts("report", limit=size["evaluation"])
    hook = edit_sites(model, hp)[-1].key_hook  # the key hook of the edited layer L = max(R)
    cov_tokens = size["cov_tokens"] or hp.cov_tokens

    def fig2(workers):
        return component_similarity(model, prompts, progress=False, workers=workers)["mean"].to_numpy()

    def targets(workers):
        t = optimise_targets(model, requests, hp, workers=workers)
        return torch.cat([t.delta[s] for s in sorted(t.delta)], 1).numpy()

    def evaluation(workers):
        per_record, _ = evaluate_counterfact(model, records, generation=True, max_length=size["max_length"],
                                             progress=False, workers=workers)
        return per_record.select_dtypes("number").to_numpy(float)

    def covariance(workers):
        store = CovarianceStore(cache_dir=False, progress=False)
        return store.get(model, [hook], cov_tokens, hp.cov_dtype, hp.cov_seq_len, workers=workers)[hook].numpy()

    known = load_known_facts()

    def scan(workers):
        s = scan_layers(model, known, n_facts=size["scan"], samples=size["samples"], n_boot=0, progress=False,
                        workers=workers)
        scan.seen = s.n_seen  # type: ignore[attr-defined]
        return torch.cat([s.plain, s.severed], 1).numpy()

    return {
        "fig2": {"items": len(prompts), "unit": "prompt", "run": fig2},
        "targets": {"items": len(requests), "unit": "fact", "run": targets, "hparams": hp, "requests": requests},
        "evaluation": {"items": len(records), "unit": "record", "run": evaluation},
        "covariance": {"items": cov_tokens, "unit": "token", "run": covariance, "hook": hook},
        "scan": {"items": size["scan"], "unit": "known fact", "run": scan},
    }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def difference(a: np.ndarray, b: np.ndarray) -> float:
    """Largest |a - b| relative to the largest |a| (NaN positions must agree)."""
    assert a.shape == b.shape and np.array_equal(np.isnan(a), np.isnan(b))
    scale = max(float(np.nanmax(np.abs(a))), 1e-30)
    return float(np.nanmax(np.abs(a - b))) / scale


def on_pool(model, stages, n: int, results: dict[str, Any], reference: dict[str, np.ndarray]) -> dict[str, Any]:
    """Start a pool of ``n`` 1-thread workers, send the model, run every stage on it; timings and checks."""
    start = time.perf_counter()
    pool = Workers(n, threads_per_worker=1)
    started = time.perf_counter() - start
    try:
        _, send = timed(lambda: pool.sync(model))
        fixed = {"ray_start_s": pool.timings["ray_start_s"], "workers_start_s": pool.timings["workers_start_s"],
                 "pool_start_s": started, "send_model_s": send, "model_mb": pool.timings.get("last_send_bytes", 0) / 2**20}
        print(f"{n} worker(s): Ray {fixed['ray_start_s']:.1f} s, workers {fixed['workers_start_s']:.1f} s, "
              f"sending the model ({fixed['model_mb']:.0f} MB) {send:.1f} s")
        for key, stage in stages.items():
            before = len(pool.history)
            value, seconds = timed(lambda: stage["run"](pool))
            shards = pool.history[before:]
            over = [s["wall_s"] - s["run_s"] for s in shards]
            results[key][f"workers{n}_s"] = seconds
            results[key][f"workers{n}_shards"] = len(shards)
            results[key][f"workers{n}_shard_overhead_s"] = float(np.mean(over)) if over else float("nan")
            results[key][f"workers{n}_shard_compute_s"] = float(np.mean([s["run_s"] for s in shards])) if shards else 0.0
            results[key][f"workers{n}_max_rel_diff"] = difference(reference[key], value)
            print(f"  {key}: {seconds:.1f} s in {len(shards)} shards (overhead {results[key][f'workers{n}_shard_overhead_s'] * 1e3:.1f} "
                  f"ms/shard); max relative difference to one process {results[key][f'workers{n}_max_rel_diff']:.1e}")
    finally:
        pool.close()
    return fixed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small stages: a smoke test of the script (~3 min)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "parallel.json"),
                        help="results file (JSON; default benchmarks/results/parallel.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    print(machine_line())
    model = load_model(device="cpu")
    stages = make_stages(model, args.quick)
    results: dict[str, dict[str, Any]] = {k: {"items": s["items"], "unit": s["unit"]} for k, s in stages.items()}

    # one process, 2 threads (C is built here too, once, so the edit below reads it from the store's memory)
    reference: dict[str, np.ndarray] = {}
    for key, stage in stages.items():
        reference[key], results[key]["process2_s"] = timed(lambda: stage["run"](None))
        print(f"one process x 2 threads: {key} ({stage['items']} {stage['unit']}s) {results[key]['process2_s']:.1f} s")
    results["scan"]["facts_examined"] = getattr(stages["scan"]["run"], "seen", None)  # known or not
    # what an edit does besides the targets (keys, residuals, solve) stays in one process: timed on all the
    # facts and on a quarter of them, for its per-fact and fixed parts
    t = stages["targets"]
    given = optimise_targets(model, t["requests"], t["hparams"])
    store = CovarianceStore(progress=False)
    facts = list(t["requests"].facts)

    def update(n: int) -> float:
        kept = {s: given.value(s)[:n] for s in given.delta}
        return timed(lambda: edit(model, facts[:n], hparams=t["hparams"], cov_store=store, apply=False,
                                  progress=False, targets=kept))[1]

    update(len(facts))  # C from the user's cache (built once if missing)
    small = max(1, len(facts) // 4)
    results["targets"]["driver_update_s"] = {str(small): update(small), str(len(facts)): update(len(facts))}
    results["targets"]["layers"] = len(t["hparams"].layers)
    print(f"one process: the rest of the edit (keys, residuals, solve; C cached) {results['targets']['driver_update_s']} s "
          "for (facts: seconds)")

    fixed = {f"workers{n}": on_pool(model, stages, n, results, reference) for n in (2, 1)}
    for r in results.values():
        r["speedup_2workers"] = r["process2_s"] / r["workers2_s"]
        r["efficiency_2workers"] = r["workers1_s"] / (2 * r["workers2_s"])
        print(f"{r['unit']}s: speed-up of 2 workers over one process x 2 threads {r['speedup_2workers']:.2f}x, "
              f"parallel efficiency {r['efficiency_2workers']:.2f}")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    doc = {"command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
           "quick": args.quick, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "commit": commit, "cpu": cpu_name(), "machine": machine_line(), "model": str(model.cfg.model_name),
           "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "fixed": fixed, "stages": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
