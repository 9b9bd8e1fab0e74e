"""Averaged causal traces of SmolLM2 (or any model) on ROME's known facts, and the critical range R.

Writes into --out (default figures/):
  causal_trace_classes.csv      kind x token class x layer: mean indirect effect, 95% CI, count
  causal_trace_severed.csv      MEMIT Fig. 3 curves (plain / MLP severed / attn severed)
  causal_trace_{hidden,mlp,attn}.html/.png   token class x layer heat maps
  causal_trace_severed.html/.png             severed-path line plot, R shaded
  causal_trace_summary.json     settings, facts used, R, L, per-layer gap, ROME's layer (the MLP layer with
                                the strongest effect at the last subject token)
  plotly.min.js                 plotly.js for the .html pages (they work offline)
and stores R under the model's cfg.model_name in the user's critical_layers.json (the user preset directory,
$PMET_LENS_CACHE/presets by default; --presets DIR for another; never the package's read-only presets),
where pmet_lens.editing.preset reads it before the shipped table (unless --no-preset).

--replot rebuilds the .html and .png figures from the .csv and .json files a run wrote in --out, without a model.

Usage: python analyses/causal_trace.py [--model NAME] [--limit N] [--samples 10] [--seed 0] [--out figures] [--replot]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import pandas as pd
import torch

from pmet_lens import load_known_facts, load_model
from pmet_lens.analysis.averaged import TOKEN_CLASSES, AverageTrace, average_traces
from pmet_lens.analysis.layers import critical_layers, strongest_mlp_layer, write_critical_layers
from pmet_lens.viz.html import write_figure
from pmet_lens.viz.tracing import average_heatmap, save_average_png, save_severed_png, severed_plot


def write_figures(out: Path, avg: AverageTrace, R: list[int]) -> None:
    """The heat map of each kind and the severed-path plot, as .html (plotly.js beside them,
    :mod:`pmet_lens.viz.html`) and .png."""
    for kind in avg.kinds:
        write_figure(average_heatmap(avg, kind), out / f"causal_trace_{kind}.html")
        save_average_png(avg, kind, out / f"causal_trace_{kind}.png")
    write_figure(severed_plot(avg, R), out / "causal_trace_severed.html")
    save_severed_png(avg, out / "causal_trace_severed.png", R)


def load_average(out: Path) -> tuple[AverageTrace, list[int]]:
    """The averaged traces and R a run wrote in ``out`` (the tables hold every number the figures show)."""
    paths = [out / n for n in ("causal_trace_classes.csv", "causal_trace_severed.csv", "causal_trace_summary.json")]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise SystemExit(f"--replot: {missing} missing; give the --out of a finished run")
    classes, severed = pd.read_csv(paths[0]), pd.read_csv(paths[1])
    summary = json.loads(paths[2].read_text())
    kinds = tuple(dict.fromkeys(classes["kind"]))
    mean, ci, count = {}, {}, {}
    for kind in kinds:
        part = classes[classes["kind"] == kind]
        grid = {col: part.pivot(index="token_class", columns="layer", values=col).reindex(list(TOKEN_CLASSES))
                for col in ("mean", "ci")}  # [token class, layer]
        mean[kind] = torch.tensor(grid["mean"].to_numpy(), dtype=torch.float32)
        ci[kind] = torch.tensor(grid["ci"].to_numpy(), dtype=torch.float32)
        count[kind] = torch.tensor(part.groupby("token_class")["count"].first().reindex(list(TOKEN_CLASSES)).to_numpy())
    sev = {k: g.sort_values("layer") for k, g in severed.groupby("severed", sort=False)}
    avg = AverageTrace(
        kinds=kinds, mean=mean, ci=ci, count=count,
        severed_mean={k: torch.tensor(g["mean"].to_numpy(), dtype=torch.float32) for k, g in sev.items()},
        severed_ci={k: torch.tensor(g["ci"].to_numpy(), dtype=torch.float32) for k, g in sev.items()},
        n_facts=summary["facts_used"], n_seen=summary["facts_seen"], fact_ids=summary["known_ids"],
        low_score=summary["mean_corrupted_prob"], high_score=summary["mean_clean_prob"],
        samples=summary["samples"], noise=summary["noise"], window=summary["window"])
    return avg, list(summary["R"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model name (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--limit", type=int, default=30,
                        help="number of KNOWN facts to average (default 30; causal_trace_summary.json records the run time)")
    parser.add_argument("--samples", type=int, default=10, help="noise samples per trace (papers: 10)")
    parser.add_argument("--noise", type=float, default=3.0)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--size", type=int, default=5, help="number of layers in R")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("figures"))
    parser.add_argument("--no-preset", action="store_true", help="do not write the user's critical_layers.json")
    parser.add_argument("--presets", type=Path, default=None,
                        help="user preset directory to write R into (default: pmet_lens.core.presets.user_presets_dir())")
    parser.add_argument("--replot", action="store_true",
                        help="only rebuild the .html and .png figures from the tables a run wrote in --out (no model)")
    args = parser.parse_args(argv)
    if args.replot:
        write_figures(args.out, *load_average(args.out))
        print(f"rebuilt the figures in {args.out}")
        return

    torch.set_grad_enabled(False)
    args.out.mkdir(parents=True, exist_ok=True)
    model = load_model(args.model)
    name = str(model.cfg.model_name)
    facts = load_known_facts()
    t0 = time.time()
    avg = average_traces(model, facts, limit=args.limit, samples=args.samples, noise=args.noise,
                         window=args.window, seed=args.seed)
    elapsed = time.time() - t0
    R, L = critical_layers(avg, size=args.size)
    rome_layer = strongest_mlp_layer(avg) if "mlp" in avg.kinds else None
    gap = (avg.severed_mean["none"] - avg.severed_mean["mlp"]).tolist()

    avg.class_frame().to_csv(args.out / "causal_trace_classes.csv", index=False)
    avg.severed_frame().to_csv(args.out / "causal_trace_severed.csv", index=False)
    write_figures(args.out, avg, R)
    summary = {
        "model": name, "facts_used": avg.n_facts, "facts_seen": avg.n_seen, "known_ids": avg.fact_ids,
        "samples": args.samples, "noise": args.noise, "window": args.window, "seed": args.seed,
        "mean_clean_prob": avg.high_score, "mean_corrupted_prob": avg.low_score,
        "R": R, "L": L, "size": args.size, "rome_layer": rome_layer, "gap_plain_minus_mlp_severed": gap,
        "plain": avg.severed_mean["none"].tolist(), "mlp_severed": avg.severed_mean["mlp"].tolist(),
        "attn_severed": avg.severed_mean["attn"].tolist(), "seconds": round(elapsed, 1),
    }
    (args.out / "causal_trace_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    if not args.no_preset:
        written = write_critical_layers(name, R, f"analyses/causal_trace.py, {avg.n_facts} facts", args.presets)
        print(f"R stored in {written}")

    print(f"{avg.n_facts} known facts of {avg.n_seen} examined, {args.samples} samples, {elapsed:.0f} s")
    print(f"mean P clean {avg.high_score:.3f}, corrupted {avg.low_score:.3f}")
    print("layer  plain   mlp-severed  attn-severed  gap")
    for l in range(avg.n_layers):
        print(f"{l:5d}  {avg.severed_mean['none'][l]:.4f}  {avg.severed_mean['mlp'][l]:.4f}       "
              f"{avg.severed_mean['attn'][l]:.4f}        {gap[l]:+.4f}")
    print(f"R = {R}  (L = {L}; run of {args.size} layers with the largest plain - MLP-severed gap)")
    print(f"ROME's layer = {rome_layer}  (the MLP layer with the strongest effect at the last subject token)")


if __name__ == "__main__":
    main()
