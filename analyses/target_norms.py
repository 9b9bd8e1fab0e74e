"""How far the target optimisation gets under the norm clamp, PMET vs MEMIT (tune split only).

For the first ``--limit`` tune-split CounterFact facts and each method's SmolLM2 preset, the
targets are optimised (PMET eq. 9 / MEMIT eq. 16) and, per δ site, the ratio |δ| / |initial
output| (the clamp bounds it by ``clamp_norm_factor``), the initial output's norm and each fact's
final P(o*) are printed. It shows whether the clamp binds and how large a perturbation each
method may make at layer L.

    python analyses/target_norms.py --limit 8 > figures/target_norms.txt
"""

from __future__ import annotations

import argparse

from pmet_lens import load_model
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import context_prefixes, preset
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.targets import optimise_targets


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=8, help="first N tune-split facts")
    parser.add_argument("--methods", default="pmet,memit")
    args = parser.parse_args()
    model = load_model()
    name = str(model.cfg.model_name)
    facts = split_facts("tune", limit=args.limit)
    print(f"{name}, first {len(facts)} tune-split facts")
    for method in args.methods.split(","):
        hp = preset(name, method)
        targets = optimise_targets(model, prepare_requests(model, facts, context_prefixes(model, hp)), hp)
        print(f"\n{method}: layer L = {max(hp.layers)}, clamp c = {hp.clamp_norm_factor}, steps = {hp.steps}")
        for site, delta in targets.delta.items():
            init_norm = targets.init[site].norm(dim=-1)
            ratio = delta.norm(dim=-1) / init_norm
            print(f"  {site:>10}: mean |initial output| {float(init_norm.mean()):7.1f}, mean |δ| {float(delta.norm(dim=-1).mean()):6.1f}, "
                  f"|δ|/|initial| per fact {[round(float(r), 3) for r in ratio]}")
        print(f"  final P(o*) per fact {[round(float(p), 2) for p in targets.prob]} (mean {float(targets.prob.mean()):.2f}); "
              f"steps {targets.steps.tolist()}")


if __name__ == "__main__":
    main()
