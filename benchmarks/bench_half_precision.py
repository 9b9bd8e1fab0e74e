"""Half precision is faithful (issue 34): the default model edited in bfloat16 and in float32, side by side.

For PMET and MEMIT (their presets), the first ``--limit`` (default 64) cases of the CounterFact split's
report part are edited at once into the model loaded in float32 and in bfloat16; each edited model
is evaluated on the same cases (probability metrics: Efficacy, Generalization = paraphrase,
Specificity = neighborhood, with 95% CIs; ROME/MEMIT's definitions, :func:`pmet_lens.evaluation.evaluate_counterfact`).
Also reported: ΔW's relative difference per edited weight, ‖ΔW_bf16 − ΔW_fp32‖ / ‖ΔW_fp32‖, beside the
part of it that storing in bf16 alone makes (fp32's ΔW written into the bf16 weights and read back as
new minus old: an update whose entries are near the bf16 spacing of the weights is rounded); PMET Fig. 2
(both variants, ``--fig2`` known-fact prompts) in both dtypes and its largest difference (per-layer
means, and per prompt); and the wall time of each stage in both dtypes on this CPU (bf16 speed).
The covariances come from the user cache (built once per dtype, their time reported apart).

    python benchmarks/bench_half_precision.py                 # the full run (alone on the machine)
    python benchmarks/bench_half_precision.py --limit 4 --fig2 16 --cov-tokens 4096   # a smoke test

Writes a JSON (``--out``, default ``benchmarks/results/half_precision.json``) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from machine import machine_line  # benchmarks/machine.py (the script's folder is on sys.path)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
METRICS = ("efficacy", "paraphrase", "neighborhood")  # evaluate_counterfact's summary keys
NAMES = {"efficacy": "Efficacy", "paraphrase": "Generalization", "neighborhood": "Specificity"}


def main() -> None:
    from pmet_lens import load_model
    from pmet_lens.analysis.similarity import similarity_scores
    from pmet_lens.data import load_known_facts
    from pmet_lens.data.splits import split_facts
    from pmet_lens.editing import CovarianceStore, edit, engine, preset
    from pmet_lens.evaluation import evaluate_counterfact

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=64, help="report cases edited (default 64)")
    parser.add_argument("--fig2", type=int, default=200, help="known-fact prompts of Fig. 2 (default 200)")
    parser.add_argument("--methods", default="pmet,memit")
    parser.add_argument("--cov-tokens", type=int, default=None, help="override the presets' C corpus size (smoke tests)")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "half_precision.json")
    args = parser.parse_args()
    print(machine_line())
    facts = split_facts("report", limit=args.limit)
    prompts = [f.prompt for f in load_known_facts(limit=args.fig2)]
    models = {d: load_model(device="cpu", dtype=t) for d, t in DTYPES.items()}
    store = CovarianceStore(progress=False)
    report: dict[str, Any] = {"machine": machine_line(), "cases": len(facts), "fig2_prompts": len(prompts),
                              "methods": {}, "fig2": {}, "seconds": {}}

    def clock(key: str, dtype: str, seconds: float) -> None:
        report["seconds"].setdefault(key, {})[dtype] = round(seconds, 2)

    # ---- Fig. 2 -----------------------------------------------------------------------------
    scores = {}
    for d, model in models.items():
        t = time.perf_counter()
        scores[d] = similarity_scores(model, prompts, k=50, variant="both", progress=False)
        clock("fig2", d, time.perf_counter() - t)
    for variant in scores["fp32"]:
        a, b = scores["fp32"][variant], scores["bf16"][variant]
        report["fig2"][variant] = {
            metric: {"max_abs_diff_of_layer_means": float((getattr(a, metric).mean(0) - getattr(b, metric).mean(0)).abs().max()),
                     "max_abs_diff_per_prompt": float((getattr(a, metric) - getattr(b, metric)).abs().max())}
            for metric in ("cosine", "jaccard")}

    # ---- edits ------------------------------------------------------------------------------
    for method in args.methods.split(","):
        hp = preset(str(models["fp32"].cfg.model_name), method)
        if args.cov_tokens is not None:
            hp = hp.with_(cov_tokens=args.cov_tokens)
        rows: dict[str, Any] = {}
        deltas = {}
        for d, model in models.items():
            t = time.perf_counter()
            engine.covariances(model, hp, store)
            clock(f"{method}_covariance (cached after the first run)", d, time.perf_counter() - t)
            t = time.perf_counter()
            result = edit(model, facts, hparams=hp, cov_store=store, progress=False)
            clock(f"{method}_edit", d, time.perf_counter() - t)
            deltas[d] = {k: v.double() for k, v in result.deltas.items()}
            t = time.perf_counter()
            _, summary = evaluate_counterfact(model, facts, generation=False, progress=False)
            clock(f"{method}_evaluation", d, time.perf_counter() - t)
            result.restore()
            rows[d] = {m: [float(summary[m]), float(summary[f"{m}_ci95"])] for m in METRICS}
            rows[d]["mean_steps"] = sum(result.stats["steps"]) / len(result.stats["steps"])
        rel = {k: float((deltas["bf16"][k] - deltas["fp32"][k]).norm() / deltas["fp32"][k].norm()) for k in deltas["fp32"]}
        # The part of that difference that bf16 storage alone makes: fp32's ΔW written into the bf16 weights
        # (round(W + ΔW), the sum in float32, as editing.delta writes it) and read back as new minus old.
        weights = dict(models["bf16"].named_parameters())
        floor = {}
        for k, d32 in deltas["fp32"].items():
            w = weights[k].detach().float()
            stored = (w + d32.float()).to(torch.bfloat16).float() - w
            floor[k] = float((stored.double() - d32).norm() / d32.norm())
        overlap = {m: abs(rows["bf16"][m][0] - rows["fp32"][m][0]) <= rows["bf16"][m][1] + rows["fp32"][m][1]
                   for m in METRICS}
        report["methods"][method] = {"metrics": rows, "delta_relative_difference": rel,
                                     "delta_rounding_floor": floor, "within_cis": overlap}

    # ---- print ------------------------------------------------------------------------------
    print(f"\n{len(facts)} report cases edited at once; probability metrics in %, ± 95% CI half-width")
    print("method | dtype | " + " | ".join(NAMES[m] for m in METRICS) + " | mean steps")
    for method, entry in report["methods"].items():
        for d in DTYPES:
            r = entry["metrics"][d]
            print(f"{method} | {d} | " + " | ".join(f"{100 * r[m][0]:.1f} ± {100 * r[m][1]:.1f}" for m in METRICS)
                  + f" | {r['mean_steps']:.1f}")
        print(f"{method}: bf16 within the CIs of fp32: {entry['within_cis']}; ‖ΔW_bf16 − ΔW_fp32‖/‖ΔW_fp32‖: "
              + ", ".join(f"{k} {v:.3f}" for k, v in entry["delta_relative_difference"].items()))
        print(f"{method}: of it, bf16 storage alone (fp32's ΔW written into the bf16 weights, read back): "
              + ", ".join(f"{k} {v:.3f}" for k, v in entry["delta_rounding_floor"].items()))
    print(f"\nFig. 2, bf16 vs fp32, largest |difference| over layers and components ({len(prompts)} prompts):")
    for variant, entry in report["fig2"].items():
        print(f"  {variant}: " + "; ".join(f"{m} {v['max_abs_diff_of_layer_means']:.4f} (layer means), "
                                          f"{v['max_abs_diff_per_prompt']:.4f} (per prompt)" for m, v in entry.items()))
    print("\nseconds on this CPU | fp32 | bf16 | bf16 / fp32")
    for key, by in report["seconds"].items():
        print(f"{key} | {by['fp32']:.1f} | {by['bf16']:.1f} | {by['bf16'] / max(by['fp32'], 1e-9):.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
