"""Check the main job's table against the committed one: after ``python3 analyses/component_similarity.py``
(the README's main job), ``figures/component_similarity.csv`` must hold the same rows as the version in
git's HEAD, with every number equal to within --tol (default 1e-4). CI runs this after the main job, so a
change of behaviour in the Fig. 2 path fails CI instead of rewriting the figure silently.

The tolerance is what holds on both CPU kinds CI runs on: the committed table was made on an AMD EPYC
(AVX2), and the same code (fcd5016 as well as later) gives a largest difference of 1.42e-5 on the Intel
Xeon (AVX-512); on the AMD EPYC it reproduced within 4.1e-7. The means are of cosines and Jaccard
indices in [0, 1] shown to three decimals, so 1e-4 still fails any change of behaviour a reader could see.

Usage: python3 scripts/check_main_job.py [--csv figures/component_similarity.csv] [--tol 1e-4]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import pandas as pd

KEYS = ["variant", "layer", "component", "metric"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--csv", default="figures/component_similarity.csv")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args()
    root = Path(__file__).resolve().parent.parent
    path = root / args.csv
    committed = subprocess.run(["git", "show", f"HEAD:{args.csv}"], cwd=root, capture_output=True, text=True, check=True).stdout
    old = pd.read_csv(io.StringIO(committed)).sort_values(KEYS).reset_index(drop=True)
    new = pd.read_csv(path).sort_values(KEYS).reset_index(drop=True)
    if list(old.columns) != list(new.columns) or not old[KEYS].equals(new[KEYS]):
        print(f"{args.csv}: the rows or columns differ from the committed table", file=sys.stderr)
        return 1
    numeric = [c for c in old.columns if c not in KEYS]
    worst = float((old[numeric] - new[numeric]).abs().max().max())
    print(f"{args.csv}: {len(new)} rows, largest difference from the committed table {worst:.2e} (tolerance {args.tol:g})")
    return 0 if worst <= args.tol else 1


if __name__ == "__main__":
    sys.exit(main())
