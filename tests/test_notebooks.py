"""The notebooks: each source notebooks/NN_name.py (jupytext percent format) executes top to bottom without
error, and the committed notebooks/NN_name.ipynb (built by scripts/build_notebooks.py, outputs included) holds
exactly its source's cells.

The test run executes each notebook with small settings: a cell with these values is inserted after the
notebook's ``parameters`` cell (papermill's convention), as a user would set them; the committed notebooks
keep their full settings. The kernels inherit the suite's cache directory (tests/conftest.py), so the
editing notebooks use the suite's covariance statistics, not the user's cache."""

from __future__ import annotations

from pathlib import Path

import jupytext
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REAL_COV_TOKENS

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
SOURCES = sorted(NOTEBOOKS.glob("[0-9][0-9]_*.py"))
TEST_PARAMETERS = {
    "01_component_similarity": {"N_SAMPLE": 4},
    "03_editing": {"N_FACTS": 2, "HPARAMS": {"cov_tokens": REAL_COV_TOKENS}},
    "04_evaluation": {"N_CASES": 2, "N_ZSRE": 4, "GEN_LENGTH": 40, "HPARAMS": {"cov_tokens": REAL_COV_TOKENS}},
}


def _with_test_parameters(nb: nbformat.NotebookNode, name: str) -> nbformat.NotebookNode:
    """``nb`` with a cell setting ``TEST_PARAMETERS[name]`` inserted after its ``parameters`` cell; each name
    set must be one the parameters cell defines (a renamed parameter fails here, not silently)."""
    values = TEST_PARAMETERS.get(name)
    if not values:
        return nb
    (index,) = [i for i, c in enumerate(nb.cells) if "parameters" in c.get("metadata", {}).get("tags", [])]
    defined = {line.split("=")[0].strip() for line in nb.cells[index].source.splitlines() if "=" in line}
    assert set(values) <= defined, f"{name}: {sorted(set(values) - defined)} not in its parameters cell"
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items()),
                                     metadata={"tags": ["injected-parameters"]})
    nb.cells.insert(index + 1, cell)
    return nb


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
    nb = _with_test_parameters(jupytext.read(source), source.stem)
    # a cell that raises fails the test here (CellExecutionError)
    NotebookClient(nb, timeout=1200, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    assert all(c.get("execution_count") for c in nb.cells if c.cell_type == "code")
