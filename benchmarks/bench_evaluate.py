"""Benchmark: batched ``evaluate_counterfact`` vs a one-prompt-at-a-time loop of the same maths.

The probability tests (edit, paraphrase and neighborhood prompts, each scored for o* and o^c as the
mean token log-probability of the object) are timed over ``--records`` CounterFact records both ways
in the same run, and the per-record results are checked to agree. ``--gen-records N`` also times the
generation metrics (ROME top-k sampling to 100 tokens) on N records: batched vs one prompt at a time
(both with the key-value cache).

    python benchmarks/bench_evaluate.py --records 100 [--gen-records 2]
"""

from __future__ import annotations

import argparse
import math
import os
import time

import numpy as np
import torch

from pmet_lens import load_counterfact, load_model
from pmet_lens.core.generation import sample_texts
from pmet_lens.evaluation import evaluate_counterfact

from machine import machine_line  # benchmarks/machine.py (the script's folder is on sys.path)


def naive_probability_tests(model, facts) -> list[dict[str, float]]:
    """The same metrics, one (prompt, object) forward at a time, full-vocabulary logits."""
    rows = []
    for f in facts:
        def lp(prompt, target):
            p = model.to_tokens(prompt)[0].tolist()
            t = model.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
            with torch.no_grad():
                logp = model(torch.tensor([p + t])).log_softmax(-1)[0]
            return float(np.mean([float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(t)]))

        e = (lp(f.text, f.target_new), lp(f.text, f.target_true))
        para = [(lp(p, f.target_new), lp(p, f.target_true)) for p in f.paraphrase_prompts]
        neigh = [(lp(p, f.target_new), lp(p, f.target_true)) for p in f.neighborhood_prompts]
        rows.append({
            "efficacy_success": float(e[0] > e[1]),
            "paraphrase_success": float(np.mean([a > b for a, b in para])),
            "neighborhood_success": float(np.mean([b > a for a, b in neigh])),
            "efficacy_magnitude": math.exp(e[0]) - math.exp(e[1]),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=100)
    parser.add_argument("--gen-records", type=int, default=0)
    args = parser.parse_args()

    model = load_model()
    facts = load_counterfact(limit=args.records)
    n_pairs = sum(2 * (1 + len(f.paraphrase_prompts) + len(f.neighborhood_prompts)) for f in facts)
    print(machine_line())
    print(f"records: {len(facts)}, (prompt, object) pairs: {n_pairs}")

    evaluate_counterfact(model, facts[:2], generation=False, progress=False)  # warm-up
    t0 = time.perf_counter()
    per_record, summary = evaluate_counterfact(model, facts, generation=False, progress=False)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    naive = naive_probability_tests(model, facts)
    loop = time.perf_counter() - t0
    worst = max(abs(per_record[k][i] - row[k]) for i, row in enumerate(naive) for k in row)
    print(f"probability tests: batched evaluate_counterfact {batched:.1f} s, one-at-a-time loop {loop:.1f} s, "
          f"speed-up {loop / batched:.1f}x (max abs difference of per-record metrics {worst:.2e})")
    print(f"summary: efficacy {summary['efficacy']:.3f} paraphrase {summary['paraphrase']:.3f} "
          f"neighborhood {summary['neighborhood']:.3f} score {summary['score']:.3f}")

    if args.gen_records:
        prompts = [p for f in facts[: args.gen_records] for p in f.generation_prompts]
        t0 = time.perf_counter()
        batched_texts = sample_texts(model, prompts, seed=0, batch_size=64)
        gb = time.perf_counter() - t0
        t0 = time.perf_counter()
        single = [sample_texts(model, [p], seed=i)[0] for i, p in enumerate(prompts)]
        gs = time.perf_counter() - t0
        same = sum(a == b for a, b in zip(batched_texts, single))
        print(f"generation ({len(prompts)} prompts, 100 tokens, top-k 5): batched {gb:.1f} s, one at a time {gs:.1f} s, "
              f"speed-up {gs / gb:.1f}x ({same}/{len(prompts)} texts identical)")
    print(f"load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
