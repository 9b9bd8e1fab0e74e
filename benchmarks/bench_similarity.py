"""Benchmark PMET Fig. 2 (component_similarity): the package vs a naive baseline, same run.

Package: batched forwards that keep only last-token states, vocabulary projections as large
chunked matmuls. Naive baseline: one ``run_with_cache`` per prompt (full cache of every
activation), then the same maths per prompt. Both compute both variants over all layers.

Prints wall time, prompts/s, the ratio and the process's peak resident memory.
Usage: python benchmarks/bench_similarity.py [--limit 1209] [--naive-limit 100]
(the naive loop is timed on the first --naive-limit prompts and extrapolated linearly to --limit;
the extrapolation is labelled in the output.)
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from machine import machine_line  # benchmarks/machine.py (the script's folder is on sys.path)


def naive(model, prompts, k=50):
    """One run_with_cache per prompt, then the same cosine / top-k Jaccard maths."""
    from pmet_lens.analysis.similarity import topk_jaccard
    from pmet_lens.core.arch import architecture

    arch = architecture(model)
    out = []
    for prompt in prompts:
        _, cache = model.run_with_cache(prompt)
        rows = []
        for l in range(arch.n_layers):
            a, m = cache[arch.attn_out_hook(l)][0, -1], cache[arch.mlp_out_hook(l)][0, -1]
            ln1 = cache[arch.ln_normalized_hook(l, "mhsa")][0, -1] * model.blocks[l].ln1.w
            ln2 = cache[arch.ln_normalized_hook(l, "ffn")][0, -1] * model.blocks[l].ln2.w
            for before, after, lens in [(ln1, a, False), (ln2, m, False),
                                        (cache[arch.attn_input_hook(l)][0, -1], a, True),
                                        (cache[arch.ffn_input_hook(l)][0, -1], m, True)]:
                pair = torch.stack([before, after])
                logits = model.unembed(model.ln_final(pair[:, None]))[:, 0] if lens else pair @ model.W_E.T
                ids = logits.topk(k, dim=-1).indices
                rows.append((torch.nn.functional.cosine_similarity(before, after, dim=0).item(),
                             topk_jaccard(ids[:1], ids[1:]).item()))
        out.append(rows)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=1209)
    parser.add_argument("--naive-limit", type=int, default=100)
    args = parser.parse_args()

    from pmet_lens import load_known_facts, load_model
    from pmet_lens.analysis.similarity import component_similarity

    model = load_model()
    prompts = [f.prompt for f in load_known_facts(limit=args.limit)]
    print(machine_line())
    torch.set_grad_enabled(False)

    t = time.perf_counter()
    df = component_similarity(model, prompts, variant="both", progress=False)
    package_s = time.perf_counter() - t
    print(f"package: {len(prompts)} prompts x {model.cfg.n_layers} layers x 2 variants: {package_s:.1f} s "
          f"({len(prompts) / package_s:.1f} prompts/s), {len(df)} rows")

    n_naive = min(args.naive_limit, len(prompts))
    t = time.perf_counter()
    naive(model, prompts[:n_naive])
    naive_s = time.perf_counter() - t
    naive_full = naive_s * len(prompts) / n_naive
    label = "measured" if n_naive == len(prompts) else f"extrapolated from {n_naive} prompts ({naive_s:.1f} s)"
    print(f"naive baseline (run_with_cache per prompt): {naive_full:.1f} s for {len(prompts)} prompts [{label}]")
    print(f"speed-up: {naive_full / package_s:.1f}x")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2
    print(f"peak resident memory of the whole process: {peak_gb:.2f} GB")


if __name__ == "__main__":
    main()
