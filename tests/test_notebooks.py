"""The notebooks: each source notebooks/NN_name.py (jupytext percent format) executes top to bottom without
error, and the committed notebooks/NN_name.ipynb (built by scripts/build_notebooks.py, outputs included) holds
exactly its source's cells."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))


def _cells(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


def test_there_are_notebooks():
    assert len(SOURCES) >= 4


def test_every_ipynb_has_a_source():
    orphans = [p.name for p in NOTEBOOKS.glob("*.ipynb") if not p.with_suffix(".py").exists()]
    assert not orphans, f"{orphans}: notebooks are built from notebooks/NN_name.py; add the source or remove them"


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_ipynb_matches_its_source(source):
    committed = source.with_suffix(".ipynb")
    assert committed.exists(), f"run: python3 scripts/build_notebooks.py {source.stem}"
    assert _cells(nbformat.read(committed, as_version=4)) == _cells(jupytext.read(source)), (
        f"{committed.name} is stale; rebuild it: python3 scripts/build_notebooks.py {source.stem}")


@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_committed_ipynb_has_outputs(source):
    nb = nbformat.read(source.with_suffix(".ipynb"), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.get("execution_count") for c in code), f"{source.stem}.ipynb was not executed"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors


@pytest.mark.slow
@pytest.mark.parametrize("source", SOURCES, ids=[p.stem for p in SOURCES])
def test_notebook_executes(source):
    nb = jupytext.read(source)
    # a cell that raises fails the test here (CellExecutionError)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
