"""Render the measurements and the scaling projection of ``docs/scaling.md`` from the results file of
``benchmarks/bench_parallel.py`` (default ``benchmarks/results/parallel.json``).

The text between ``<!-- scaling:begin -->`` and ``<!-- scaling:end -->`` in the page is replaced by
tables computed here, so the page is regenerated from data (never edited by hand). The scaling model
(its assumptions are printed with it):

    T(n) = s + ⌈N / (n·u)⌉·u·t + r(n)·o

per stage and per call, with N items in indivisible units of u (one forward's worth: C's batch of 4
chunks of 256 tokens; 1 elsewhere), t the compute time of one item on one worker (measured: the
1-worker run's shard compute time / N), o the overhead per shard (measured: a shard's wall time on the
driver minus its compute time on the worker, 2-worker run), r(n) the shards each worker runs (the
stages cut about ``r`` shards per worker, at most one per unit; the layer scan one fact per shard),
and s the serial part on the driver (measured: the 1-worker wall time minus its shards' compute and
overhead).
A pool's fixed cost F = Ray and worker start + sending the model (the 1-worker run's: the workers
fetch and build their copies at the same time, so it does not grow with n where each has its own
cores and link) is paid once per pool, not per call. The efficiency E(n) = T(1) / (n·T(n)); n₉₀ is the largest
n with E(n) ≥ 0.9, and T(1) / T(∞) the most the speed-up can reach.

    python scripts/render_scaling.py [--results benchmarks/results/parallel.json] [--page docs/scaling.md]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BEGIN, END = "<!-- scaling:begin -->", "<!-- scaling:end -->"
GRAIN = {"covariance": 4 * 256}
"""Items of a stage that one forward processes together (C: a batch of 4 chunks of 256 tokens)."""
NAMES = {"fig2": "Fig. 2 similarity", "targets": "target optimisation (PMET)", "evaluation": "CounterFact evaluation, with generation",
         "covariance": "C of one layer", "scan": "layer scan (fast path to R)"}


class Stage:
    """The scaling model of one stage, from its measured figures."""

    def __init__(self, key: str, r: dict[str, Any]) -> None:
        self.key = key
        self.items = float(r["items"])
        self.processed = float(r.get("facts_examined") or r["items"]) if key == "scan" else self.items
        shards1 = r["workers1_shards"]
        self.t = shards1 * r["workers1_shard_compute_s"] / self.processed  # per processed item, one worker
        self.o = r["workers2_shard_overhead_s"]
        self.s = max(0.0, r["workers1_s"] - shards1 * (r["workers1_shard_compute_s"] + r["workers1_shard_overhead_s"]))
        self.per_worker = None if key == "scan" else r["workers2_shards"] / 2  # shards per worker
        self.grain = GRAIN.get(key, 1)  # items that cannot be split between workers
        self.measured = {n: r[f"workers{n}_s"] for n in (1, 2)}

    def time(self, n: int, items: float | None = None, speed: float = 1.0) -> float:
        """Modelled wall time of one call on ``n`` workers over ``items`` processed items (default: as
        measured), with workers ``speed`` times faster per item than measured."""
        N = self.processed if items is None else items
        units = math.ceil(N / self.grain / n)  # indivisible units on the busiest worker
        rounds = units if self.per_worker is None else min(self.per_worker, units)
        return self.s + units * self.grain * self.t / speed + rounds * self.o

    def n90(self, items: float | None = None, speed: float = 1.0) -> int:
        t1 = self.time(1, items, speed)
        most = math.ceil((self.processed if items is None else items) / self.grain)  # beyond it workers idle
        n = 1
        while n < most and t1 / ((n + 1) * self.time(n + 1, items, speed)) >= 0.9:
            n += 1
        return n

    def ceiling(self, items: float | None = None, speed: float = 1.0) -> float:
        """T(1) / T(∞): the most the speed-up reaches (one indivisible unit per worker)."""
        most = math.ceil((self.processed if items is None else items) / self.grain)
        return self.time(1, items, speed) / self.time(most, items, speed)


def fmt(seconds: float) -> str:
    if seconds >= 5400:
        return f"{seconds / 3600:.1f} h"
    if seconds >= 120:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.1f} s"


def render(doc: dict[str, Any]) -> str:
    st = {k: Stage(k, r) for k, r in doc["stages"].items()}
    fixed = doc["fixed"]
    lines = [f"Measured by `python benchmarks/{doc['command']}` on {doc['date']} (commit {doc['commit']}), "
             f"{doc['cpu']}; {doc['machine'].split(', ', 1)[1]}.", ""]
    if doc.get("quick"):
        lines += ["**A `--quick` smoke run on small stages: not the figures of record.**", ""]
    lines += ["| stage | items | 1 process × 2 threads | 2 workers × 1 thread | 1 worker × 1 thread | speed-up (2 workers vs 1 process) "
              "| parallel efficiency | shards (2 workers) | overhead per shard | max relative difference |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for key, r in doc["stages"].items():
        lines.append(f"| {NAMES.get(key, key)} | {r['items']} {r['unit']}s | {fmt(r['process2_s'])} | {fmt(r['workers2_s'])} | "
                     f"{fmt(r['workers1_s'])} | {r['speedup_2workers']:.2f}× | {r['efficiency_2workers']:.2f} | "
                     f"{r['workers2_shards']} | {1e3 * r['workers2_shard_overhead_s']:.1f} ms | {r['workers2_max_rel_diff']:.1e} |")
    f2 = fixed["workers2"]
    lines += ["", f"Fixed costs of a pool of 2 (paid once per pool): starting Ray {fmt(f2['ray_start_s'])}, starting the "
              f"workers {fmt(f2['workers_start_s'])}, sending the model ({f2['model_mb']:.0f} MB) to them "
              f"{fmt(f2['send_model_s'])}. Peak resident memory of the driver {doc['peak_rss_gb']:.1f} GB.", ""]
    upd = doc["stages"]["targets"].get("driver_update_s", {})
    if len(upd) == 2:
        (n_a, t_a), (n_b, t_b) = sorted((float(k), v) for k, v in upd.items())
        per_fact = max(0.0, (t_b - t_a) / (n_b - n_a))  # timing noise must not make either part negative
        fixed_update = max(0.0, t_a - per_fact * n_a)
        lines += [f"The part of an edit that stays in one process (keys, residuals, the solve; C cached): "
                  f"{fmt(t_a)} for {n_a:.0f} facts, {fmt(t_b)} for {n_b:.0f}, i.e. about {per_fact:.2f} s per fact "
                  f"+ {fmt(max(fixed_update, 0.0))}.", ""]
    else:
        per_fact, fixed_update = 0.0, 0.0

    lines += ["### The model against the measurement", "",
              "| stage | t (per item, 1 worker) | o (per shard) | s (serial) | modelled / measured T(2) |", "|---|---|---|---|---|"]
    for key, m in st.items():
        lines.append(f"| {NAMES.get(key, key)} | {m.t * 1e3:.2f} ms | {m.o * 1e3:.1f} ms | {fmt(m.s)} | "
                     f"{fmt(m.time(2))} / {fmt(m.measured[2])} |")

    f1 = fixed["workers1"]
    start = f1["ray_start_s"] + f1["workers_start_s"] + f1["send_model_s"]
    runs: list[tuple[str, list[tuple[str, Stage, float]], float]] = []
    runs.append(("Fig. 2 on the 1209 known facts", [("", st["fig2"], 1209)], 0.0))
    if "scan" in st:
        known_rate = st["scan"].items / st["scan"].processed
        runs.append(("R over 1000 facts (fast path)", [("", st["scan"], 1000 / known_rate)], 0.0))
    big = [("C once", st["covariance"], st["covariance"].items), ("targets", st["targets"], 10_000),
           ("evaluation", st["evaluation"], 10_000)]
    runs.append(("10,000-edit CounterFact run (C once, targets, solve, evaluation)", big, fixed_update + per_fact * 10_000))

    lines += ["", "### Projection", "",
              "Workers as fast per item as one CPU thread here (the only speed measured; a GPU worker's is not), "
              "pool fixed cost included:", "",
              "| run | 1 worker | 8 workers | 64 workers | speed-up 8 / 64 | efficiency 8 / 64 | serial part |",
              "|---|---|---|---|---|---|---|"]
    for name, parts, serial in runs:
        def total(n: int, speed: float = 1.0) -> float:
            return start + serial + sum(m.time(n, items, speed) for _, m, items in parts)

        t1, t8, t64 = total(1), total(8), total(64)
        serial_text = fmt(serial + sum(m.s for _, m, _ in parts)) + (" (keys + solve)" if serial else "")
        lines.append(f"| {name} | {fmt(t1)} | {fmt(t8)} | {fmt(t64)} | {t1 / t8:.1f}× / {t1 / t64:.1f}× | "
                     f"{t1 / (8 * t8):.2f} / {t1 / (64 * t64):.2f} | {serial_text} |")
    lines += ["", "Where the speed-up stops, per stage (a call on a warm pool; n₉₀: the most workers at efficiency ≥ 0.9; "
              "the ceiling T(1)/T(∞)). With workers g times faster per item the parallel part shrinks g-fold and so "
              "does n₉₀, while s and o stay:", "",
              "| stage (items) | n₉₀ as measured | n₉₀ if g = 10 | ceiling |", "|---|---|---|---|"]
    for name, parts, _ in runs:
        for label, m, items in parts:
            what = f"{name}{': ' + label if label else ''} ({items:,.0f})"
            ceiling = m.ceiling(items)
            lines.append(f"| {what} | {m.n90(items)} | {m.n90(items, 10.0)} | "
                         f"{ceiling:,.0f}× |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "parallel.json"))
    parser.add_argument("--page", default=str(REPO / "docs" / "scaling.md"))
    parser.add_argument("--print", action="store_true", help="print the tables instead of writing the page")
    args = parser.parse_args(argv)
    text = render(json.loads(Path(args.results).read_text()))
    if args.print:
        print(text)
        return 0
    page = Path(args.page)
    body = page.read_text()
    if BEGIN not in body or END not in body:
        raise SystemExit(f"{page} has no {BEGIN} ... {END} block to fill")
    head, rest = body.split(BEGIN, 1)
    page.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    print(f"wrote {page}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
