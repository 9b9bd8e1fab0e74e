"""Benchmark: R of the default model by the fast calibration path vs the full averaged trace.

1. ``pmet_lens.analysis.layer_scan.scan_layers`` over --facts known facts (only the last subject
   token's plain and MLP-severed rows, --samples noise draws), timed, with R, its bootstrap band
   and the per-fact time;
2. ``pmet_lens.average_traces`` (all five traces ROME / MEMIT Fig. 3 need: hidden / MLP / attention
   windows at every position from the subject on, and the two severed rows) over the first
   --full-facts of the SAME known facts, in the same run, timed per fact, with R from its severed
   curves;
3. the fast path's R on those same few facts, and the largest difference between its curves and
   the averaged trace's severed rows (the same seeds: they must agree to float rounding).

Writes benchmarks/results/calibrate.txt (what it prints) unless --no-save.

Usage: python benchmarks/bench_calibrate.py [--facts 100] [--full-facts 3] [--samples 10]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import torch

from pmet_lens import load_known_facts, load_model
from pmet_lens.analysis.averaged import average_traces
from pmet_lens.analysis.layer_scan import scan_layers
from pmet_lens.analysis.layers import critical_layers

from machine import machine_line  # benchmarks/machine.py (the script's folder is on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--facts", type=int, default=100)
    parser.add_argument("--full-facts", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--no-save", action="store_true")
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    buf = io.StringIO()

    def out(line: str = "") -> None:
        print(line, flush=True)
        buf.write(line + "\n")

    out(machine_line())
    model = load_model()
    facts = load_known_facts()
    t0 = time.perf_counter()
    scan = scan_layers(model, facts, n_facts=args.facts, samples=args.samples, progress=True)
    fast = time.perf_counter() - t0
    out(f"fast path: {scan.n_facts} known facts ({scan.n_seen} examined), {args.samples} samples: "
        f"{fast:.0f} s total, {fast / scan.n_facts:.2f} s per known fact")
    out(f"  R = {scan.layers} (L = {scan.last}); R wins {100 * scan.confidence:.1f}% of {scan.n_boot} bootstrap resamples")
    for _, row in scan.wins_frame().iterrows():
        out(f"    run {row['layers']}: {100 * row['share']:.1f}%")
    gap = scan.gap
    out("  gap per layer (plain - MLP severed): " + " ".join(f"{l}:{float(g):.3f}" for l, g in enumerate(gap)))

    t0 = time.perf_counter()
    avg = average_traces(model, facts, limit=args.full_facts, samples=args.samples, progress=False)
    full = time.perf_counter() - t0
    R_full, _ = critical_layers(avg)
    k = avg.n_facts
    R_fast_k, _ = critical_layers(scan.plain[:k].double().mean(0), scan.severed[:k].double().mean(0))
    diff = max(float((scan.plain[:k].mean(0) - avg.severed_mean["none"]).abs().max()),
               float((scan.severed[:k].mean(0) - avg.severed_mean["mlp"]).abs().max()))
    out(f"full averaged trace (average_traces, 5 traces per fact): {k} of the same facts: {full:.0f} s total, "
        f"{full / k:.1f} s per known fact ({full / k / (fast / scan.n_facts):.0f}x the fast path's)")
    out(f"  R from the full trace on these {k} facts: {R_full}; fast path on the same {k} facts: {R_fast_k}; "
        f"largest curve difference {diff:.2e}")
    out(f"  the full trace over {scan.n_facts} facts would take about {full / k * scan.n_facts / 60:.0f} min "
        f"(fast path: {fast / 60:.1f} min)")
    if not args.no_save:
        path = Path(__file__).resolve().parent / "results" / "calibrate.txt"
        path.write_text(f"$ python benchmarks/bench_calibrate.py --facts {args.facts} --full-facts {args.full_facts} "
                        f"--samples {args.samples}\n" + buf.getvalue())


if __name__ == "__main__":
    main()
