"""Benchmark: batched causal tracing vs a naive loop (one full forward per cell and noise sample).

1. one full single-prompt trace: all positions x all layers, kinds hidden/mlp/attn, --samples;
2. an averaged run (pmet_lens.average_traces) over --facts known facts;
3. the naive loop on the same prompt, timed on --naive-cells (position, layer) cells of each kind
   (x --samples full forwards each) and EXTRAPOLATED to all cells (clearly labelled);
4. the naive loop on the averaged run's own facts: --naive-facts of them, one timed cell per kind
   each, the mean per-cell time EXTRAPOLATED to the cells the averaged run computes for every fact
   (positions from the first subject token on x layers x 3 kinds, plus the two severed curves at
   the last subject token; a severed cell is timed as a plain hidden cell, which flatters the
   naive loop since it leaves out the severing hooks).

Usage: python benchmarks/bench_tracing.py [--facts 50] [--samples 10] [--naive-cells 6] [--naive-facts 10]
"""

from __future__ import annotations

import argparse
import time

import torch

from pmet_lens import load_known_facts, load_model
from pmet_lens.analysis.averaged import average_traces
from pmet_lens.analysis.tracing import embedding_std, trace, window_layers
from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, subject_range

from machine import machine_line  # benchmarks/machine.py (the script's folder is on sys.path)

PROMPT, SUBJECT = "The mother tongue of Danielle Darrieux is", "Danielle Darrieux"


def naive_cell(model, ids, subj, clean, target, kind, t, layer, eps, window) -> float:
    """P(target) for one cell: `samples` full forwards with plain hooks (no batching, no reuse)."""
    arch = architecture(model)
    if kind == "hidden":
        names = [arch.resid_post_hook(layer)]
    else:
        hook_of = arch.mlp_out_hook if kind == "mlp" else arch.attn_out_hook
        names = [hook_of(j) for j in window_layers(layer, window, arch.n_layers)]
    probs = []
    for e in eps:
        def noise(act, hook, e=e):
            act[:, subj[0]:subj[1]] += e
            return act

        def restore(act, hook):
            act[:, t] = clean[hook.name][:, t]
            return act

        logits = model.run_with_hooks(ids, fwd_hooks=[("hook_embed", noise)] + [(n, restore) for n in names])
        probs.append(torch.softmax(logits[0, -1], -1)[target].item())
    return sum(probs) / len(probs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--facts", type=int, default=50)
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--naive-cells", type=int, default=6, help="cells per kind timed in the naive loop")
    p.add_argument("--naive-facts", type=int, default=10,
                   help="facts of the averaged run on which the naive loop is timed (one cell per kind each)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    model = load_model()
    n_layers = model.cfg.n_layers
    print(f"{machine_line()}, model {model.cfg.model_name}")

    fast = {}
    for kind in ("hidden", "mlp", "attn"):
        t0 = time.time()
        r = trace(model, PROMPT, SUBJECT, kind=kind, samples=args.samples)
        fast[kind] = time.time() - t0
        print(f"fast trace {kind}: {fast[kind]:.1f} s ({len(r.tokens)} positions x {n_layers} layers, {args.samples} samples)")
    total_fast = sum(fast.values())
    print(f"fast full single-prompt trace, 3 kinds: {total_fast:.1f} s")

    ids = torch.tensor([encode(model, PROMPT)])
    subj = subject_range(model, PROMPT, SUBJECT)
    _, clean = model.run_with_cache(ids)
    target = r.target_ids[0]
    gen = torch.Generator().manual_seed(0)
    eps = torch.randn(args.samples, subj[1] - subj[0], model.cfg.d_model, generator=gen) * 3.0 * embedding_std(model)
    n_cells = len(r.tokens) * n_layers
    naive_cell(model, ids, subj, clean, target, "hidden", 0, 0, eps[:1], 10)  # warm-up, not timed
    naive_total = 0.0
    for kind in ("hidden", "mlp", "attn"):
        cells = [(t, l) for t in range(len(r.tokens)) for l in range(n_layers)][:: max(1, n_cells // args.naive_cells)]
        cells = cells[: args.naive_cells]
        t0 = time.time()
        for t, l in cells:
            naive_cell(model, ids, subj, clean, target, kind, t, l, eps, 10)
        per_cell = (time.time() - t0) / len(cells)
        naive_total += per_cell * n_cells
        print(f"naive {kind}: {per_cell:.2f} s per cell ({args.samples} forwards), timed on {len(cells)} cells; "
              f"EXTRAPOLATED to {n_cells} cells: {per_cell * n_cells:.0f} s")
    print(f"naive full trace, 3 kinds (extrapolated): {naive_total:.0f} s; speed-up {naive_total / total_fast:.1f}x")

    facts = load_known_facts()
    t0 = time.time()
    avg = average_traces(model, facts, limit=args.facts, samples=args.samples, progress=False)
    dt = time.time() - t0
    print(f"averaged run: {avg.n_facts} known facts ({avg.n_seen} examined), {dt:.0f} s, {dt / avg.n_facts:.1f} s per fact")

    by_id = {f.known_id: f for f in facts}
    used = [by_id[i] for i in avg.fact_ids]
    cells_per_fact = []
    for f in used:
        s0 = subject_range(model, f.prompt, f.subject)[0]
        cells_per_fact.append((len(encode(model, f.prompt)) - s0) * n_layers * 3 + 2 * n_layers)
    timed, t_naive = 0, 0.0
    for j, f in enumerate(used[: args.naive_facts]):
        f_ids = torch.tensor([encode(model, f.prompt)])
        f_subj = subject_range(model, f.prompt, f.subject)
        _, f_clean = model.run_with_cache(f_ids)
        f_target = int(model(f_ids)[0, -1].argmax())
        f_eps = torch.randn(args.samples, f_subj[1] - f_subj[0], model.cfg.d_model, generator=gen)
        f_eps *= 3.0 * embedding_std(model)
        n_tok = f_ids.shape[1]
        for k, kind in enumerate(("hidden", "mlp", "attn")):
            t, l = f_subj[0] + (j + k) % (n_tok - f_subj[0]), (7 * j + 11 * k) % n_layers
            t1 = time.time()
            naive_cell(model, f_ids, f_subj, f_clean, f_target, kind, t, l, f_eps, 10)
            t_naive += time.time() - t1
            timed += 1
    per_cell = t_naive / timed
    naive_avg = per_cell * sum(cells_per_fact)
    print(f"naive loop on the averaged run's facts: {per_cell:.2f} s per cell ({args.samples} forwards), timed on "
          f"{timed} cells of {min(args.naive_facts, len(used))} of its facts; EXTRAPOLATED to the "
          f"{sum(cells_per_fact)} cells of all {len(used)} facts: {naive_avg:.0f} s; ratio {naive_avg / dt:.1f}x")


if __name__ == "__main__":
    main()
