"""Write docs/memory.md from the memory benchmark's results (``benchmarks/bench_memory.py``).

    python scripts/memory_doc.py                       # reads benchmarks/results/memory_points.csv
    python scripts/memory_doc.py --points other.csv --out /tmp/memory.md

Everything in the page that is a number comes from the points file: the measured peaks, the fits
(recomputed here with the benchmark's own ``fit``), each point's fit error, the two targets of the
issue, and the "what fits where" predictions. The prose is in this script.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_memory import DTYPE_BYTES, GB, STEPS, _read_csv, fit, predict  # noqa: E402
from llama_shapes import SHAPES, TARGETS  # noqa: E402

R_OF = {"GPT-J-6B": 6, "Llama-3-8B": 5, "Qwen-2.5-14B": 5}
"""|R| of the predicted models: GPT-J layers 3-8 (MEMIT), Llama-3-8B 4-8 (AlphaEdit), Qwen-2.5-14B 5 layers
(EasyEdit's MEMIT hparams, layers 4-8)."""
CARDS = (24, 48, 80)
"""Cards by their marketed size, which for GPU memory is binary: a "24 GB" card has 24 GiB."""
RESERVE = 1.0 * 2**30
"""What a card keeps from an edit: the CUDA context and the allocator's slack, taken as 1 GiB."""


def card_bytes(size: int) -> float:
    """The bytes an edit can use on a card of ``size`` (marketed) GB: ``size`` GiB less :data:`RESERVE`."""
    return size * 2**30 - RESERVE


EASYEDIT = {
    ("Llama-2-7B", "edit"): "MEMIT on Llama-7B needs about 50 GB (EasyEdit issue 26: \"we don't support model parallel yet\")",
    ("Qwen-2.5-14B", "edit"): "ROME 66 GB, MEMIT 74 GB of an 80 GB card on Qwen-14B (EasyEdit issue 109)",
    ("Llama-3-8B", "cov"): "MEMIT's covariance step asked for 506 GiB on Llama-3.2-1B (EasyEdit issue 470)",
    ("Llama-3-8B", "eval"): "evaluation ran out of memory on 3 x RTX 4090 after the edit worked (EasyEdit issue 183)",
}
PUBLISHED = {
    ("Llama-3-8B", "PMET edit of 100 facts"): "MEMIT on Llama-7B: about 50 GB (EasyEdit issue 26)",
    ("Qwen-2.5-14B", "PMET edit of 100 facts"): "ROME 66 GB, MEMIT 74 GB of an 80 GB card (EasyEdit issue 109)",
    ("Llama-3-8B", "CounterFact evaluation"): "out of memory on 3 x RTX 4090 after the edit worked (EasyEdit issue 183)",
}
"""What users of the official code / EasyEdit reported for the nearest (model, task), beside each prediction."""
STEP_NAMES = {"load": "load", "cov": "C of R's layers", "edit16": "PMET edit, 16 facts", "edit64": "PMET edit, 64 facts",
              "alphaedit": "AlphaEdit batch, 32 facts", "session3": "session, 3 AlphaEdit batches of 16",
              "eval32": "CounterFact evaluation, 32 records", "export": "export (transformers)"}


def read_points(path: Path) -> list[dict[str, Any]]:
    """The benchmark's points (numbers parsed), read as the benchmark reads an earlier run's."""
    return _read_csv(path)


def gb(x: float) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x / GB:.2f}"


