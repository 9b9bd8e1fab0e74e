"""How far the numbers of an edit benchmark moved between two runs.

Reads the summaries that ``analyses/edit_benchmark.py`` writes into an output directory
(``edit_benchmark_summaries.json`` for CounterFact, ``edit_benchmark_zsre_summaries.json`` for zsRE)
twice: as committed at a git revision (``--before``, default HEAD) and as they are now in the working
tree (or at ``--after REV``), and prints one Markdown table per dataset: each editor's metrics x100
before, after, and the change. zsRE summaries written before the two metrics existed hold the
teacher-forced metric only; they are compared with the new run's teacher-forced rows, and the
official metric is shown without a "before".

Usage: python3 analyses/compare_runs.py figures/edit_benchmark_256 [--before REV] [--after REV] [--out FILE] [--repo DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CF_METRICS = ("score", "efficacy", "paraphrase", "neighborhood", "fluency", "consistency_proxy")
ZSRE_METRICS = ("score", "efficacy", "paraphrase", "specificity")


def read_json(path: str, rev: str | None, root: Path = ROOT) -> Any:
    """A JSON file of the repository ``root`` at ``rev`` (``None``: the working tree); ``None`` if absent."""
    if rev is None:
        file = root / path
        return json.loads(file.read_text()) if file.is_file() else None
    out = subprocess.run(["git", "show", f"{rev}:{path}"], cwd=root, capture_output=True, text=True)
    return json.loads(out.stdout) if out.returncode == 0 else None


def by_metric(zsre: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """``{editor: {zsRE metric: summary}}``; a summary without metrics counts as teacher-forced."""
    out = {}
    for editor, s in zsre.items():
        out[editor] = {m: v for m, v in s.items() if isinstance(v, dict)} if "official" in s else {"teacher_forced": s}
    return out


def fmt(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def table(rows: list[tuple[str, str, float | None, float | None]], title: str) -> list[str]:
    lines = [f"### {title}", "", "| editor | metric | before | after | change |", "| --- | --- | --- | --- | --- |"]
    for editor, metric, a, b in rows:
        change = "" if a is None or b is None else f"{100 * (b - a):+.1f}"
        lines.append(f"| {editor} | {metric} | {fmt(a)} | {fmt(b)} | {change} |")
    return lines + [""]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dir", help="benchmark output directory, relative to the repository root")
    parser.add_argument("--before", default="HEAD", help="git revision of the earlier run (default HEAD)")
    parser.add_argument("--after", default=None, help="git revision of the later run (default: the working tree)")
    parser.add_argument("--out", default=None, help="also write the tables to this Markdown file")
    parser.add_argument("--repo", default=str(ROOT), help="repository root (default: this script's)")
    args = parser.parse_args()
    root = Path(args.repo)
    d = args.dir.rstrip("/")
    lines = [f"Edit benchmark `{d}`: {args.before} -> {args.after or 'working tree'} (x100)", ""]
    cf = [read_json(f"{d}/edit_benchmark_summaries.json", rev, root) for rev in (args.before, args.after)]
    if cf[0] is None or cf[1] is None:
        print(f"no edit_benchmark_summaries.json in {d} at both revisions", file=sys.stderr)
        return 1
    before, after = cf[0]["summaries"], cf[1]["summaries"]
    rows = [(e, m, before.get(e, {}).get(m), s.get(m)) for e, s in after.items() for m in CF_METRICS]
    lines += table(rows, "CounterFact (Tables 1 and 3)")
    zs = [read_json(f"{d}/edit_benchmark_zsre_summaries.json", rev, root) for rev in (args.before, args.after)]
    if zs[1] is not None:
        zb, za = by_metric(zs[0] or {}), by_metric(zs[1])
        rows = [(e, f"{metric} {m}", zb.get(e, {}).get(metric, {}).get(m), s.get(m))
                for e, per in za.items() for metric, s in sorted(per.items()) for m in ZSRE_METRICS]
        lines += table(rows, "zsRE (Table 2)")
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
