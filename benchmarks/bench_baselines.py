"""Time ROME per fact and EMMET per batch beside official-style loops of the same methods, in the same run.

ROME, N facts one after another (each on the model the previous one left):
  (a) official-style, written here with plain hooks as ``rome/compute_v.py`` and ``compute_u.py`` compute
      it: per fact, the target optimisation one fact at a time with every step a full forward of all layers
      and positions and the unembedding at every position (:func:`bench_editing.baseline_targets` with
      ROME's settings); the key read by one forward per context template (the official loop); u = C⁻¹k̄
      with C's Cholesky factor computed once (the official code caches C's inverse); the bare prompt's key
      and output; ΔW = u r written before the next fact;
  (b) the package: ``edit(model, facts, method="rome")``, one call.
EMMET, one batch of N facts:
  (a) official-style targets (one fact at a time, full forwards; as MEMIT's ``compute_z``), then the
      package's keys and EMMET solve (the update is a small share of the time, as in bench_editing.py);
  (b) the package: ``edit(model, facts, method="emmet")``.
Each line gives seconds per fact, the efficacy of both on the same facts, and how far the two total ΔW
are apart (relative Frobenius norm). The covariance is built (and timed) once, then cached.

    python benchmarks/bench_baselines.py --n 16 [--methods rome,emmet]
"""

from __future__ import annotations

import argparse
import resource
import time

import torch
from bench_editing import baseline_targets, success  # benchmarks/ (the script's folder is on sys.path)

from pmet_lens import load_model
from pmet_lens.core.arch import architecture
from pmet_lens.core.tokens import encode, subject_last_position
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, context_prefixes, edit, preset
from pmet_lens.editing.context import context_templates
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.site import edit_site
from pmet_lens.editing.solvers import emmet_solve
from pmet_lens.editing.update import compute_and_apply_updates

from machine import machine_line


def official_rome(model, facts, hp, prefixes, cov) -> dict[str, torch.Tensor]:
    """(a) for ROME: the facts one after another, official-style (module docstring); the weights are left
    edited. Returns {param name: total ΔW}."""
    arch = architecture(model)
    layer = hp.layers[0]
    site = edit_site(arch, "W_out", layer)
    W = site.param(model)
    original = W.detach().clone()
    chol = torch.linalg.cholesky(cov.double())  # once, as the official code caches C's inverse
    out_hook = arch.mlp_out_hook(layer)
    for fact in facts:
        target = baseline_targets(model, fact, hp, prefixes).value("mlp_out")[0].double()
        keys = []
        for tmpl in context_templates(prefixes):  # compute_u: one forward per template
            text = tmpl.replace("{}", fact.prompt)
            pos = subject_last_position(model, text, fact.subject)
            with torch.no_grad():
                _, cache = model.run_with_cache(torch.tensor([encode(model, text.format(fact.subject))]),
                                                names_filter=lambda n: n in (site.key_hook, out_hook))
            keys.append(cache[site.key_hook][0, pos].double())
            if len(keys) == 1:
                k_s, out = keys[0], cache[out_hook][0, pos].double()  # the bare prompt (template "{}")
        u = torch.cholesky_solve(torch.stack(keys).mean(0)[:, None], chol)[:, 0]
        right = (target - out) / (k_s @ u)
        with torch.no_grad():
            W.add_(torch.outer(u, right).to(W.dtype))
    return {site.param_name: (W.detach().double() - original.double())}


def compare(model, facts, names: list[str], run_a, run_b, label: str) -> None:
    """Time (a) and (b) on the same facts from the same weights (``names``: the parameters they edit,
    written back bit for bit after (a)), then print the comparison."""
    params = {n: model.get_parameter(n) for n in names}
    originals = {n: p.detach().clone() for n, p in params.items()}
    t0 = time.perf_counter()
    delta_a = run_a()
    t_a = time.perf_counter() - t0
    ok_a = success(model, facts)
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(originals[n])
    t0 = time.perf_counter()
    with run_b() as result:
        t_b = time.perf_counter() - t0
        ok_b = success(model, facts)
    diff = max(float((result.deltas[n].double() - delta_a[n]).norm() / delta_a[n].norm().clamp_min(1e-30))
               for n in names)
    n = len(facts)
    print(f"{label} (a) official-style: {t_a / n:.2f} s/fact, efficacy {sum(ok_a)}/{n}")
    print(f"{label} (b) package:        {t_b / n:.2f} s/fact, efficacy {sum(ok_b)}/{n}; (a)/(b) {t_a / t_b:.2f}x; "
          f"relative difference of the total ΔW {diff:.2e}; efficacy agreement "
          f"{sum(x == y for x, y in zip(ok_a, ok_b))}/{n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=16, help="tune facts (ROME: edited in sequence; EMMET: one batch)")
    ap.add_argument("--methods", default="rome,emmet")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    model = load_model()
    name = str(model.cfg.model_name)
    facts = split_facts("tune", limit=args.n)
    store = CovarianceStore(progress=False)
    print(machine_line())
    for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
        if method not in ("rome", "emmet"):
            ap.error(f"--methods takes rome and/or emmet, got {method!r}")
        hp = preset(name, method)
        hp = hp.with_(context_prefixes=context_prefixes(model, hp))
        t0 = time.perf_counter()
        site = edit_site(architecture(model), "W_out", hp.layers[-1])
        cov = store.get(model, [site.key_hook], hp.cov_tokens, hp.cov_dtype, hp.cov_seq_len)[site.key_hook]
        print(f"{method}: layers {hp.layers}, N={args.n}, {len(hp.context_prefixes or ())} prefixes; covariance "
              f"(build or cache read) {time.perf_counter() - t0:.1f} s")
        if method == "rome":
            def run_a():
                return official_rome(model, facts, hp, hp.context_prefixes, cov)
        else:
            def run_a():
                targets = torch.cat([baseline_targets(model, f, hp, hp.context_prefixes).value("resid_post") for f in facts])
                covs = store.get(model, [site.key_hook], hp.cov_tokens, hp.cov_dtype, hp.cov_seq_len)
                requests = prepare_requests(model, facts, hp.context_prefixes)
                solve = lambda s, k, r, c: emmet_solve(s, k, r, c, alpha=hp.lam, emmet_lambda=hp.emmet_lambda)  # noqa: E731
                deltas = compute_and_apply_updates(model, requests, {"resid_post": targets}, hp.layers, hp.spread, covs,
                                                   solve=solve)
                return {k: v.double() for k, v in deltas.items()}
        names = [s.param_name for s in hp.editor().sites(model, hp)]
        compare(model, facts, names, run_a, lambda: edit(model, facts, hparams=hp, cov_store=store, progress=False),
                method.upper())
    print(f"peak RSS of the whole run {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 ** 2:.2f} GB")


if __name__ == "__main__":
    main()
