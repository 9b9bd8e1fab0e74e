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


def test_curves_table_has_a_row_per_method_and_batch():
    sb = load_analysis("sequential_benchmark")
    rows = [{"method": m, "dataset": "cf", "batch": b, "efficacy_batch": 1.0, "efficacy_first": 1.0 - 0.1 * (b - 1),
             "efficacy_all": 0.95, "perplexity": 46.0 + b, "seconds": 120.0, "delta_norm": 33.0,
             "weight_change_norm": 33.0 * b, "weight_norm": 180.0} for m in ("memit", "alphaedit") for b in (1, 2)]
    md = sb.curves_markdown(pd.DataFrame(rows), baseline_perplexity=45.59)
    assert "| unedited | 0 | – | – | – | 45.59 |" in md
    assert "| alphaedit | 2 | 100.0 | 90.0 | 95.0 | 48.00 | 33.00 | 66.00 | 120 |" in md
    assert md.count("| memit |") == 2 and sb.curves_markdown(pd.DataFrame()) == ""


def test_a_resumed_run_with_other_methods_keeps_the_earlier_methods_curves(tmp_path):
    """--resume --methods pmet after a memit run: the figures show both, memit from its saved curves."""
    import json

    sb = load_analysis("sequential_benchmark")
    (tmp_path / "sessions").mkdir()
    memit = [{"batch": 1, "efficacy_batch": 1.0}, {"batch": 2, "efficacy_batch": 0.9}]
    (tmp_path / "sessions" / "memit_cf_curves.json").write_text(json.dumps(
        {"curves": memit, "efficacy": [{"after": 1, "batch": 1, "case_id": 0, "success": 1.0}]}))
    pmet = ([{"batch": 1, "efficacy_batch": 0.8}], pd.DataFrame([{"after": 1, "batch": 1, "case_id": 0, "success": 0.0}]))
    curves, eff = sb.all_curves(tmp_path, {("pmet", "cf"): pmet}, ["cf"])
    assert list(zip(curves["method"], curves["batch"])) == [("memit", 1), ("memit", 2), ("pmet", 1)]
    assert list(eff["method"]) == ["memit", "pmet"] and list(eff["success"]) == [1.0, 0.0]
    # this run's own curves win over a saved file of the same method
    mine = ([{"batch": 1, "efficacy_batch": 0.5}], pd.DataFrame())
    curves, _ = sb.all_curves(tmp_path, {("memit", "cf"): mine}, ["cf"])
    assert list(curves["efficacy_batch"]) == [0.5]
    assert sb.all_curves(tmp_path, {}, ["zsre"])[0].empty


def test_a_resumed_run_that_skips_zsre_keeps_the_earlier_zsre_settings():
    """--resume --zsre 0 (CounterFact only for new methods): the outputs still describe the earlier zsRE run."""
    from types import SimpleNamespace

    sb = load_analysis("sequential_benchmark")
    args = SimpleNamespace(cases=400, batch=50, zsre=0, zsre_batch=50, gen_every=10, ppl_tokens=8192)
    earlier = {"cases": 400, "batch": 50, "zsre": 200, "zsre_batch": 50, "gen_every": 10, "methods": ["memit"]}
    meta = sb.run_meta(earlier, args, ["pmet"], "m")
    assert (meta["zsre"], meta["zsre_batch"], meta["cases"]) == (200, 50, 400)
    assert meta["methods"] == ["memit", "pmet"]
    assert sb.run_meta({}, args, ["pmet"], "m")["zsre"] == 0  # a first run with --zsre 0 has no zsRE
    args.cases, args.zsre = 0, 100
    meta = sb.run_meta(earlier, args, ["pmet"], "m")
    assert (meta["cases"], meta["batch"], meta["zsre"]) == (400, 50, 100)


def test_paired_table_compares_each_pair_with_both_records_on_the_same_cases(tmp_path):
    sb = load_analysis("sequential_benchmark")
    (tmp_path / "sessions").mkdir()
    cols = sb.PAIRED_METRICS["cf"]
    memit = pd.DataFrame({"case_id": [0, 1, 2, 3], **{c: [1.0, 0.0, 1.0, 0.5] for c in cols}})
    alpha = pd.DataFrame({"case_id": [3, 2, 1, 0], **{c: [1.0, 1.0, 1.0, 1.0] for c in cols}})
    memit.to_csv(sb.records_path(tmp_path, "memit", "cf"), index=False)
    alpha.to_csv(sb.records_path(tmp_path, "alphaedit", "cf"), index=False)
    paired = sb.paired_table(tmp_path)
    assert set(zip(paired["method"], paired["against"])) == {("alphaedit", "memit")}  # pmet has no records
    eff = paired[paired["metric"] == "efficacy_success"].iloc[0]
    assert eff["n"] == 4 and abs(eff["difference"] - (0 + 1 + 0 + 0.5) / 4) < 1e-12
    md = sb.paired_markdown(paired)
    assert "| cf | alphaedit − memit | +37.5 ± " in md and md.count("| cf |") == 1
    assert sb.paired_markdown(pd.DataFrame()) == ""
    assert sb.records_path(tmp_path, "pmet+ns", "zsre").name == "pmet_ns_zsre_records.csv"
