"""Edit the same N CounterFact facts three ways and compare speed, memory and success.

(a) baseline, written here with plain hooks the way the official PMET/MEMIT code computes the
    targets: one fact at a time, every optimisation step a full forward of all layers and all
    positions with the unembedding at every position (torch Adam, same loss and stops);
(b) the package, one fact per ``edit`` call;
(c) the package, all N facts in one ``edit`` call;
with ``--compile`` also (c) with ``edit(..., compile=True)`` (torch.compile of the blocks after L), timed
in the same run: first on the N facts (the compilation included), then on the ``--n-batched`` facts.
The weight update (keys + solve) of (a) reuses the package's, so the comparison isolates the
target optimisation, which dominates. Covariance is built (and timed) once, then cached.

    python benchmarks/bench_editing.py --n 32 --method pmet [--n-batched 100] [--compile]
"""

from __future__ import annotations

import argparse
import resource
import time
from functools import partial

import torch

from pmet_lens import load_model
from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, pad, subject_last_position, target_ids
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, context_prefixes, edit, preset
from pmet_lens.editing.context import context_templates
from pmet_lens.editing.hparams import settings_for
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.site import TARGET_WEIGHT, edit_site
from pmet_lens.editing.targets import Targets
from pmet_lens.editing.update import compute_and_apply_updates, least_squares_solve
from pmet_lens.evaluation.scoring import score_continuations

from machine import (
    machine_line,  # benchmarks/machine.py (the script's folder is on sys.path)
)


def baseline_targets(model, fact, hp, prefixes) -> Targets:
    """Official-style compute_z / compute_zs for ONE fact (full forward, full unembedding)."""
    arch = architecture(model)
    settings = settings_for(hp)
    L = max(hp.layers)
    tgt = target_ids(model, fact.target_new)
    seqs, looks, tpos = [], [], []
    for tmpl in context_templates(prefixes):
        tt = tmpl.replace("{}", fact.prompt)
        ids = encode(model, tt.format(fact.subject))
        looks.append(subject_last_position(model, tt, fact.subject))
        tpos.append([len(ids) - 1 + k for k in range(len(tgt))])
        seqs.append(ids + tgt[:-1])
    looks.append(subject_last_position(model, "{} is a", fact.subject))
    seqs.append(encode(model, f"{fact.subject} is a"))
    batch = pad(model, seqs)
    rows = torch.arange(len(seqs))
    hooks = {s: arch.delta_hook(s, L) for s in settings.delta_sites}
    init = {}

    def cap(act, hook):
        init[hook.name] = act[0, looks[0]].detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(h, cap) for h in hooks.values()]):
        logits = model(batch.tokens)
        kl_init = logits[-1, looks[-1]].log_softmax(-1)
    deltas = {s: torch.zeros_like(init[h], requires_grad=True) for s, h in hooks.items()}
    opt = torch.optim.Adam(list(deltas.values()), lr=hp.lr)
    phi = hp.nll_factor
    look_t = torch.tensor(looks)
    steps = 0
    for it in range(hp.steps):
        steps = it + 1
        opt.zero_grad()

        def add(act, hook, _site={h: s for s, h in hooks.items()}):
            return act.index_put((rows, look_t), deltas[_site[hook.name]].expand(len(rows), -1), accumulate=True)

        with model.hooks(fwd_hooks=[(h, add) for h in hooks.values()]):
            logits = model(batch.tokens)  # all layers, all positions, unembedding everywhere
        lp = logits.log_softmax(-1)
        nll, top = 0.0, True
        for j, pos in enumerate(tpos):
            tok_lp = lp[j, pos, tgt]
            nll = nll + (-tok_lp.sum() / len(tgt))
            top = top and bool((lp[j, pos].argmax(-1) == torch.tensor(tgt)).all())
        nll = nll / len(tpos)
        kl_lp = lp[-1, looks[-1]]
        kl = (kl_lp.exp() * (kl_lp - kl_init)).sum()  # KL(P_edited ‖ P_init), the official direction
        wd = sum(hp.weight_decay * deltas[s].norm() / init[h].norm() ** 2 for s, h in hooks.items())
        loss = phi * nll + hp.kl_factor * kl + wd
        if loss.item() < hp.loss_stop:
            break
        if settings.kl_stop is not None:
            phi = 0.1 * hp.nll_factor if top else hp.nll_factor
            if top and kl.item() <= settings.kl_stop:
                break
        if it == hp.steps - 1:
            break
        loss.backward()
        opt.step()
        with torch.no_grad():
            for s, h in hooks.items():
                mx = hp.clamp_norm_factor * init[h].norm()
                if deltas[s].norm() > mx:
                    deltas[s].mul_(mx / deltas[s].norm())
    return Targets(init={s: init[h][None] for s, h in hooks.items()},
                   delta={s: d.detach()[None] for s, d in deltas.items()},
                   steps=torch.tensor([steps]), loss=torch.tensor([loss.item()]))


def success(model, facts) -> list[bool]:
    """Per fact: is the new object more likely than the true one after the edit prompt (ROME/MEMIT
    efficacy, mean token log-probability)?"""
    prompts = [f.text for f in facts]
    with torch.no_grad():
        new = score_continuations(model, prompts, [f.target_new for f in facts]).mean_logprob
        true = score_continuations(model, prompts, [f.target_true for f in facts]).mean_logprob
    return (new > true).tolist()


