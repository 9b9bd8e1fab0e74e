"""The two zsRE metrics side by side on the unedited default model, and where they differ.

Scores the shipped zsRE subset (or its first ``--limit`` records) with
``evaluate_zsre(metric="teacher_forced")`` and ``evaluate_zsre(metric="official")`` and sorts every
(record, test) pair into the official procedure's quirks (``docs/zsre-metrics.md``):

* ``double_space``: the answer already starts with a space, so the official ids are those of ``"  " + ...``;
* ``non_ascii``: a token of the answer does not survive ``decode`` then re-tokenisation (a character
  split over byte-level tokens decodes to U+FFFD), so its expected id differs from the token;
* ``retokenised_prefix``: none of the above, yet some decoded prefix ``prompt + decode(t_<i)``
  re-tokenises to other ids than ``prompt ⊕ t_<i``;
* ``same``: the official rows are exactly the teacher-forced positions.

Writes ``--out``/zsre_metrics_per_record.csv and prints the summaries and the counts.

    python analyses/zsre_metrics.py --out figures
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time
from pathlib import Path

import pandas as pd

from pmet_lens import load_model, load_zsre
from pmet_lens.core.tokens import encode, target_ids
from pmet_lens.evaluation import ZSRE_TESTS, evaluate_zsre, format_table
from pmet_lens.evaluation.zsre import official_rows


def quirk(model, prompt: str, answer: str) -> str:
    """Which quirk makes the official rows of (prompt, answer) differ from teacher forcing, if any."""
    if answer.startswith(" "):
        return "double_space"
    rows = official_rows(model, prompt, answer)
    forced = target_ids(model, answer)
    if [e for _, e in rows] != forced:
        return "non_ascii"
    base = encode(model, prompt)
    if any(c != base + forced[:i] for i, (c, _) in enumerate(rows)):
        return "retokenised_prefix"
    return "same"


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit", type=int, default=None, help="first N records of the shipped subset (default: all)")
    parser.add_argument("--out", default="figures", help="output directory")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    model = load_model()
    records = load_zsre(limit=args.limit)
    summaries, per = {}, {}
    for metric in ("teacher_forced", "official"):
        t0 = time.perf_counter()
        per[metric], summaries[metric] = evaluate_zsre(model, records, metric=metric, progress=False)
        print(f"{metric}: {time.perf_counter() - t0:.0f} s")
    print(f"SmolLM2-135M-Instruct, unedited, {len(records)} records; CPU: {cpu_name()}")
    print(format_table(summaries).to_string())

    rows = []
    for i, r in enumerate(records):
        tests = {"efficacy": (r.src, r.target_new), "paraphrase": (r.rephrase, r.target_new),
                 "specificity": (r.loc + "?", r.loc_ans)}
        for test in ZSRE_TESTS:
            prompt, answer = tests[test]
            rows.append({"case_id": r.case_id, "test": test, "answer": answer, "quirk": quirk(model, prompt, answer),
                         "teacher_forced": per["teacher_forced"][test][i], "official": per["official"][test][i]})
    df = pd.DataFrame(rows)
    df["differs"] = (df["teacher_forced"] - df["official"]).abs() > 1e-6  # teacher-forced fractions are float32
    df.to_csv(out / "zsre_metrics_per_record.csv", index=False)
    counts = df.groupby(["test", "quirk"]).agg(pairs=("differs", "size"), scores_differ=("differs", "sum"),
                                              teacher_forced=("teacher_forced", "mean"), official=("official", "mean"))
    print(counts.round(3).to_string())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