def fits_of(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """The fits per (implementation, step), and ``"edit"`` over both edits. A fit whose points do not
    vary both W and S (fewer than two shapes, or one dtype of one shape) predicts nothing: it is kept
    with ``"identified": False``."""
    out = {}
    for impl in ("lean", "baseline"):
        for kind, steps in [(s, (s,)) for s in STEPS] + [("edit", ("edit16", "edit64"))]:
            mine = [r for r in rows if r["impl"] == impl and r["step"] in steps and r["status"] == "measured"]
            if mine:
                identified = len({r["W"] for r in mine}) > 1 and len({r["S"] for r in mine}) > 1
                held = [held_out_error(mine, i) for i in range(len(mine))]
                out[(impl, kind)] = {**fit(mine), "rows": mine, "identified": identified, "held_out": held,
                                     "max_abs_held_out": max((abs(h) for h in held if h is not None), default=None)}
    return out


def usable(fits: dict[tuple[str, str], dict[str, Any]], key: tuple[str, str]) -> bool:
    return key in fits and fits[key]["identified"]


def measured_table(rows: list[dict[str, Any]]) -> list[str]:
    lines = ["| point | dtype | step | lean peak GB | baseline peak GB | lean / baseline | lean s | baseline s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for shape in SHAPES:
        for dtype in DTYPE_BYTES:
            for step in STEPS:
                pair = {r["impl"]: r for r in rows if r["shape"] == shape and r["dtype"] == dtype and r["step"] == step}
                if not pair:
                    continue
                cells = []
                for impl in ("lean", "baseline"):
                    r = pair.get(impl)
                    if r is None:
                        cells.append("not run")
                    elif r["status"] == "measured":
                        cells.append(gb(r["peak"]))
                    else:
                        cells.append(f"{r['status']}: {r['note']}")
                lean, base = pair.get("lean"), pair.get("baseline")
                ratio = (f"{lean['peak'] / base['peak']:.2f}" if lean and base and lean["status"] == base["status"] == "measured"
                         else "–")
                secs = [f"{r['seconds']:.0f}" if r and math.isfinite(r["seconds"]) else "–" for r in (lean, base)]
                lines.append(f"| {shape} | {dtype} | {STEP_NAMES[step]} | {cells[0]} | {cells[1]} | {ratio} | "
                             f"{secs[0]} | {secs[1]} |")
    return lines


def fit_table(fits: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = ["| implementation | step | a (x W) | b (x S) | c (x F) | d (GB) | points | max abs error | max abs held-out error |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (impl, kind), f in sorted(fits.items()):
        c = f["coef"]
        name = STEP_NAMES.get(kind, "PMET edit, 16 and 64 facts")
        if not f["identified"]:
            lines.append(f"| {impl} | {name} | not identified: the points do not vary W and S | | | {c['1'] / GB:.2f} | "
                         f"{f['points']} | | |")
            continue
        held = f["max_abs_held_out"]
        lines.append(f"| {impl} | {name} | {c['W']:.3f} | {c['S']:.3f} | "
                     f"{c['F']:.3f} | {c['1'] / GB:.2f} | {f['points']} | {f['max_abs_rel_error']:.1%} | "
                     f"{'–' if held is None else f'{held:.1%}'} |")
    return lines


def held_out_error(rows: list[dict[str, Any]], i: int) -> float | None:
    """The relative error of the fit made without ``rows[i]`` on ``rows[i]`` (leave-one-out), or None where
    the other rows do not vary both W and S."""
    rest = rows[:i] + rows[i + 1:]
    if len({r["W"] for r in rest}) < 2 or len({r["S"] for r in rest}) < 2:
        return None
    r = rows[i]
    return (predict(fit(rest)["coef"], r) - r["peak"]) / r["peak"]


def error_table(fits: dict[tuple[str, str], dict[str, Any]]) -> list[str]:
    lines = ["| implementation | step | point | dtype | measured GB | fit GB | error | held out |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (impl, kind), f in sorted(fits.items()):
        if kind == "edit":
            continue
        for r, e, held in zip(f["rows"], f["rel_error"], f["held_out"]):
            lines.append(f"| {impl} | {STEP_NAMES[kind]} | {r['shape']} | {r['dtype']} | {gb(r['peak'])} | "
                         f"{gb(r['peak'] * (1 + e))} | {e:+.1%} | {'–' if held is None else f'{held:+.1%}'} |")
    return lines


def target_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    lines = ["| point | step | lean peak GB | bound 1.5 x (W + S) GB | lean / bound | lean peak less the runtime GB | "
             "baseline peak GB | met |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    missed = []
    for r in rows:
        if r["impl"] != "lean" or r["dtype"] != "bfloat16" or r["step"] not in ("edit16", "edit64"):
            continue
        bound = 1.5 * (r["W"] + r["S"])
        base = next((b for b in rows if b["impl"] == "baseline" and b["shape"] == r["shape"] and b["dtype"] == r["dtype"]
                     and b["step"] == r["step"]), None)
        if r["status"] != "measured":
            lines.append(f"| {r['shape']} | {STEP_NAMES[r['step']]} | {r['status']} | {gb(bound)} | – | – | – | – |")
            continue
        ok = r["peak"] <= bound
        if not ok:
            missed.append(f"{r['shape']} {STEP_NAMES[r['step']]}")
        runtime = r["rss_before"] - r["W"]  # what the process held besides the weights before the step
        lines.append(f"| {r['shape']} | {STEP_NAMES[r['step']]} | {gb(r['peak'])} | {gb(bound)} | {r['peak'] / bound:.2f} | "
                     f"{gb(r['peak'] - runtime)} | "
                     f"{gb(base['peak']) if base and base['status'] == 'measured' else '–'} | {'yes' if ok else '**no**'} |")
    return lines, missed


def predictions(rows: list[dict[str, Any]], fits: dict[tuple[str, str], dict[str, Any]]) -> tuple[list[str], dict[str, Any]]:
    """The "what fits where" table: bfloat16 models, from the fits (module docstring of bench_memory)."""
    per_fact = [r["F"] / (r["d_model"] * 4) / int(r["step"][4:]) for r in rows
                if r["step"] in ("edit16", "edit64") and r["status"] == "measured" and r["F"] > 0]
    tokens_per_fact = sum(per_fact) / len(per_fact) if per_fact else 0.0
    lines = ["| model (bfloat16) | task | lean, one pool GB | lean, on the device GB | of it on the host GB | "
             "baseline GB | 24 GB | 48 GB | 80 GB | reported for the official code / EasyEdit |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    found: dict[str, Any] = {}
    for name, shape in TARGETS.items():
        n_r = R_OF[name]
        W = shape.params * 2
        S = n_r * shape.d_mlp ** 2 * 4
        d2 = shape.d_mlp ** 2
        delta = n_r * shape.d_mlp * shape.d_model * 2  # one batch's ΔW of R's layers, bfloat16
        F100 = 100 * tokens_per_fact * shape.d_model * 4
        feats = {"W": W, "S": S, "F": F100}
        tasks = []
        if usable(fits, ("lean", "edit")):
            total = predict(fits[("lean", "edit")]["coef"], feats)
            host = S * (n_r - 1) / n_r  # every C but the layer being solved stays on the host
            base = predict(fits[("baseline", "edit")]["coef"], feats) if usable(fits, ("baseline", "edit")) else float("nan")
            tasks.append(("PMET edit of 100 facts", total, host, base))
        if usable(fits, ("lean", "session3")) and usable(fits, ("lean", "edit")):
            # the measured 3-batch session of 16 facts a batch, with batches of 100 facts (the edits' per-F
            # coefficient) and the history of 7 more batches (each batch's ΔW in float32, on the host)
            F16 = 16 * tokens_per_fact * shape.d_model * 4
            delta32 = n_r * shape.d_mlp * shape.d_model * 4
            total = (predict(fits[("lean", "session3")]["coef"], {**feats, "F": 0.0})
                     + fits[("lean", "edit")]["coef"]["F"] * (F100 - F16) + 7 * delta32)
            # on the host: every C but one, P and P·KpKp·P per layer (float64), 10 batches' ΔW, the originals
            host = S * (n_r - 1) / n_r + 2 * n_r * 8 * d2 + 10 * delta32 + delta
            base = (predict(fits[("baseline", "session3")]["coef"], {**feats, "F": 0.0})
                    + fits[("baseline", "edit")]["coef"]["F"] * (F100 - F16)
                    if usable(fits, ("baseline", "session3")) and usable(fits, ("baseline", "edit")) else float("nan"))
            tasks.append(("AlphaEdit session, 10 batches of 100", total, host, base))
        if usable(fits, ("lean", "eval32")):
            total = predict(fits[("lean", "eval32")]["coef"], {"W": W, "S": S, "F": 0.0})
            base = predict(fits[("baseline", "eval32")]["coef"], {"W": W, "S": S, "F": 0.0}) \
                if usable(fits, ("baseline", "eval32")) else float("nan")
            tasks.append(("CounterFact evaluation", total, 0.0, base))
        for task, total, host, base in tasks:
            device = total - host
            marks = ["yes" if device <= card_bytes(c) else "no" for c in CARDS]
            found[f"{name}/{task}"] = {"total": total, "device": device, "host": host, "baseline": base}
            lines.append(f"| {name} | {task} | {gb(total)} | {gb(device)} | {gb(host)} | {gb(base)} | "
                         + " | ".join(marks) + f" | {PUBLISHED.get((name, task), '–')} |")
    return lines, found


def render(rows: list[dict[str, Any]], points: Path) -> str:
    import json

    fits = fits_of(rows)
    meta_path = points.with_name("memory_fit.json")
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    machines = [meta["machine"].removeprefix("machine: ")] if meta.get("machine") else []
    target_lines, missed = target_rows(rows)
    pred_lines, found = predictions(rows, fits)
    llama = {k.split("/", 1)[1]: v for k, v in found.items() if k.startswith("Llama-3-8B/")}
    verdicts = []
    fit_of = {"PMET edit of 100 facts": ("lean", "edit"), "AlphaEdit session, 10 batches of 100": ("lean", "session3"),
              "CounterFact evaluation": ("lean", "eval32")}
    for task, key in fit_of.items():
        v = llama.get(task)
        if v is not None:
            held = fits[key]["max_abs_held_out"]
            room = card_bytes(24) - v["device"]
            verdicts.append(
                f"* Llama-3-8B, {task}: {gb(v['device'])} GB on the device, {gb(v['total'])} GB in one pool: "
                + (f"fits a 24 GB card with {room / 2**30:.2f} GiB to spare ({room / v['device']:.1%} of the figure)"
                   if room >= 0 else f"**does not fit** a 24 GB card ({-room / 2**30:.2f} GiB over)")
                + (f"; the fit's largest held-out error is {held:.1%}" if held is not None else "")
                + (", larger than the margin: a near thing, to be checked on a card" if held is not None and 0 <= room / v["device"] < held
                   else "") + ".")
    out = [
        "# Memory: what the lean paths cost, measured, and what fits where",
        "",
        "<!-- written by scripts/memory_doc.py from " + (points.relative_to(ROOT).as_posix() if points.is_relative_to(ROOT)
                                                          else points.name) + "; do not edit by hand -->",
        "",
        "pmet-lens keeps the model's weights in their own dtype and everything else small: the statistics",
        "of the update are built and solved one layer at a time and kept on the host, nothing holds",
        "full-vocabulary logits at every position, and every batched stage halves its batch on a CUDA",
        "out-of-memory error. This page measures the peak memory of every stage on random Llama-shaped",
        "checkpoints beside the official code's way of doing the same, fits a memory model to the points",
        "and predicts from it what fits on 24 / 48 / 80 GB cards.",
        "",
        "## What is lean, and where it lives",
        "",
        "| stage | what pmet-lens holds | the official code (the baseline) |",
        "| --- | --- | --- |",
        "| C = E[kkᵀ] of R's layers | layers grouped into corpus passes by `CovarianceStore(working_bytes=2 GiB)`: one float64 "
        "`d_mlp²` sum per layer being built; every C kept on the host (and in the disk cache) | float64 sums of every layer at "
        "once, on the device |",
        "| the update's solve | `λC + KᵀK` built once in float32 and factorised in place (Cholesky), refined with float64 "
        "residuals in row blocks; a float64 fallback (one `d_mlp²` buffer, logged) | `torch.linalg.solve` on float64 copies "
        "of C and KᵀK |",
        "| AlphaEdit | P and its eigendecomposition on the host; the symmetric `(QQᵀ + P·KpKp·P + αI)` solved as above; the "
        "session's ΔW, keys and P·KpKp·P on the host | P and `cache_c` of every layer; a non-symmetric solve |",
        "| keys of the requests | facts x templates in chunks of 8192 tokens (`PromptRun`) | one forward of every row |",
        "| targets | suffix-only steps, logits at the scored positions only | full forward, full `[rows, pos, vocab]` logits |",
        "| perplexity, scoring, generation | blocks to the final residual, the read-out a chunk of positions at a time "
        "(`label_logprobs`), generation only at the last position | full logits |",
        "| causal tracing | σ of W_E once per model (`EmbeddingStats`); restorations grouped by a token budget | a float32 "
        "copy of W_E per call |",
        "| any batched stage | `run_halving`: on `torch.cuda.OutOfMemoryError` the batch is halved and retried (logged) | "
        "the run dies |",
        "",
        "Options: `SolveOptions(float64_device=\"cpu\")` (passed to `edit(..., solve_options=...)` or `EditSession`) runs "
        "the float64 fallback on the host, for GPUs whose float64 rate is 1/64 of float32 (consumer cards); "
        "`SolveOptions(mode=\"float64\")` skips the float32 factorisation. The refined solve equals the float64 solve up to "
        "float64 rounding (tests: relative difference below 1e-9).",
        "",
        "## How it is measured",
        "",
        "`benchmarks/bench_memory.py` writes random bfloat16 Llama checkpoints (`benchmarks/llama_shapes.py`: about 0.5B, 1.2B "
        "and 2.5B parameters, vocabulary 128,256, d_mlp up to 8192) with transformers' `save_pretrained`, and runs each step "
        "in a fresh subprocess: the worker loads the model (`pmet_lens.load_model(path)`), resets the kernel's peak-RSS counter "
        "(`/proc/self/clear_refs`), runs the step and reads `VmHWM`: the peak resident memory of the step with the model "
        "resident (the `load` row is the whole process's peak). R is 5 layers (3-7). The benchmark measures memory, not "
        f"quality: targets take {meta.get('steps', 2)} optimisation step(s) (peak memory is reached in the first), C comes "
        f"from {meta.get('cov_tokens', 8192)} WikiText tokens (C's working set is bounded, so the corpus size changes the "
        f"time, not the peak) and generated texts are {meta.get('gen_length', 100)} tokens long. "
        "The baseline is written in the benchmark, the official way (its docstring lists each step). A point "
        "predicted above the limit is not run and is reported as `skipped` with its prediction.",
        "",
        "Peak RSS is one pool. On a CPU it is the memory the step needs. On a GPU the lean path keeps C, P and a session's "
        "history on the host, so the device needs less than the one-pool figure: the \"on the device\" column below "
        "subtracts those host-resident matrices (by their sizes, not measured on a GPU). Loading itself holds more than "
        "one copy of the weights in host memory for a moment (the checkpoint being converted beside the TransformerLens "
        "model" + (f"; the load fit below: {fits[('lean', 'load')]['coef']['W']:.2f} x W + "
                   f"{fits[('lean', 'load')]['coef']['1'] / GB:.2f} GB" if usable(fits, ("lean", "load")) else "")
        + "); the device only ever receives one.",
        "",
        "Machine: " + (", ".join(machines) if machines else "see the benchmark's first output line") + ".",
        "",
        "## Measured points",
        "",
        *measured_table(rows),
        "",
        "## The memory model",
        "",
        "Per implementation and step, peak = a·W + b·S + c·F + d, fitted by least squares with non-negative coefficients "
        "over the measured points: W = parameters x bytes per parameter, S = |R| · d_mlp² · 4 (C of R's layers in float32), "
        "F = the facts' prompt tokens (every context template and the KL prompt) x d_model x 4 (edits only). A logits term "
        "`batch tokens · d_vocab · 4` cannot be separated from the constant d here: every point has the same vocabulary "
        "and the same batches, so d holds it (for a 128,256-token vocabulary).",
        "",
        *fit_table(fits),
        "",
        "Each point's error (fit minus measured, relative). \"held out\" is the error of the fit made without that "
        "point, where the other points still vary W and S: the error to expect on a shape the fit has not seen.",
        "",
        *error_table(fits),
        "",
        "## The issue's targets",
        "",
        "**Peak memory of a PMET edit in bfloat16 at most 1.5 x (bf16 weights + C of R's layers in float32)**, beside the "
        "official-style baseline of the same run:",
        "",
        *target_lines,
        "",
        ("**Missed on: " + "; ".join(missed) + ".** The peak RSS also holds what the process held before the step "
         "besides the weights (Python, torch, the tokenizer, the data: the column \"less the runtime\" subtracts it), "
         "a constant that weighs most on the smallest point.") if missed
        else "Met on every measured point.",
        "",
        "**What fits where**, predicted from the fits (bfloat16 weights; |R| = 6 for GPT-J, 5 for the others). A PMET "
        "edit of 100 facts is the edits' fit (16 and 64 facts measured) at 100 facts. A 10-batch AlphaEdit session is the "
        "measured 3-batch sessions' fit (16 facts a batch), with the edits' per-fact coefficient for batches of 100 and "
        "the history of 7 more batches (each batch's ΔW, float32). On the device: the one-pool figure less what the "
        "lean path keeps on the host (every C but the layer being solved; for a session also P and P·KpKp·P per layer "
        "in float64, every batch's ΔW and the originals); Python's own memory is left on the device's side, so the "
        "device figures are high by about half a GB. A card of N GB has N GiB (GPU memory is sold in binary units), of "
        "which 1 GiB is left to the CUDA context and the allocator; \"yes\" where the device figure fits the rest. "
        "Extrapolating from at most 2.5 B parameters to 6-14 B, the error to expect is at least the held-out errors "
        "above.",
        "",
        *(pred_lines if len(pred_lines) > 2 else ["No prediction: the fits need measured points of at least two shapes "
                                                  "(the full run of the benchmark)."]),
        "",
        *verdicts,
        "",
        "## Beside EasyEdit's published requirements",
        "",
        *[f"* {text}." for text in EASYEDIT.values()],
        "",
        "## Regenerate",
        "",
        "```bash",
        "python3 benchmarks/bench_memory.py            # every point, alone on the machine (writes benchmarks/results/)",
        "# the points above were measured in parts, with the settings of this page; e.g.",
        "python3 benchmarks/bench_memory.py --opt-steps 1 --cov-tokens 2048 --gen-length 40 --shapes llama-1.2b --dtypes bfloat16",
        "python3 benchmarks/bench_memory.py --opt-steps 1 --cov-tokens 2048 --gen-length 40 --shapes llama-2.5b \\",
        "    --dtypes bfloat16 --impl lean --steps load cov edit16 edit64 alphaedit session3 eval32 --limit-gb 22",
        "python3 scripts/memory_doc.py                 # this page, from benchmarks/results/memory_points.csv",
        "```",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--points", type=Path, default=ROOT / "benchmarks" / "results" / "memory_points.csv")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "memory.md")
    args = parser.parse_args()
    rows = read_points(args.points)
    args.out.write_text(render(rows, args.points.resolve()))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
