"""How much of each optimised δ the weight update realises, PMET vs MEMIT, CounterFact vs zsRE.

For each fact, the optimisation finds a target v = h_0 + δ at layer L (PMET: the FFN output
``hook_mlp_out`` and the MHSA output ``hook_attn_out``; MEMIT: ``hook_resid_post``) at the
subject's last token; the weight update then tries to make the edited model produce v there
(PMET eq. 10-12, MEMIT eq. 14-16). This script mass-edits the first ``--limit`` facts of each
dataset with each method's SmolLM2 preset and measures, on the bare edit prompt,

    realised = <h_edited - h_0, δ> / |δ|^2    (1 = the target is met along δ, 0 = not moved)

and the cosine of h_edited - h_0 with δ. The attention site of PMET is optimised but never
written to the weights (only W_out is updated), so its realised fraction shows what the FFN
edits at layers < L pass on to the MHSA of L. CounterFact facts come from the report split.

    python analyses/target_realisation.py --limit 24 > figures/target_realisation.txt
"""

from __future__ import annotations

import argparse

import torch

from pmet_lens import load_model, load_zsre
from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, subject_last_position
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, edit, preset


def site_states(model, facts, hooks: dict[str, str]) -> dict[str, torch.Tensor]:
    """Activation of each hook at each fact's subject-last token on its bare prompt: site -> [facts, d]."""
    out: dict[str, list[torch.Tensor]] = {site: [] for site in hooks}
    for fact in facts:
        pos = subject_last_position(model, fact.prompt, fact.subject)
        _, cache = model.run_with_cache(torch.tensor([encode(model, fact.prompt.format(fact.subject))]),
                                        names_filter=list(hooks.values()))
        for site, name in hooks.items():
            out[site].append(cache[name][0, pos].float())
    return {site: torch.stack(v) for site, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=24, help="first N facts of each dataset")
    parser.add_argument("--methods", default="pmet,memit")
    args = parser.parse_args()
    model = load_model()
    name = str(model.cfg.model_name)
    arch = architecture(model)
    store = CovarianceStore()
    datasets = {"CounterFact (report split)": split_facts("report", limit=args.limit),
                "zsRE": [r.to_fact() for r in load_zsre(limit=args.limit)]}
    print(f"{name}: realised fraction <h_edited - h_0, δ> / |δ|^2 at layer L, subject's last token, bare edit prompt")
    for data_name, facts in datasets.items():
        for method in args.methods.split(","):
            hp = preset(name, method)
            result = edit(model, facts, hparams=hp, cov_store=store, apply=False)
            hooks = {site: arch.delta_hook(site, max(hp.layers)) for site in result.targets}
            with torch.no_grad():
                before = site_states(model, facts, hooks)
                with result:
                    after = site_states(model, facts, hooks)
            print(f"\n{data_name}, {method} ({len(facts)} facts, one mass edit): mean target P(o*) "
                  f"{float(torch.tensor(result.stats['prob']).mean()):.2f}")
            for site, target in result.targets.items():
                delta = target.float() - before[site]
                moved = after[site] - before[site]
                realised = (moved * delta).sum(-1) / (delta * delta).sum(-1).clamp_min(1e-12)
                cos = torch.nn.functional.cosine_similarity(moved, delta, dim=-1)
                print(f"  {site:>10}: realised mean {float(realised.mean()):.2f}, median {float(realised.median()):.2f}, "
                      f"cosine mean {float(cos.mean()):.2f}; |δ| mean {float(delta.norm(dim=-1).mean()):.1f}")


if __name__ == "__main__":
    main()
