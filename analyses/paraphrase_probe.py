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

For each paraphrase that fails under ``δ as hooks``, a *reach* section then asks how far from the
optimised targets a winning δ at the same sites lies, as a diagnostic (nothing here feeds an edit
or a preset; the prompt is one of the report split's):

* ``preset δ × s``: the optimised δ's scaled by s (a stronger edit in the same direction);
* ``best δ, |δ| = f × preset``: δ's of the preset's norms times f, each site's norm held fixed,
  optimised by gradient ascent on log P(o*) - log P(o^c) *on that paraphrase itself* (how small a
  δ at these sites could carry o* to this prompt at all), with the cosine of the result to the
  preset δ.

    python analyses/paraphrase_probe.py > figures/paraphrase_probe.txt

``--prefixes-per-start 4`` asks whether more of the papers' context prefixes (20 instead of 5, ROME's
count) would carry the targets to the long-prefixed paraphrase; also a diagnostic only:

    python analyses/paraphrase_probe.py --prefixes-per-start 4 --scales 1 --fractions 1 \
        > figures/paraphrase_probe_prefixes4.txt
"""

from __future__ import annotations

import argparse
from typing import Callable

import torch
from target_realisation import site_states  # sibling script in analyses/

from pmet_lens import load_model
from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, pad, subject_last_position, target_ids
from pmet_lens.data import load_counterfact
from pmet_lens.editing import CovarianceStore, edit, preset
from pmet_lens.evaluation.scoring import score_continuations


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


def margin_fn(model, text: str, fact, hooks: dict[str, str], pos: int) -> Callable:
    """A differentiable ``deltas -> log P(o*) - log P(o^c)`` (mean token log-probabilities) after
    ``text``, each site's δ added at ``pos`` (out of place, so autograd sees it)."""
    prompt = encode(model, text)
    answers = [target_ids(model, fact.target_new), target_ids(model, fact.target_true)]
    batch = pad(model, [prompt + a[:-1] for a in answers])
    at = torch.zeros(batch.tokens.shape[1], 1, device=batch.tokens.device)
    at[pos] = 1.0

    def margin(deltas: dict[str, torch.Tensor]) -> torch.Tensor:
        fwd = [(hooks[s], lambda act, hook, d=d: act + at * d.to(act.dtype)) for s, d in deltas.items()]
        with model.hooks(fwd_hooks=fwd):
            logp = model(batch.tokens).float().log_softmax(-1)
        means = []
        for row, a in enumerate(answers):
            cols = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(a))
            means.append(logp[row, cols, torch.tensor(a)].mean())
        return means[0] - means[1]
    return margin


def best_at_norms(margin: Callable, start: dict[str, torch.Tensor], scale: float, steps: int) -> tuple[float, float]:
    """Largest margin found for δ's with ``|δ_s| = scale * |start_s|`` per site (Adam on the
    directions, started from ``start``), and the cosine of the best δ's (all sites stacked) to ``start``."""
    radius = {s: scale * d.norm() for s, d in start.items()}
    raw = {s: d.clone().requires_grad_(True) for s, d in start.items()}
    opt = torch.optim.Adam(list(raw.values()), lr=0.05 * float(min(radius.values())))
    best, best_d = -float("inf"), start
    for _ in range(steps):
        deltas = {s: radius[s] * v / v.norm() for s, v in raw.items()}
        m = margin(deltas)
        if float(m.detach()) > best:
            best, best_d = float(m.detach()), {s: d.detach() for s, d in deltas.items()}
        grads = torch.autograd.grad(-m, list(raw.values()))
        for v, g in zip(raw.values(), grads):
            v.grad = g
        opt.step()
    flat = torch.cat([best_d[s] for s in start]), torch.cat([start[s] for s in start])
    return best, float(torch.nn.functional.cosine_similarity(*flat, dim=0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", type=int, default=0, help="CounterFact case_id (default 0: Danielle Darrieux)")
    parser.add_argument("--methods", default="pmet,memit")
    parser.add_argument("--neighbours", type=int, default=3, help="neighbourhood prompts shown")
    parser.add_argument("--scales", default="1,2,4,8", help="multiples s of the preset δ tried in the reach section")
    parser.add_argument("--fractions", default="0.0625,0.125,0.25,0.5,1",
                        help="norms, as fractions f of the preset δ's, of the best δ searched in the reach section")
    parser.add_argument("--reach-steps", type=int, default=60, help="gradient steps per best-δ search")
    parser.add_argument("--prefixes-per-start", type=int, default=None,
                        help="context prefixes sampled per start word (default: the preset's; a diagnostic, "
                             "e.g. ROME's 20 prefixes are 4 per start word)")
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
        if args.prefixes_per_start is not None:
            hp = hp.with_(prefixes_per_start=args.prefixes_per_start)
        L = max(hp.layers)
        result = edit(model, [fact], hparams=hp, cov_store=store, apply=False)
        hooks = {site: arch.delta_hook(site, L) for site in result.targets}
        with torch.no_grad():
            initial = site_states(model, [fact], hooks)
        deltas = {s: result.targets[s][0].float() - initial[s][0] for s in hooks}
        conditions: dict[str, list[str] | None] = {"unedited": [], "δ as hooks": list(deltas)}
        if method == "pmet":
            conditions["δ_m only"] = ["mlp_out"]
        conditions["edited"] = None
        changed = "" if args.prefixes_per_start is None else f", but {hp.prefixes_per_start} context prefixes per start word"
        print(f"\n{method.upper()} (preset: layers {list(hp.layers)}, λ {hp.lam:g}, c {hp.clamp_norm_factor:g}{changed}); "
              f"target P(o*) {result.stats['prob'][0]:.2f}; |δ| "
              + ", ".join(f"{s} {float(d.norm()):.1f}" for s, d in deltas.items()))
        print("  log P(o*) / log P(o^c), and whether o* wins, per prompt and condition")
        missed = []
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
                if cond == "δ as hooks" and kind == "paraphrase" and new <= true:
                    missed.append((text, pos))
            print(f"  [{kind}] {text!r}\n      " + " | ".join(cells))
        for text, pos in missed:
            margin = margin_fn(model, text, fact, hooks, pos)
            print(f"  reach on {text!r}: margin log P(o*) - log P(o^c) (o* wins when > 0)")
            with torch.no_grad():
                scaled = [(x, float(margin({s: float(x) * d for s, d in deltas.items()}))) for x in args.scales.split(",")]
            print("      preset δ × s:  " + " | ".join(f"s = {x}: {m:6.2f}" for x, m in scaled))
            for frac in args.fractions.split(","):
                best, cos = best_at_norms(margin, deltas, float(frac), args.reach_steps)
                print(f"      best δ, |δ| = {frac} × preset: {best:6.2f} (cosine to preset δ {cos:.2f})")

if __name__ == "__main__":
    main()
