"""Build the notebooks: notebooks/NN_name.py (jupytext percent format, the source) -> notebooks/NN_name.ipynb,
executed in notebooks/ so that GitHub shows the outputs.

    python3 scripts/build_notebooks.py                  # every notebook
    python3 scripts/build_notebooks.py 03_editing       # one, by name

tests/test_notebooks.py checks that each committed .ipynb has its source's cells and that every source executes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"


def sources() -> list[Path]:
    """The notebook sources, notebooks/NN_*.py, in order."""
    return sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def build(source: Path, timeout: int = 1200) -> nbformat.NotebookNode:
    """The notebook of ``source``, executed top to bottom with notebooks/ as its working directory."""
    nb = jupytext.read(source)
    NotebookClient(nb, timeout=timeout, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="notebook names (default: all), e.g. 03_editing")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds one cell may take (default 1200)")
    args = parser.parse_args()
    chosen = [s for s in sources() if not args.names or s.stem in args.names]
    if args.names and len(chosen) != len(args.names):
        parser.error(f"unknown notebook name(s); the sources are {[s.stem for s in sources()]}")
    for source in chosen:
        start = time.perf_counter()
        nb = build(source, timeout=args.timeout)
        target = source.with_suffix(".ipynb")
        nbformat.write(nb, target)
        print(f"wrote {target.relative_to(NOTEBOOKS.parent)} ({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