def one_call(model, facts, hp, store, compile=False) -> tuple[float, list[bool], float]:
    """(c): all ``facts`` in one ``edit`` call; seconds, per-fact success while applied, mean steps."""
    t0 = time.perf_counter()
    with edit(model, facts, hparams=hp, cov_store=store, progress=False, compile=compile) as r:
        seconds = time.perf_counter() - t0
        ok = success(model, facts)
    return seconds, ok, sum(r.stats["steps"]) / len(facts)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--method", default="pmet")
    ap.add_argument("--skip-baseline", action="store_true", help="skip (a), the official-style loop")
    ap.add_argument("--skip-per-call", action="store_true",
                    help="skip (b) and (c) on the --n facts (with --skip-baseline and --n-batched: only the 100-edit timing)")
    ap.add_argument("--n-batched", type=int, default=0,
                    help="also time one call editing this many tune facts (the 100-edit target)")
    ap.add_argument("--compile", action="store_true",
                    help="also time (c) with edit(..., compile=True) on the same facts, in the same run")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    model = load_model()
    facts = split_facts("tune", limit=args.n)
    hp = preset("SmolLM2-135M-Instruct", args.method)
    store = CovarianceStore(progress=False)
    t0 = time.perf_counter()
    arch = architecture(model)
    key_hooks = [edit_site(arch, TARGET_WEIGHT[s], l).key_hook for l in hp.layers for s in settings_for(hp).kept_sites]
    store.get(model, key_hooks,
              hp.cov_tokens, hp.cov_dtype, hp.cov_seq_len)
    cov_time = time.perf_counter() - t0
    prefixes = context_prefixes(model, hp)
    hp = hp.with_(context_prefixes=prefixes)
    print(machine_line())
    print(f"model SmolLM2-135M-Instruct, method {args.method}, N={args.n}, layers {hp.layers}, "
          f"cov_tokens {hp.cov_tokens}")
    print(f"covariance (build or cache read): {cov_time:.1f}s (build time this run: {store.last_build_seconds:.1f}s)")
    results = {}

    if not args.skip_baseline:
        t0 = time.perf_counter()
        targets = []
        for f in facts:
            targets.append(baseline_targets(model, f, hp, prefixes))
        t_opt = time.perf_counter() - t0
        settings = settings_for(hp)
        tv = {s: torch.cat([t.value(s) for t in targets]) for s in settings.kept_sites}
        covs = store.get(model, key_hooks, hp.cov_tokens, hp.cov_dtype, hp.cov_seq_len)
        orig = {}
        compute_and_apply_updates(model, prepare_requests(model, facts, prefixes), tv, hp.layers, settings.spread, covs,
                                  solve=partial(least_squares_solve, lam=hp.lam),
                                  on_write=lambda site, d: orig.setdefault(site.param_name, site.param(model).detach().clone()))
        t_a = time.perf_counter() - t0
        results["a"] = (t_a, success(model, facts))
        with torch.no_grad():
            for n, o in orig.items():
                model.get_parameter(n).copy_(o)
        print(f"(a) baseline one-at-a-time full forward: {t_a / len(facts):.2f} s/fact "
              f"(targets {t_opt / len(facts):.2f} s/fact), success {sum(results['a'][1])}/{len(facts)}")

    if not args.skip_per_call:
        t_b, ok_b = 0.0, []
        for f in facts:  # timed like (a) and (c): the edit, not the success check
            t0 = time.perf_counter()
            with edit(model, [f], hparams=hp, cov_store=store, progress=False):
                t_b += time.perf_counter() - t0
                ok_b += success(model, [f])
        print(f"(b) package one fact per call: {t_b / len(facts):.2f} s/fact, success {sum(ok_b)}/{len(facts)} "
              "(each fact edited alone)")

        t_c, ok_c, steps = one_call(model, facts, hp, store)
        print(f"(c) package all {len(facts)} in one call: {t_c / len(facts):.2f} s/fact, success {sum(ok_c)}/{len(facts)}, "
              f"mean steps {steps:.1f}")
        if args.compile:
            t_cc, ok_cc, steps_cc = one_call(model, facts, hp, store, compile=True)
            agree = sum(x == y for x, y in zip(ok_c, ok_cc))
            print(f"(c) compiled, all {len(facts)} in one call, compilation included: {t_cc / len(facts):.2f} s/fact "
                  f"({t_c / t_cc:.2f}x eager (c)), success {sum(ok_cc)}/{len(facts)}, mean steps {steps_cc:.1f}, "
                  f"success agreement with eager (c): {agree}/{len(facts)}")
        if "a" in results:
            t_a = results["a"][0]
            print(f"ratios per fact: (a)/(b) {t_a / t_b:.2f}x, (a)/(c) {t_a / t_c:.2f}x")
            agree = sum(x == y for x, y in zip(results["a"][1], ok_c))
            print(f"success agreement (a) vs (c): {agree}/{len(facts)}")
    if args.n_batched:
        many = split_facts("tune", limit=args.n_batched)
        t_many, ok_many, steps_many = one_call(model, many, hp, store)
        print(f"(c) package all {len(many)} in one call (covariance cached): {t_many:.0f} s = {t_many / 60:.1f} min, "
              f"{t_many / len(many):.2f} s/fact, success {sum(ok_many)}/{len(many)}, mean steps {steps_many:.1f}")
        if args.compile:
            t_mc, ok_mc, steps_mc = one_call(model, many, hp, store, compile=True)
            print(f"(c) compiled, all {len(many)} in one call: {t_mc:.0f} s = {t_mc / 60:.1f} min ({t_many / t_mc:.2f}x eager), "
                  f"{t_mc / len(many):.2f} s/fact, success {sum(ok_mc)}/{len(many)}, mean steps {steps_mc:.1f}")
    print(f"peak RSS of the whole run {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")


if __name__ == "__main__":
    main()
