"""Where does an edit fail to generalise: in the optimised target, or in the weight update?

For one CounterFact case (default: case 0, Danielle Darrieux's mother tongue -> English) and each
method's SmolLM2 preset, this script optimises the edit once and scores log P(o*) and log P(o^c)
on the case's edit prompt, paraphrases and first neighbourhood prompts under:

* ``unedited``: the model as loaded;
* ``δ as hooks``: every optimised δ (PMET: δ_m on ``hook_mlp_out`` and δ_a on ``hook_attn_out``;
  MEMIT: δ on ``hook_resid_post``) added at layer L at the subject's last token of *that* prompt:
  what a perfect realisation of the targets would give there (PMET eq. 9 / MEMIT eq. 16 targets);
* ``δ_m only`` (PMET): the part the update writes into W_out (δ_a is discarded, PMET step 4);
* ``edited``: the weight update written into W_out (PMET eq. 10-12 / MEMIT eq. 14-16).

If a prompt fails under ``δ as hooks`` too, the optimised targets themselves do not carry over to
that prompt, and the update, whose job is to realise them, is not where the generalisation is lost
(it can still differ from the hooks: it also changes layers below L and the subject's other tokens).

    python analyses/paraphrase_probe.py > figures/paraphrase_probe.txt
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch

from pmet_lens import load_model
from pmet_lens.arch import architecture
from pmet_lens.data import load_counterfact
from pmet_lens.editing import CovarianceStore, edit, preset
from pmet_lens.editing.targets import site_hook
from pmet_lens.scoring import score_continuations
from pmet_lens.tokens import subject_last_position
from target_realisation import site_states  # sibling script in analyses/


def new_and_true(model, text: str, fact, fwd_hooks=()) -> tuple[float, float]:
    """log P(o*) and log P(o^c) after ``text`` (mean token log-probabilities; rows are right-padded,
    so a hook at a prompt position sees the same position in every row)."""
    with model.hooks(fwd_hooks=list(fwd_hooks)):
        lp = score_continuations(model, [text, text], [fact.target_new, fact.target_true]).mean_logprob
    return float(lp[0]), float(lp[1])


def add_at(position: int, delta: torch.Tensor) -> Callable:
    """Hook adding ``delta`` at ``position`` of every row."""
    def hook_fn(act, hook):
        act[:, position] += delta.to(act.dtype)
        return act
    return hook_fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=int, default=0, help="CounterFact case_id (default 0: Danielle Darrieux)")
    parser.add_argument("--methods", default="pmet,memit")
    parser.add_argument("--neighbours", type=int, default=3, help="neighbourhood prompts shown")
    args = parser.parse_args()
    model = load_model()
    name = str(model.cfg.model_name)
    arch = architecture(model)
    (fact,) = [f for f in load_counterfact() if f.case_id == args.case]
    store = CovarianceStore()
    prompts = [("edit", fact.prompt.format(fact.subject))] + [("paraphrase", p) for p in fact.paraphrase_prompts]
    prompts += [("neighbour", p) for p in fact.neighborhood_prompts[: args.neighbours]]
    print(f"{name}, CounterFact case {fact.case_id}: {fact.prompt.format(fact.subject)!r} "
          f"o^c {fact.target_true!r} -> o* {fact.target_new!r}")
    for method in args.methods.split(","):
        hp = preset(name, method)
        L = max(hp.layers)
        result = edit(model, [fact], hparams=hp, cov_store=store, apply=False)
        hooks = {site: site_hook(arch, site, L) for site in result.targets}
        with torch.no_grad():
            initial = site_states(model, [fact], hooks)
        deltas = {s: result.targets[s][0].float() - initial[s][0] for s in hooks}
        conditions: dict[str, list[str] | None] = {"unedited": [], "δ as hooks": list(deltas)}
        if method == "pmet":
            conditions["δ_m only"] = ["mlp_out"]
        conditions["edited"] = None
        print(f"\n{method.upper()} (preset: layers {list(hp.layers)}, λ {hp.lam:g}, c {hp.clamp_norm_factor:g}); "
              f"target P(o*) {result.stats['prob'][0]:.2f}; |δ| "
              + ", ".join(f"{s} {float(d.norm()):.1f}" for s, d in deltas.items()))
        print("  log P(o*) / log P(o^c), and whether o* wins, per prompt and condition")
        for kind, text in prompts:
            at = text.rfind(fact.subject)  # neighbourhood prompts have another subject: no δ there
            pos = subject_last_position(model, text[:at] + "{}" + text[at + len(fact.subject):], fact.subject) if at >= 0 else None
            cells = []
            for cond, sites in conditions.items():
                if sites and pos is None:
                    continue
                if sites is None:
                    with result:
                        new, true = new_and_true(model, text, fact)
                else:
                    new, true = new_and_true(model, text, fact, [(hooks[s], add_at(pos, deltas[s])) for s in sites])
                cells.append(f"{cond}: {new:6.2f} / {true:6.2f} {'o*' if new > true else '  '}")
            print(f"  [{kind}] {text!r}\n      " + " | ".join(cells))


if __name__ == "__main__":
    main()
