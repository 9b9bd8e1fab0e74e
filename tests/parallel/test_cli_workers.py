"""The command line's --workers / --address / --shards / --resume: checked before the model loads, and
runs on workers that equal the single process's (slow: the real default model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pmet_lens.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--resume", "--limit", "1", "--no-generation"], "--resume needs --out"),
    (["similarity", "--address", "auto", "--limit", "1"], "--address needs --workers"),
    (["trace", "--average", "1", "--workers", "0"], "--workers must be >= 1"),
    (["trace", "--prompt", "The Eiffel Tower is in", "--subject", "Eiffel Tower", "--resume"], "apply to the averaged run"),
])
def test_bad_pool_options_are_clear_errors_before_loading(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def _run(*argv: str, cwd: Path) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", "pmet_lens", *argv], cwd=cwd, capture_output=True, text=True,
                         timeout=900, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_evaluate_on_workers_equals_one_process_and_cleans_its_shards(tmp_path):
    common = ["evaluate", "--limit", "4", "--no-generation"]
    _run(*common, "--out", "one.csv", cwd=tmp_path)
    _run(*common, "--out", "two.csv", "--workers", "2", cwd=tmp_path)
    one, two = pd.read_csv(tmp_path / "one.csv"), pd.read_csv(tmp_path / "two.csv")
    assert list(one.columns) == list(two.columns) and one["case_id"].tolist() == two["case_id"].tolist()
    numeric = one.select_dtypes("number").columns
    assert (one[numeric] - two[numeric]).abs().max().max() <= 1e-5
    assert not (tmp_path / "one.csv.shards").exists() and not (tmp_path / "two.csv.shards").exists()
    # --resume with nothing finished computes everything, then removes its log
    _run(*common, "--out", "three.csv", "--resume", cwd=tmp_path)
    assert pd.read_csv(tmp_path / "three.csv").equals(one)
