"""MEND's training time and the per-edit time of the trained MEND, each beside an official-style loop.

Training (one step = one batched edit of ``--batch`` training edits and the backward pass into g and α):

(a) baseline, the official MEND trainer's step written with plain hooks: the edit prompts' full forward
    and a full ``loss.backward()`` for the gradient factors, then full forwards of the edited model on
    x_e' and x_loc and of the unedited model on x_loc, with the read-out at every position;
(b) the package (:mod:`pmet_lens.editing.mend_training`): the frozen model's factors and the residual
    stream entering the first edited block computed once per training edit (timed separately: a cost
    paid once, not per step), then per step only the edited blocks and the read-out where a loss needs it.

The full training time is estimated from (b) as preparation + steps x step time (+ validations) for
the zsRE run of ``analyses/train_mend.py``'s defaults.

Editing with the shipped network (``--network``, default ``counterfact``): (c) the official-style edit
(full forward and ``loss.backward()`` of every weight, factors from hooks, then g) and (d)
``edit(model, facts, method="mend")``, for 1 fact and for ``--n`` facts in one call; MEMIT's edit of the
same facts in one call is timed beside them for scale.

    python benchmarks/bench_mend.py --steps 10 --n 32 [--quick]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from pmet_lens import load_model
from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, pad, target_ids
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import edit
from pmet_lens.editing.mend import MENDHyperParams, mend_deltas, network_for
from pmet_lens.editing.mend_training import (
    MENDTrainingParams,
    counterfact_examples,
    prepare_edits,
    train_mend,
)

from machine import machine_line, median_seconds  # benchmarks/machine.py (the script's folder is on sys.path)


def official_factors(model, layers, seqs, targets):
    """Gradient factors the official way: hooks on every edited W_out's input and output gradient, a full
    forward of all positions with the read-out everywhere, and ``loss.backward()`` into every weight."""
    arch = architecture(model)
    keys, grads = {}, {}

    def fk(act, hook):
        keys[hook.name] = act.detach()

    def bd(grad, hook):
        grads[hook.name] = grad.detach()

    batch = pad(model, seqs)
    with model.hooks(fwd_hooks=[(arch.mlp_key_hook(l), fk) for l in layers],
                     bwd_hooks=[(arch.mlp_out_hook(l), bd) for l in layers]):
        logits = model(batch.tokens)  # [rows, pos, vocab]
        lp = torch.log_softmax(logits.float(), -1)
        loss = 0.0
        for r, (seq, tgt) in enumerate(zip(seqs, targets)):
            pos = torch.arange(len(seq) - len(tgt), len(seq))  # positions predicting o*
            loss = loss - lp[r, pos, torch.tensor(tgt)].mean()
        model.zero_grad(set_to_none=True)
        loss.backward()
    real = torch.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]
    return {l: (keys[arch.mlp_key_hook(l)][real], grads[arch.mlp_out_hook(l)][real]) for l in layers}


def official_step(model, network, opt, examples, layers, loc_per_edit):
    """One MEND training step the official way (see the module docstring, (a))."""
    arch = architecture(model)
    seqs, tg = [], []
    for e in examples:
        t = target_ids(model, e.fact.target_new)
        seqs.append(encode(model, e.fact.text) + t[:-1])
        tg.append(t)
    for p in model.parameters():
        p.requires_grad_(True)
    factors = official_factors(model, layers, seqs, tg)
    for p in model.parameters():
        p.requires_grad_(False)
        p.grad = None
    eq, eq_t, loc = [], [], []
    for e, t in zip(examples, tg):
        for text in e.equivalent:
            eq.append(encode(model, text) + t[:-1])
            eq_t.append(t)
        loc += [encode(model, text) for text in e.locality[:loc_per_edit]]
    with torch.no_grad():
        lb = pad(model, loc)
        base = torch.log_softmax(model(lb.tokens).float(), -1)  # unedited model on x_loc, every position
    store = {}

    def keep(act, hook):
        store[hook.name] = act

    hooks = []
    for l in layers:
        ut, dt = network.transform(l, *factors[l])
        a = network.alpha[network.mode(l)]

        def add(act, hook, _u=ut, _d=dt, _a=a, _k=arch.mlp_key_hook(l)):
            return act + (-_a * ((store.pop(_k) @ _u.T) @ _d)).to(act.dtype)

        hooks += [(arch.mlp_key_hook(l), keep), (arch.mlp_out_hook(l), add)]
    eb = pad(model, eq)
    with model.hooks(fwd_hooks=hooks):
        lp = torch.log_softmax(model(eb.tokens).float(), -1)
    l_e = 0.0
    for r, (seq, t) in enumerate(zip(eq, eq_t)):
        pos = torch.arange(len(seq) - len(t), len(seq))
        l_e = l_e - lp[r, pos, torch.tensor(t)].mean() / len(eq)
    hooks = []
    for l in layers:  # the same edit again for the x_loc forward
        ut, dt = network.transform(l, *factors[l])
        a = network.alpha[network.mode(l)]

        def add2(act, hook, _u=ut, _d=dt, _a=a, _k=arch.mlp_key_hook(l)):
            return act + (-_a * ((store.pop(_k) @ _u.T) @ _d)).to(act.dtype)

        hooks += [(arch.mlp_key_hook(l), keep), (arch.mlp_out_hook(l), add2)]
    with model.hooks(fwd_hooks=hooks):
        post = torch.log_softmax(model(lb.tokens).float(), -1)
    real = torch.arange(lb.tokens.shape[1])[None, :] < lb.lengths[:, None]
    l_loc = (base.exp() * (base - post)).sum(-1)[real].mean()
    loss = 0.1 * l_e + l_loc
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=10, help="training steps timed per loop")
    p.add_argument("--batch", type=int, default=8, help="edits per training step")
    p.add_argument("--n", type=int, default=32, help="facts of the batched edit")
    p.add_argument("--repeat", type=int, default=3, help="repeats of each edit timing (median)")
    p.add_argument("--network", default="counterfact", help="the trained network to time edits with")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 steps, n = 4, one repeat, no MEMIT")
    args = p.parse_args()
    if args.quick:
        args.steps, args.n, args.repeat = 2, 4, 1
    print(machine_line())
    model = load_model()
    for prm in model.parameters():
        prm.requires_grad_(False)
    params = MENDTrainingParams(batch_size=args.batch, steps=args.steps, val_every=10**6, checkpoint_every=10**6)
    layers = params.resolved_layers(model)
    examples = counterfact_examples(split_facts("tune"))
    train, val = examples[: max(2 * args.batch, 16)], examples[-4:]

    # (b) the package
    t = time.perf_counter()
    prep = prepare_edits(model, train, layers)
    prep_s = (time.perf_counter() - t) / len(train)
    prep_val = prepare_edits(model, val, layers)
    t = time.perf_counter()
    run = train_mend(model, train, val, params, progress=False, prepared=(prep, prep_val))
    pkg_step = run.summary["train_seconds"] / args.steps
    # (a) the official-style step, same network shape and batch
    from pmet_lens.editing.mend import MENDNetwork

    net = MENDNetwork(model.cfg.d_mlp, model.cfg.d_model, layers, rank=params.rank, alpha_init=params.alpha_init)
    net.load_state_dict(run.network.state_dict())
    opt = torch.optim.Adam(net.parameters(), lr=params.lr)
    t = time.perf_counter()
    for s in range(args.steps):
        batch = [train[(s * args.batch + i) % len(train)] for i in range(args.batch)]
        official_step(model, net, opt, batch, layers, params.loc_per_edit)
    off_step = (time.perf_counter() - t) / args.steps
    print(f"training step, {args.batch} edits: (a) official-style {off_step:.2f} s, (b) package {pkg_step:.2f} s "
          f"({off_step / pkg_step:.2f}x); (b)'s one-off preparation {prep_s:.2f} s per training edit")
    zs = MENDTrainingParams()
    est = 998 * prep_s + zs.steps * pkg_step * zs.batch_size / args.batch
    print(f"estimated zsRE training with train_mend.py's defaults ({zs.steps} steps of {zs.batch_size}, 998 edits "
          f"prepared (a CounterFact edit, with its 10 neighbourhood prompts, costs more to prepare than a zsRE one), "
          f"validations aside): {est / 60:.0f} min")

    # editing with the shipped network
    hp = MENDHyperParams(network=args.network)
    network, path, _ = network_for(model, hp)
    facts = split_facts("tune", limit=args.n)
    rows = []
    for n in sorted({1, args.n}):
        part = facts[:n]

        def official_edit(part=part):
            seqs = [encode(model, f.text) + target_ids(model, f.target_new)[:-1] for f in part]
            tg = [target_ids(model, f.target_new) for f in part]
            for prm in model.parameters():
                prm.requires_grad_(True)
            factors = official_factors(model, network.layers, seqs, tg)
            for prm in model.parameters():
                prm.requires_grad_(False)
                prm.grad = None
            with torch.no_grad():
                return {l: network.update(l, *factors[l]) for l in network.layers}

        c = median_seconds(official_edit, args.repeat)
        d = median_seconds(lambda part=part: edit(model, part, method="mend", hparams=hp, apply=False, progress=False),
                  args.repeat)
        own = median_seconds(lambda part=part: mend_deltas(model, part, network, hp.batch_size), args.repeat)
        rows.append((n, c, d))
        print(f"MEND edit of {n} fact(s) ({path.name}): (c) official-style {c:.3f} s, (d) package {d:.3f} s "
              f"({c / d:.2f}x); {d / n * 1000:.1f} ms per fact; of (d), the update itself (mend_deltas) {own:.3f} s, "
              f"the rest mostly the weights hash every edit() computes for the result's identity")
    if not args.quick:
        t = time.perf_counter()
        edit(model, facts, method="memit", apply=False, progress=False)
        m = time.perf_counter() - t
        print(f"MEMIT edit of the same {args.n} facts in one call (covariance cached): {m:.1f} s, {m / args.n:.2f} s per "
              f"fact; MEND (d) is {m / rows[-1][2]:.0f}x faster per call")
    print(f"peak RSS of the whole run {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
