"""How the covariance solve changes as the number of corpus tokens grows.

One pass over the default corpus (shipped WikiText-2) accumulates C = E[k kᵀ] of the FFN keys
of layer L = max(R) of SmolLM2; at each checkpoint the update Δ = (λC + KᵀK)⁻¹KᵀR is solved
for the keys of 16 tuning-split CounterFact prompts and a fixed random residual, and compared
with the solve at the largest token count.

    python benchmarks/bench_covariance_tokens.py > benchmarks/results/covariance_tokens.txt
"""

from __future__ import annotations

import argparse

import torch

from pmet_lens import load_model
from pmet_lens.core.tokens import encode, pad, subject_last_position
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, preset
from pmet_lens.editing.update import solve_update


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--checkpoints", default="2000,5000,10000,20000,50000,100000,200000")
    args = ap.parse_args()
    checkpoints = [int(x) for x in args.checkpoints.split(",")]
    model = load_model()
    hp = preset("SmolLM2-135M-Instruct", "pmet")
    L = max(hp.layers)
    key_name = f"blocks.{L}.mlp.hook_post"
    store = CovarianceStore(cache_dir=False, progress=False)
    chunks = store._chunks(model, max(checkpoints), hp.cov_seq_len)
    facts = split_facts("tune", limit=16)
    keys = []
    with torch.no_grad():
        for f in facts:
            _, cache = model.run_with_cache(torch.tensor([encode(model, f.text)]), names_filter=key_name,
                                            stop_at_layer=L + 1)
            keys.append(cache[key_name][0, subject_last_position(model, f.prompt, f.subject)])
    K = torch.stack(keys).double()
    R = torch.randn(len(facts), model.cfg.d_model, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    acc = torch.zeros(model.cfg.d_mlp, model.cfg.d_mlp, dtype=torch.float64)
    count = 0
    snaps = {}
    todo = list(checkpoints)

    def grab(act, hook):
        nonlocal acc
        flat = act.reshape(-1, act.shape[-1])  # one unpadded chunk per forward: every row is a real token
        acc += (flat.T @ flat).double()

    with torch.no_grad(), model.hooks(fwd_hooks=[(key_name, grab)]):
        for c in chunks:
            model(pad(model, [c]).tokens, stop_at_layer=L + 1)
            count += len(c)
            while todo and count >= todo[0]:
                snaps[todo.pop(0)] = acc / count
    ref_n = max(snaps)
    print(f"SmolLM2-135M-Instruct, layer {L} keys, lambda {hp.lam}, 16 tune-split prompts, random residual; "
          f"reference = {ref_n} tokens")
    ref = solve_update(K, R, snaps[ref_n], hp.lam)
    print(f"{'tokens':>8} {'|dC|/|C|':>10} {'|dDelta|/|Delta|':>17} {'cond(lC+KK^T)':>14}")
    for n, C in sorted(snaps.items()):
        d = solve_update(K, R, C, hp.lam)
        A = hp.lam * C + K.T @ K
        print(f"{n:>8} {float((C - snaps[ref_n]).norm() / snaps[ref_n].norm()):>10.4f} "
              f"{float((d - ref).norm() / ref.norm()):>17.4f} {float(torch.linalg.cond(A)):>14.3g}")


if __name__ == "__main__":
    main()
