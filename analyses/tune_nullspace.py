"""Choose SmolLM2's AlphaEdit null-space threshold τ and ridge weight α on the TUNE split only.

τ is absolute on E[kkᵀ]'s scale (AlphaEdit's official 2e-2 was set for GPT2-XL / GPT-J /
Llama3-8B), so it does not transfer: this script logs C's spectrum and the null-space dimension per
layer at each τ, then runs a small sequential edit of the first ``--cases`` TUNE cases in batches
of ``--batch`` for each (τ, α) of the grid and reports the CounterFact Score (harmonic mean of
Efficacy, Paraphrase and Neighborhood success, no generation) over all edited cases and the
WikiText-2 perplexity after the last batch.

To keep the search cheap, every fact's target vector is optimised once, on the unedited model, and
reused for every grid point and batch (in a real session batch j's targets are optimised on the model
after batch j − 1; this approximation only affects the search). The rule: the highest Score; among
grid points within ``--tie`` of it, the one nearest AlphaEdit's official (τ = 2e-2, α = 10) in log
distance. ``--write`` stores the winner in the model's ``nullspace`` block of
``pmet_lens/presets/editing.json``: as its plain values for ``--method alphaedit`` (MEMIT's targets),
as its ``pmet`` entry for ``--method pmet+ns`` (PMET's targets).

    python analyses/tune_nullspace.py --cases 24 --batch 8 --out figures/tune_nullspace
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path

import pandas as pd
import torch

from pmet_lens import load_model
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import CovarianceStore, preset
from pmet_lens.editing.hparams import settings_for
from pmet_lens.editing.nullspace import NullspaceStore
from pmet_lens.editing.prepared import prepare_requests
from pmet_lens.editing.session import EditSession
from pmet_lens.editing.targets import optimise_targets
from pmet_lens.evaluation import evaluate_counterfact
from pmet_lens.evaluation.perplexity import perplexity, wikitext_sample
from pmet_lens.parallel import Workers, run_shards

logger = logging.getLogger("tune_nullspace")

OFFICIAL = (2e-2, 10.0)


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def grid_point(model, tau: float | None, alpha: float | None, *, base, batches, values, facts, sample, cov_store,
               ns_store) -> dict:
    """One point of the grid: the batches edited one after another with the given targets (τ = None: the
    base method without the projection), the Score over all edited cases and the perplexity, then every
    batch undone (bit for bit)."""
    hp = base if tau is None else base.with_(nullspace=True, nullspace_threshold=tau, l2=alpha)
    session = EditSession(model, hparams=hp, cov_store=cov_store, nullspace_store=ns_store, progress=False)
    offset = 0
    for batch in batches:
        tg = {s: v[offset:offset + len(batch)] for s, v in values.items()}
        session.edit(batch, targets=tg)
        offset += len(batch)
    summary = evaluate_counterfact(model, facts, generation=False, progress=False)[1]
    row = {"tau": tau, "alpha": alpha, "score": summary["score"], "efficacy": summary["efficacy"],
           "paraphrase": summary["paraphrase"], "neighborhood": summary["neighborhood"],
           "perplexity": perplexity(model, sample), "null_dims": json.dumps(session.null_dims)}
    logger.info("τ=%s α=%s: %s", tau, alpha, {k: v for k, v in row.items() if k != "null_dims"})
    session.undo(to=0)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=24, help="first N TUNE cases")
    parser.add_argument("--batch", type=int, default=8, help="cases per batch")
    parser.add_argument("--method", choices=["alphaedit", "pmet+ns"], default="alphaedit")
    parser.add_argument("--taus", default="0.005,0.01,0.02", help="τ grid")
    parser.add_argument("--alphas", default="1,10", help="α grid")
    parser.add_argument("--tie", type=float, default=0.01, help="Score tie distance")
    parser.add_argument("--ppl-tokens", type=int, default=4096)
    parser.add_argument("--out", default="figures/tune_nullspace")
    parser.add_argument("--write", action="store_true", help="write the winner into presets/editing.json")
    parser.add_argument("--workers", type=int, default=None, metavar="N",
                        help="run the grid points on N Ray workers (pip install 'pmet-lens[ray]'); rows equal one process's")
    parser.add_argument("--address", default=None, help="with --workers: join this Ray cluster (default: a local one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    model = load_model()
    name = str(model.cfg.model_name)
    base = preset(name, "memit" if args.method == "alphaedit" else "pmet")
    facts = split_facts("tune", limit=args.cases)
    batches = [facts[i:i + args.batch] for i in range(0, len(facts), args.batch)]
    cov_store, ns_store = CovarianceStore(), NullspaceStore()
    sample = wikitext_sample(model, n_tokens=args.ppl_tokens)

    # C's spectrum and the null-space dimension per layer at each τ
    probe = EditSession(model, hparams=base, cov_store=cov_store, nullspace_store=ns_store, progress=False)
    spectrum = []
    for hook, cov in probe.covs.items():
        ev = torch.linalg.eigvalsh(cov.double())
        row = {"hook": hook, "d_k": cov.shape[0], "eig_min": float(ev[0]), "eig_median": float(ev.median()),
               "eig_max": float(ev[-1])}
        row.update({f"null_dim_tau={t:g}": int((ev < t).sum()) for t in floats(args.taus)})
        spectrum.append(row)
    pd.DataFrame(spectrum).to_csv(out / "spectrum.csv", index=False)
    prefixes = probe.prefixes

    settings = settings_for(base)
    start = time.perf_counter()
    optimised = optimise_targets(model, prepare_requests(model, facts, prefixes), base.with_(context_prefixes=prefixes),
                                 progress=True)
    target_seconds = time.perf_counter() - start
    values = {s: optimised.value(s).detach() for s in settings.kept_sites}
    grid = [(None, None)] + [(t, a) for t in floats(args.taus) for a in floats(args.alphas)]
    pool = Workers(args.workers, address=args.address) if args.workers else None
    try:  # one shard per grid point; C and P travel inside the stores, computed above
        rows = run_shards(model, grid_point, grid, workers=pool, desc="grid points", progress=True,
                          common={"base": base, "batches": batches, "values": values, "facts": facts, "sample": sample,
                                  "cov_store": cov_store, "ns_store": ns_store})
    finally:
        if pool is not None:
            pool.close()
    df = pd.DataFrame(rows)
    df.to_csv(out / "grid.csv", index=False)
    cand = df[df["tau"].notna()]
    best = cand["score"].max()
    tied = cand[cand["score"] >= best - args.tie].copy()
    tied["dist"] = [abs(math.log(t / OFFICIAL[0])) + abs(math.log(a / OFFICIAL[1])) for t, a in zip(tied["tau"], tied["alpha"])]
    win = tied.sort_values(["dist", "score"], ascending=[True, False]).iloc[0]
    choice = {"nullspace_threshold": float(win["tau"]), "l2": float(win["alpha"])}
    info = {"choice": choice, "rule": f"best Score, ties within {args.tie} -> nearest to the official (2e-2, 10)",
            "cases": args.cases, "batch": args.batch, "method": args.method, "target_seconds": target_seconds,
            "seconds": time.perf_counter() - t0, "prefixes": list(prefixes)}
    (out / "choice.json").write_text(json.dumps(info, indent=1))
    logger.info("choice: %s", info)
    if args.write:
        path = Path(__file__).resolve().parents[1] / "pmet_lens" / "presets" / "editing.json"
        table = json.loads(path.read_text())
        block = table[name].setdefault("nullspace", {})
        if args.method == "alphaedit":  # MEMIT's targets: the block's plain values
            block.update(choice)
        else:  # PMET's targets: the block's "pmet" entry (pmet_lens.editing.hparams.nullspace_values)
            block["pmet"] = choice
        path.write_text(json.dumps(table, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
