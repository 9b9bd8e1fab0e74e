"""Per-file test times from pytest's JUnit XML (``pytest --junitxml=FILE``), one run or two side by side.

    python3 scripts/test_times.py before.xml                  # seconds per test file, slowest first
    python3 scripts/test_times.py before.xml after.xml        # before / after per file, as a Markdown table

A test's time in the XML is its setup, call and teardown together, so a module- or session-scoped
fixture is counted in the first test that uses it. The totals are the sums over the tests, not the
wall time of the run (collection and start-up are not in the XML).
"""

from __future__ import annotations

import argparse
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _file_of(classname: str) -> str:
    """``tests.editing.test_update`` (or ``tests.test_x.TestClass``) -> ``tests/editing/test_update.py``."""
    parts = classname.split(".")
    for n in range(len(parts), 0, -1):
        candidate = "/".join(parts[:n]) + ".py"
        if (ROOT / candidate).is_file():
            return candidate
    return "/".join(parts) + ".py"


def per_file(path: str | Path) -> tuple[dict[str, float], dict[str, int]]:
    """Seconds and test counts per test file of one JUnit XML report."""
    seconds: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for case in ET.parse(path).getroot().iter("testcase"):
        name = _file_of(case.get("classname", ""))
        seconds[name] += float(case.get("time", 0.0))
        counts[name] += 1
    return dict(seconds), dict(counts)


def _minutes(s: float) -> str:
    return f"{int(s // 60)}:{s % 60:04.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("before", help="JUnit XML of the first run")
    parser.add_argument("after", nargs="?", help="JUnit XML of the second run (optional)")
    parser.add_argument("--top", type=int, default=0, help="only the N slowest files of the first run (0: all)")
    args = parser.parse_args()
    before, n_before = per_file(args.before)
    if args.after is None:
        rows = sorted(before.items(), key=lambda kv: -kv[1])
        rows = rows[: args.top] if args.top else rows
        print("| file | tests | seconds |\n| --- | ---: | ---: |")
        for name, s in rows:
            print(f"| `{name}` | {n_before[name]} | {s:.1f} |")
        print(f"| total ({sum(n_before.values())} tests) | | {sum(before.values()):.1f} ({_minutes(sum(before.values()))}) |")
        return
    after, n_after = per_file(args.after)
    names = sorted(set(before) | set(after), key=lambda n: -max(before.get(n, 0.0), after.get(n, 0.0)))
    names = names[: args.top] if args.top else names
    print("| file | tests before | tests after | before (s) | after (s) | change (s) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in names:
        b, a = before.get(name), after.get(name)
        change = f"{(a or 0.0) - (b or 0.0):+.1f}"
        print(f"| `{name}` | {n_before.get(name, 0)} | {n_after.get(name, 0)} | "
              f"{'' if b is None else f'{b:.1f}'} | {'' if a is None else f'{a:.1f}'} | {change} |")
    tb, ta = sum(before.values()), sum(after.values())
    print(f"| total | {sum(n_before.values())} | {sum(n_after.values())} | {tb:.1f} ({_minutes(tb)}) | "
          f"{ta:.1f} ({_minutes(ta)}) | {ta - tb:+.1f} |")


if __name__ == "__main__":
    main()
