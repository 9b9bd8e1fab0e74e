"""analyses/sequential_benchmark.py: zsRE under both metrics, the official one beside AlphaEdit's table."""

from __future__ import annotations

import pandas as pd

from conftest import load_analysis


def _summary(metric: str | None, eff: float) -> dict:
    s = {"efficacy": eff, "efficacy_ci95": 0.01, "paraphrase": eff, "specificity": 0.2, "score": eff}
    return s if metric is None else {**s, "metric": metric}


def _summaries() -> dict:
    return {"meta": {"cases": 0, "batch": 50, "zsre": 4, "zsre_batch": 2, "gen_every": 10},
            "cf": {}, "null_dims": {},
            "zsre": {"unedited": _summary("official", 0.19), "memit": _summary("official", 0.70)},
            "zsre_teacher_forced": {"unedited": _summary("teacher_forced", 0.20), "memit": _summary("teacher_forced", 0.75)}}


def test_resume_drops_zsre_results_without_their_metric_label():
    sb = load_analysis("sequential_benchmark")
    summaries = _summaries()
    summaries["zsre"]["alphaedit"] = _summary(None, 0.9)  # saved before the official metric existed
    summaries["zsre_teacher_forced"]["pmet"] = _summary("official", 0.5)  # under the wrong section
    assert sorted(sb.drop_unlabelled_zsre(summaries)) == ["alphaedit", "pmet"]
    assert set(summaries["zsre"]) == set(summaries["zsre_teacher_forced"]) == {"unedited", "memit"}
    assert sb.drop_unlabelled_zsre(summaries) == []


def test_markdown_sets_only_the_official_metric_beside_the_paper():
    sb = load_analysis("sequential_benchmark")
    md = sb.markdown_tables(_summaries())
    official, teacher_forced = md.split("zsRE, official metric")[1].split("zsRE, teacher-forced metric")
    assert "| SmolLM2 memit | official | 70.0 ± 1.0 |" in official
    assert "LLaMA3-8B AlphaEdit (paper) | official | 94.5" in official
    assert "| SmolLM2 memit | teacher_forced | 75.0 ± 1.0 |" in teacher_forced
    assert "(paper)" not in teacher_forced


def test_outputs_write_one_zsre_table_per_metric(tmp_path):
    sb = load_analysis("sequential_benchmark")
    sb.write_outputs(tmp_path, _summaries(), pd.DataFrame(), pd.DataFrame())
    official = pd.read_csv(tmp_path / "sequential_zsre.csv", index_col=0)
    teacher_forced = pd.read_csv(tmp_path / "sequential_zsre_teacher_forced.csv", index_col=0)
    assert list(official.index) == list(teacher_forced.index) == ["unedited", "memit"]
    assert official.loc["memit"].iloc[0] != teacher_forced.loc["memit"].iloc[0]
    assert (tmp_path / "sequential_tables.md").read_text().count("(paper)") > 0
