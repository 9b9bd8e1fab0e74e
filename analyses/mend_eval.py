"""What a trained MEND network achieves on facts it was not trained on: each fact edited alone (MEND's
protocol) and all of them in one batched edit, beside the unedited model.

``--network counterfact``: the first ``--n`` CounterFact **report** cases, scored with the CounterFact
probability tests (efficacy, paraphrase and neighborhood success, Score; no generation).
``--network zsre``: the first ``--n`` zsRE **eval** records edited towards ``answers[0]`` (the papers'
protocol), scored with the papers' zsRE metric (``evaluate_zsre(metric="official")``). Writes
``<out>/<network>_eval.json`` and prints a small table.

    python analyses/mend_eval.py --network counterfact --n 50
    python analyses/mend_eval.py --network zsre --n 50
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import pandas as pd
import torch

from pmet_lens import load_model
from pmet_lens.core.stats import mean_ci95
from pmet_lens.data import load_zsre
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import edit, preset
from pmet_lens.evaluation import evaluate_counterfact, evaluate_zsre
from pmet_lens.evaluation.tables import harmonic_mean

logger = logging.getLogger("mend_eval")


def summarise(per: pd.DataFrame, columns: list[str]) -> dict[str, float]:
    out: dict[str, float] = {"n": len(per)}
    for c in columns:
        out[c], out[f"{c}_ci95"] = mean_ci95(per[c])
    out["score"] = harmonic_mean([out[c] for c in columns])
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--network", choices=["counterfact", "zsre"], required=True)
    p.add_argument("--n", type=int, default=50, help="facts (the first N report cases / eval records)")
    p.add_argument("--out", default="figures/mend")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stdout)
    model = load_model()
    name = str(model.cfg.model_name)
    hp = preset(name, "mend").with_(network=args.network)
    if args.network == "counterfact":
        records = split_facts("report", limit=args.n)
        columns = ["efficacy_success", "paraphrase_success", "neighborhood_success"]

        def score(recs):
            return evaluate_counterfact(model, recs, generation=False, progress=False)[0]
        facts = records
    else:
        records = load_zsre(limit=args.n, target="answer")
        columns = ["efficacy", "paraphrase", "specificity"]

        def score(recs):
            return evaluate_zsre(model, recs, metric="official", progress=False)[0]
        facts = [r.to_fact() for r in records]
    t0 = time.perf_counter()
    results: dict[str, dict] = {"unedited": summarise(score(records), columns)}
    single = []
    for rec, fact in zip(records, facts):
        with edit(model, [fact], hparams=hp, progress=False):
            single.append(score([rec]))
    results["single edits"] = summarise(pd.concat(single, ignore_index=True), columns)
    with edit(model, facts, hparams=hp, progress=False):
        results[f"one edit of all {len(facts)}"] = summarise(score(records), columns)
    seconds = time.perf_counter() - t0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"network": args.network, "hparams": hp.to_dict(), "n": len(facts), "seconds": seconds,
            "records": "CounterFact report cases" if args.network == "counterfact" else "zsRE eval records, answers[0]",
            "metric": "CounterFact probability tests" if args.network == "counterfact" else "zsRE official"}
    (out / f"{args.network}_eval.json").write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")
    table = pd.DataFrame({k: {c: v[c] for c in [*columns, "score"]} for k, v in results.items()}).T
    print((100 * table).round(1).to_string())
    print(f"{len(facts)} facts, {seconds / 60:.1f} min")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
