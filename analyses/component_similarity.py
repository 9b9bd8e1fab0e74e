"""Reproduce PMET Fig. 2 (MHSA vs FFN hidden-state similarity) on a hooked model.

Runs both variants ("paper" and "logit_lens") over ROME's 1209 known facts and all layers and
writes, under --out (default figures/):
  component_similarity.csv   long table (variant, layer, component, metric, mean, ci_low, ci_high, n)
  component_similarity.html  interactive plotly figure (cosine and Jaccard, MHSA vs FFN, 95% band),
                             loading plotly.js from plotly.min.js beside it (works offline)
  component_similarity.png   static figure for the README
  component_similarity.json  model, number of prompts, k, variant, run time

--replot rebuilds the two figures from the .csv and .json a run wrote in --out, without a model.

Usage: python analyses/component_similarity.py [--model NAME] [--k 50] [--limit N] [--out DIR] [--replot]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="TransformerLens model name (default: embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--k", type=int, default=50, help="top-k size for the Jaccard similarity (paper: 50)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N known facts (default: all 1209)")
    parser.add_argument("--facts", default=None, help="path to a known_1000.json-format file (default: the shipped one)")
    parser.add_argument("--variant", default="both", choices=["both", "paper", "logit_lens"])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--out", default="figures", help="output directory (default: figures/)")
    parser.add_argument("--replot", action="store_true",
                        help="only rebuild the .html and .png figures from the .csv and .json a run wrote in --out")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.replot:
        replot(Path(args.out))
        return 0

    from pmet_lens import load_known_facts, load_model
    from pmet_lens.analysis.similarity import component_similarity

    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    facts = load_known_facts(args.facts, limit=args.limit)
    model = load_model(args.model)
    name = model.cfg.model_name
    start = time.perf_counter()
    df = component_similarity(model, [f.prompt for f in facts], k=args.k, variant=args.variant, batch_size=args.batch_size)
    seconds = time.perf_counter() - start

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "component_similarity.csv", index=False)
    meta = {"model": name, "n_prompts": len(facts), "k": args.k, "variant": args.variant, "seconds": round(seconds, 1)}
    (out / "component_similarity.json").write_text(json.dumps(meta, indent=2))
    write_figures(out, df, meta)

    late = df[(df.layer >= df.layer.max() // 2) & (df.metric == "jaccard")]
    print(f"{name}: {len(facts)} prompts, {df.layer.nunique()} layers, {seconds:.1f} s -> {out}/component_similarity.{{csv,html,png}}")
    print("mean Jaccard in the second half of the layers:")
    print(late.groupby(["variant", "component"])["mean"].mean().round(3).to_string())
    return 0


def write_figures(out: Path, df, meta: dict) -> None:
    """component_similarity.html (plotly.js beside it, :mod:`pmet_lens.viz.html`) and .png of the table ``df``."""
    from pmet_lens.viz.html import write_figure
    from pmet_lens.viz.similarity import similarity_figure, similarity_png

    title = f"{meta['model']}: last-token state before vs after MHSA / FFN ({meta['n_prompts']} known facts, k = {meta['k']})"
    write_figure(similarity_figure(df, title=title), out / "component_similarity.html")
    similarity_png(df, out / "component_similarity.png", title=title)


def replot(out: Path) -> None:
    """Rebuild the figures from the table and settings a run wrote in ``out`` (no model)."""
    import pandas as pd

    table, meta = out / "component_similarity.csv", out / "component_similarity.json"
    missing = [str(p) for p in (table, meta) if not p.is_file()]
    if missing:
        raise SystemExit(f"--replot: {missing} missing; give the --out of a finished run")
    write_figures(out, pd.read_csv(table), json.loads(meta.read_text()))
    print(f"rebuilt {out}/component_similarity.{{html,png}}")


if __name__ == "__main__":
    sys.exit(main())
