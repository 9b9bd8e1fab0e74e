"""analyses/compare_runs.py: the change of every metric between a committed run and the working tree."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "analyses" / "compare_runs.py"


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_changes_per_editor_and_metric(tmp_path):
    repo, d = tmp_path, tmp_path / "run"
    d.mkdir()
    _git(repo, "init", "-q")
    cf = {"meta": {}, "summaries": {"MEMIT": {"score": 0.80, "efficacy": 0.90}}}
    (d / "edit_benchmark_summaries.json").write_text(json.dumps(cf))
    # an old zsRE file: one summary per editor, the teacher-forced metric
    (d / "edit_benchmark_zsre_summaries.json").write_text(json.dumps({"MEMIT": {"efficacy": 0.70}}))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-qm", "before")
    cf["summaries"]["MEMIT"].update(score=0.825, efficacy=0.875)
    (d / "edit_benchmark_summaries.json").write_text(json.dumps(cf))
    (d / "edit_benchmark_zsre_summaries.json").write_text(json.dumps(
        {"MEMIT": {"official": {"efficacy": 0.60}, "teacher_forced": {"efficacy": 0.75}}}))
    out = subprocess.run([sys.executable, str(SCRIPT), "run", "--repo", str(repo), "--out", str(tmp_path / "t.md")],
                         capture_output=True, text=True, check=True).stdout
    assert "| MEMIT | score | 80.0 | 82.5 | +2.5 |" in out
    assert "| MEMIT | efficacy | 90.0 | 87.5 | -2.5 |" in out
    assert "| MEMIT | teacher_forced efficacy | 70.0 | 75.0 | +5.0 |" in out
    assert "| MEMIT | official efficacy |  | 60.0 |  |" in out  # no "before" under the new metric
    assert (tmp_path / "t.md").read_text().strip() == out.strip()


def test_missing_run_is_an_error(tmp_path):
    _git(tmp_path, "init", "-q")
    out = subprocess.run([sys.executable, str(SCRIPT), "nowhere", "--repo", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "no edit_benchmark_summaries.json" in out.stderr
