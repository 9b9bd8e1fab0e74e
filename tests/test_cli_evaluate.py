"""``pmet-lens evaluate`` on a tiny checkpoint, in-process through ``main(argv)``: zsRE with either metric and
the CounterFact split; what it writes is the library's evaluation of the same records."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from pmet_lens import load_model
from pmet_lens.data import load_zsre
from pmet_lens.data.splits import split_facts
from pmet_lens.evaluation import evaluate_counterfact, evaluate_zsre


@pytest.fixture(scope="module")
def tiny(tiny_llama_checkpoint):
    return load_model(tiny_llama_checkpoint, device="cpu")


@pytest.mark.parametrize("metric", ["teacher_forced", "official"])
def test_evaluate_zsre(metric, tiny, tiny_llama_checkpoint, tmp_path, monkeypatch, cli_main):
    monkeypatch.chdir(tmp_path)
    args = ["evaluate", "--model", str(tiny_llama_checkpoint), "--dataset", "zsre", "--limit", "3", "--out", "z.csv",
            "--summary", "z.json"]
    if metric != "teacher_forced":
        args += ["--zsre-metric", metric]  # teacher_forced is the default
    code, stdout, err = cli_main(*args)
    assert code == 0, err
    rows, summary = pd.read_csv(tmp_path / "z.csv"), json.loads((tmp_path / "z.json").read_text())
    expected_rows, expected = evaluate_zsre(tiny, load_zsre(limit=3), metric=metric, progress=False)
    assert summary["metric"] == metric == expected["metric"] and summary["n_records"] == 3
    assert set(rows["metric"]) == {metric}
    assert rows["case_id"].tolist() == expected_rows["case_id"].tolist()
    for key in ("efficacy", "paraphrase", "specificity"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-12), key
        assert rows[key].tolist() == pytest.approx(expected_rows[key].tolist(), abs=1e-12), key
    assert "wrote z.csv" in stdout


def test_evaluate_a_split(tiny, tiny_llama_checkpoint, tmp_path, monkeypatch, cli_main):
    """`--split tune` evaluates the tune part of the shipped split, in its order (not the first records)."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main("evaluate", "--model", str(tiny_llama_checkpoint), "--split", "tune", "--limit", "2",
                            "--no-generation", "--out", "cf.csv", "--summary", "cf.json")
    assert code == 0, err
    facts = split_facts("tune", limit=2)
    rows, summary = pd.read_csv(tmp_path / "cf.csv"), json.loads((tmp_path / "cf.json").read_text())
    assert rows["case_id"].tolist() == [f.case_id for f in facts]
    assert [f.case_id for f in facts] != [f.case_id for f in split_facts("report", limit=2)]
    _, expected = evaluate_counterfact(tiny, facts, generation=False, progress=False)
    for key in ("efficacy", "paraphrase", "neighborhood", "efficacy_magnitude", "neighborhood_magnitude"):
        assert summary[key] == pytest.approx(expected[key], rel=1e-9, abs=1e-15), key
