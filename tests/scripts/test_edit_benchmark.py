"""analyses/edit_benchmark.py: --resume recomputes results made with other presets."""

from __future__ import annotations

import torch

from conftest import load_analysis
from pmet_lens.editing import PMETHyperParams, preset

FACTS = [{"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English",
          "target_true": "French"},
         {"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome", "target_true": "Paris"},
         {"subject": "Barack Obama", "prompt": "{} was born in", "target_new": "Paris", "target_true": "Hawaii"}]
"""Three facts for the saved-targets tests on tiny models (a saved run on the first two, a run on all three)."""


def tiny_pmet_hparams() -> PMETHyperParams:
    """PMET settings that a tiny random model optimises in a moment (4 steps, one context prefix)."""
    return PMETHyperParams(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=4, lam=0.5,
                           context_prefixes=("Once upon a time",))


def test_resume_drops_results_of_changed_presets():
    eb = load_analysis("edit_benchmark")
    current = {m: preset("SmolLM2-135M-Instruct", m).to_dict() for m in ("pmet", "memit")}
    assert eb.stale_editors(current, current) == set()
    pmet_changed = {**current, "pmet": {**current["pmet"], "clamp_norm_factor": 0.75}}
    assert eb.stale_editors(pmet_changed, current) == {"PMET", *eb.ABLATIONS}
    memit_changed = {**current, "memit": {**current["memit"], "lam": 1.0}}
    assert eb.stale_editors(memit_changed, current) == {"MEMIT"}
    assert eb.stale_editors({}, current) == {"MEMIT", "PMET", *eb.ABLATIONS}
    # τ and α without the projection change no edit: a preset's new null-space block leaves results valid
    alpha_only = {**current, "pmet": {**current["pmet"], "l2": 123.0, "nullspace_threshold": 0.5}}
    assert eb.stale_editors(alpha_only, current) == set()
    projected = {m: preset("SmolLM2-135M-Instruct", m).with_(nullspace=True).to_dict() for m in ("pmet", "memit")}
    assert eb.stale_editors({**projected, "pmet": {**projected["pmet"], "l2": 123.0}}, projected) == {"PMET", *eb.ABLATIONS}


def test_only_the_no_attn_delta_ablation_reoptimises():
    """Even spread and + W_O reuse PMET's targets (on CounterFact and zsRE); w/o δ_a optimises anew."""
    eb = load_analysis("edit_benchmark")
    reused = {abl: eb.reuses_pmet_targets(change) for abl, change in eb.ABLATIONS.items()}
    assert reused == {"PMET w/o δ_a": False, "PMET + W_O^MHSA": True, "PMET even spread": True}


def test_resume_reuses_saved_targets_only_for_the_same_facts_and_target_settings(tmp_path):
    """An interrupted run's saved edit gives its targets back to --resume, bit for bit; an edit made for
    other facts or other hyper-parameters is not reused."""
    from conftest import make_tiny_model
    from pmet_lens.editing import CovarianceStore, edit

    eb = load_analysis("edit_benchmark")
    model = make_tiny_model(parallel=False, norm="RMS", gated=True)
    facts = FACTS[:2]
    hp = tiny_pmet_hparams()
    store = CovarianceStore(tmp_path / "cov", progress=False)
    result = edit(model, facts, hparams=hp, cov_store=store, apply=False, progress=False)
    path = result.save(tmp_path / "edits" / "cf_pmet.safetensors")

    found = eb.prefix_targets(path, model, facts, hp)
    assert found is not None and found[1] == len(facts) and set(found[0]) == set(result.targets)
    assert all(torch.equal(found[0][s], result.targets[s]) for s in found[0])
    assert eb.prefix_targets(path, model, facts[::-1], hp) is None
    assert eb.prefix_targets(path, model, facts, hp.with_(steps=5)) is None
    # λ and C enter only the solve: targets saved under another λ or corpus size are reused as they are
    again = eb.prefix_targets(path, model, facts, hp.with_(lam=5.0, cov_tokens=3000))
    assert again is not None and all(torch.equal(again[0][s], result.targets[s]) for s in again[0])
    assert eb.prefix_targets(tmp_path / "edits" / "missing.safetensors", model, facts, hp) is None


def test_targets_from_a_run_on_fewer_cases_are_the_first_rows_of_this_runs(tmp_path):
    """--targets-from: a saved edit of the first facts gives back their targets (k of them) for a run on
    more facts, and a run on more facts gives a run on fewer its first rows; facts that do not begin
    with (or begin) the saved ones are refused. Reuse is sound because each fact's targets are
    optimised independently: the saved targets followed by the rest's equal one edit of all facts."""
    from conftest import make_tiny_model
    from pmet_lens.editing import CovarianceStore, edit

    eb = load_analysis("edit_benchmark")
    model = make_tiny_model(parallel=False, norm="RMS", gated=True)
    facts = FACTS
    hp = tiny_pmet_hparams()
    store = CovarianceStore(tmp_path / "cov", progress=False)
    first = edit(model, facts[:2], hparams=hp, cov_store=store, apply=False, progress=False)
    path = first.save(tmp_path / "edits" / "cf_pmet.safetensors")

    found = eb.prefix_targets(path, model, facts, hp)
    assert found is not None and found[1] == 2
    assert all(torch.equal(found[0][s], first.targets[s]) for s in first.targets)
    fewer = eb.prefix_targets(path, model, facts[:1], hp)
    assert fewer is not None and fewer[1] == 1
    assert all(torch.equal(fewer[0][s], first.targets[s][:1]) for s in first.targets)
    assert eb.prefix_targets(path, model, facts[1:], hp) is None
    assert eb.prefix_targets(path, model, facts, hp.with_(steps=5)) is None

    rest = edit(model, facts[2:], hparams=hp, cov_store=store, apply=False, progress=False)
    whole = edit(model, facts, hparams=hp, cov_store=store, apply=False, progress=False)
    for s in whole.targets:
        joined = torch.cat([found[0][s], rest.targets[s]])
        torch.testing.assert_close(joined, whole.targets[s], rtol=1e-5, atol=1e-5)


def test_target_bank_gives_first_rows_and_optimises_only_the_missing_ones(tmp_path):
    """The run's target bank: a saved edit of the first facts serves a request for fewer facts with its
    first rows and no optimisation, one for more with only the others optimised (and then saved by the
    next full edit); a sequential editor's targets are never extended (they depend on the earlier edits)."""
    from conftest import make_tiny_model
    from pmet_lens.editing import AlphaEditHyperParams, CovarianceStore, MEMITHyperParams, ROMEHyperParams, edit

    eb = load_analysis("edit_benchmark")
    model = make_tiny_model(parallel=True, norm="LN", gated=False)
    facts = FACTS
    hp = tiny_pmet_hparams()
    store = CovarianceStore(tmp_path / "cov", progress=False)
    calls: list[int] = []

    def optimise(records, hparams, name):
        calls.append(len(records))
        return edit(model, records, hparams=hparams, cov_store=store, apply=False, progress=False)

    edits = tmp_path / "edits"
    first = edit(model, facts[:2], hparams=hp, cov_store=store, apply=False, progress=False)
    first.save(edits / "cf_pmet.safetensors")
    bank = eb.TargetBank(model, optimise, edits, [edits])
    one = bank.get("pmet", facts[:1], "cf", hp)
    assert calls == [] and all(torch.equal(one[s], first.targets[s][:1]) for s in first.targets)
    assert bank.save_path("pmet", "cf") is None  # they are in edits/ already
    whole = bank.get("pmet", facts, "cf", hp)
    assert calls == [1] and all(v.shape[0] == 3 for v in whole.values())
    assert all(torch.equal(whole[s][:2], first.targets[s]) for s in first.targets)
    assert bank.save_path("pmet", "cf") == edits / "cf_pmet.safetensors"  # the third is not saved yet
    direct = edit(model, facts, hparams=hp, cov_store=store, apply=False, progress=False)
    for s in direct.targets:
        torch.testing.assert_close(whole[s], direct.targets[s], rtol=1e-5, atol=1e-5)
    bank.put("pmet", "cf", whole, hp)
    assert bank.save_path("pmet", "cf") is None
    assert bank.get("memit", facts, "cf", hp) is None and calls == [1]  # nothing saved for this stem
    fresh = eb.TargetBank(model, optimise, tmp_path / "other", [])
    made = fresh.of("pmet", facts[:1], "cf", hp)
    assert calls == [1, 1] and (tmp_path / "other" / "cf_pmet.safetensors").is_file()
    assert all(v.shape[0] == 1 for v in made.values())

    # AlphaEdit runs MEMIT's target optimisation: it takes MEMIT's targets of this run (not PMET's)
    memit = MEMITHyperParams(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=4, lam=0.5,
                             context_prefixes=("Once upon a time",))
    alpha = AlphaEditHyperParams(**{k: v for k, v in memit.target_settings().items() if k != "method"})
    assert fresh.get("alphaedit", facts[:1], "cf", alpha) is None  # PMET's are not MEMIT's
    by_memit = fresh.of("memit", facts[:2], "cf", memit)
    assert calls == [1, 1, 2]
    taken = fresh.get("alphaedit", facts[:2], "cf", alpha)
    assert calls == [1, 1, 2] and all(torch.equal(taken[s], by_memit[s]) for s in by_memit)
    assert fresh.save_path("alphaedit", "cf") == tmp_path / "other" / "cf_alphaedit.safetensors"
    again = eb.TargetBank(model, optimise, tmp_path / "other", [tmp_path / "other"])  # --resume: MEMIT's file
    assert all(torch.equal(again.get("alphaedit", facts[:1], "cf", alpha)[s], by_memit[s][:1]) for s in by_memit)
    assert calls == [1, 1, 2]

    rome = ROMEHyperParams(layers=(1,), steps=2)
    fresh.targets[("cf", "rome")] = {"blocks.1.hook_mlp_out": torch.zeros(1, model.cfg.d_model)}
    assert fresh.get("rome", facts[:2], "cf", rome) is None and calls == [1, 1, 2]
    assert fresh.get("rome", facts[:1], "cf", rome) is not None


def test_ablation_switches_name_every_ablation_and_reject_others(capsys):
    import pytest

    eb = load_analysis("edit_benchmark")
    assert set(eb.ABLATION_SWITCHES.values()) == set(eb.ABLATIONS)
    with pytest.raises(SystemExit):
        eb.main(["--ablations", "even_spread,bogus"])  # refused before the model is loaded
    assert "unknown ablation(s) ['bogus']" in capsys.readouterr().err


def _zsre_summary(metric: str, value: float) -> dict:
    from pmet_lens.evaluation import ZSRE_TESTS

    return {"metric": metric, "n_records": 2, "score": value, **{t: value for t in ZSRE_TESTS},
            **{f"{t}_ci95": 0.01 for t in ZSRE_TESTS}}


def test_zsre_tables_use_the_official_metric_and_label_both(tmp_path):
    """Table 2 beside the papers is scored with the official metric; the teacher-forced table is
    written too; every row and file names its metric; --resume recomputes unlabelled zsRE results."""
    import json

    import pandas as pd

    eb = load_analysis("edit_benchmark")
    zsre = {"MEMIT": {"official": _zsre_summary("official", 0.5), "teacher_forced": _zsre_summary("teacher_forced", 0.6)}}
    t2 = eb.zsre_vs_paper(zsre)
    ours = t2[t2["source"].str.contains("this run")]
    assert list(ours["metric"]) == ["official"] and ours["efficacy"].iloc[0] == "50.0 (1.0)"
    assert list(t2[t2["source"] == "GPT-J 6B (paper)"]["editor"]) == ["GPT-J", "FT-W", "MEND", "ROME", "MEMIT", "PMET"]
    assert set(t2["metric"]) == {"official"} and set(t2["protocol"]) == {"answer"}
    assert (eb.zsre_vs_paper(zsre, protocol="alt")["source"] == "GPT-J 6B (paper)").sum() == 0  # not the papers' protocol
    tf = eb.zsre_vs_paper(zsre, "teacher_forced")
    assert list(tf["metric"]) == ["teacher_forced"] and tf["efficacy"].iloc[0] == "60.0 (1.0)"  # no paper rows

    meta = {"n_cases": 1, "gen_every": 0, "hparams": {}}
    cf = {"MEMIT": {"score": 0.5, "efficacy": 0.5, "paraphrase": 0.5, "neighborhood": 0.5}}
    eb.save_progress(tmp_path, meta, cf, {"MEMIT": pd.DataFrame({"case_id": [0]})}, [], [], zsre)
    for metric, name in eb.ZSRE_TABLE_FILES.items():
        assert set(pd.read_csv(tmp_path / name, index_col=0)["metric"]) == {metric}
    path = tmp_path / "edit_benchmark_zsre_summaries.json"
    saved = json.loads(path.read_text())
    assert saved["_protocol"] == "answer"
    path.write_text(json.dumps({**saved, "PMET": _zsre_summary("teacher_forced", 0.4)}))  # an older run's flat summary
    *_, kept, alt, _ = eb.load_previous(tmp_path, meta)
    assert set(kept) == {"MEMIT"} and kept["MEMIT"]["official"]["efficacy"] == 0.5 and alt == {}
    # a file from before the papers' protocol existed (no _protocol) edited towards alt: it becomes the alt table
    path.write_text(json.dumps(zsre))
    *_, kept, alt, _ = eb.load_previous(tmp_path, meta)
    assert kept == {} and set(alt) == {"MEMIT"}


def test_a_new_run_does_not_inherit_an_older_runs_rows(tmp_path):
    """A fresh run's first save removes the scaling, norm and zsRE files of an earlier run in the same
    directory, so --resume after an interruption cannot take the older rows for this run's."""
    import pandas as pd

    eb = load_analysis("edit_benchmark")
    meta = {"n_cases": 1, "gen_every": 0, "hparams": {}}
    cf = {"MEMIT": {"score": 0.5, "efficacy": 0.5, "paraphrase": 0.5, "neighborhood": 0.5}}
    per = {"MEMIT": pd.DataFrame({"case_id": [0]})}
    older_scaling = [{"n_edits": 1, "editor": "MEMIT", "score": 0.1}]
    older_norms = [{"editor": "MEMIT", "layer": 3, "norm": 1.0}]
    older_zsre = {"MEMIT": {"official": _zsre_summary("official", 0.5), "teacher_forced": _zsre_summary("teacher_forced", 0.6)}}
    eb.save_progress(tmp_path, meta, cf, per, older_norms, older_scaling, older_zsre)  # the earlier run, complete
    unedited = {"SmolLM2 (unedited)": cf["MEMIT"]}
    eb.save_progress(tmp_path, meta, unedited, {"SmolLM2 (unedited)": per["MEMIT"]}, [], [], {})  # a new run's first row
    summaries, _, norms, scaling, zsre, alt, sweep = eb.load_previous(tmp_path, meta)
    assert list(summaries) == ["SmolLM2 (unedited)"] and norms == [] and scaling == [] and zsre == {}
    assert alt == {} and sweep == []


def test_report_drops_an_older_runs_table3(tmp_path):
    """A run without ablation rows writes no Table 3, and an older run's Table 3 file does not reach its report."""
    eb = load_analysis("edit_benchmark")
    (tmp_path / "edit_benchmark_table3_vs_paper.csv").write_text("source,editor\nold,PMET even spread\n")
    row = {"score": 0.5, "efficacy": 0.5, "paraphrase": 0.5, "neighborhood": 0.5, "efficacy_ci95": 0.1,
           "paraphrase_ci95": 0.1, "neighborhood_ci95": 0.1}
    summaries = {"SmolLM2 (unedited)": row, "MEMIT": row, "PMET": row}
    eb.write_report(tmp_path, summaries, [], [], {}, {"n_cases": 1, "gen_every": 0, "model": "m"}, "consistency_proxy")
    assert not (tmp_path / "edit_benchmark_table3_vs_paper.csv").exists()
    html = (tmp_path / "edit_benchmark.html").read_text()
    assert "table1_vs_paper" in html and "table3_vs_paper" not in html and "PMET even spread" not in html


def test_every_editor_has_a_row_and_the_sweep_and_protocols_are_written(tmp_path):
    """Table 1 lists the unedited model and every editor in the papers' order; Fig. 5 is written as CSV,
    HTML and PNG; the alt protocol's Table 2 and its difference from the papers' protocol are written
    beside Table 2; a method that a preset change does not touch stays valid on --resume."""
    import pandas as pd

    eb = load_analysis("edit_benchmark")
    row = {"score": 0.5, "efficacy": 0.5, "paraphrase": 0.5, "neighborhood": 0.5, "efficacy_ci95": 0.1,
           "paraphrase_ci95": 0.1, "neighborhood_ci95": 0.1}
    summaries = {"PMET": row, "SmolLM2 (unedited)": row, "ROME": row, "FT-W": row, "r-ROME": row}
    sweep = [{"n_edits": n, "editor": e, **{k: row[k] for k in eb.METRICS}} for n in (1, 10) for e in ("ROME", "FT-W")]
    answer = {"ROME": {"official": _zsre_summary("official", 0.5), "teacher_forced": _zsre_summary("teacher_forced", 0.6)}}
    alt = {"ROME": {"official": _zsre_summary("official", 0.2), "teacher_forced": _zsre_summary("teacher_forced", 0.3)}}
    meta = {"n_cases": 10, "gen_every": 0, "model": "m", "hparams": {}}
    eb.save_progress(tmp_path, meta, summaries, {k: pd.DataFrame({"case_id": [0]}) for k in summaries}, [], [], answer,
                     alt, sweep)
    eb.write_report(tmp_path, summaries, [], [], answer, meta, "consistency_proxy", alt, sweep)
    t1 = pd.read_csv(tmp_path / "edit_benchmark_table1_vs_paper.csv")
    assert list(t1[t1["source"].str.contains("this run")]["editor"]) == ["SmolLM2 (unedited)", "FT-W", "ROME", "PMET",
                                                                         "r-ROME"]
    for suffix in ("csv", "html", "png"):
        assert (tmp_path / f"edit_benchmark_fig5_sweep.{suffix}").is_file()
    diff = pd.read_csv(tmp_path / "edit_benchmark_table2_protocols.csv")
    assert diff["efficacy_difference"].iloc[0] == 30.0
    assert set(pd.read_csv(tmp_path / "edit_benchmark_table2_alt.csv")["protocol"]) == {"alt"}
    *_, kept, kept_alt, kept_sweep = eb.load_previous(tmp_path, meta)
    assert set(kept) == set(kept_alt) == {"ROME"} and len(kept_sweep) == 4
    current = {m: preset("SmolLM2-135M-Instruct", m).to_dict() for m in ("pmet", "memit", "rome")}
    assert eb.stale_editors(current, {k: v for k, v in current.items() if k != "rome"}) == set()
    assert eb.stale_editors({**current, "rome": {**current["rome"], "steps": 5}}, current) == {"ROME"}
    eb.write_report(tmp_path, summaries, [], [], answer, meta, "consistency_proxy")  # a run without them drops them
    assert not (tmp_path / "edit_benchmark_fig5_sweep.png").exists()
    assert not (tmp_path / "edit_benchmark_table2_protocols.csv").exists()


def test_methods_are_checked_before_the_model_loads(capsys):
    import pytest

    eb = load_analysis("edit_benchmark")
    assert eb.available_methods()[:3] == ["ft-w", "mend", "rome"] and "memit" in eb.available_methods()
    with pytest.raises(SystemExit):
        eb.main(["--methods", "rome,serac"])
    assert "unknown method 'serac'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        eb.main(["--zsre-protocols", "both"])
    assert "--zsre-protocols takes" in capsys.readouterr().err


def test_resume_in_parts_keeps_the_presets_of_the_methods_a_part_does_not_run(tmp_path):
    """A run made in parts (--methods ft-w, then --methods rome --resume) records the first part's presets, so
    a third part that lists FT-W again keeps its results."""
    import pandas as pd

    eb = load_analysis("edit_benchmark")
    current = {m: preset("SmolLM2-135M-Instruct", m).to_dict() for m in ("pmet", "memit", "ft-w", "rome")}
    row = {"score": 0.5, "efficacy": 0.5, "paraphrase": 0.5, "neighborhood": 0.5}
    first = {"n_cases": 10, "gen_every": 0, "model": "m", "hparams": {m: current[m] for m in ("pmet", "memit", "ft-w")}}
    eb.save_progress(tmp_path, first, {"FT-W": row}, {"FT-W": pd.DataFrame({"case_id": [0]})}, [], [], {})
    second = {**first, "hparams": {m: current[m] for m in ("pmet", "memit", "rome")}}
    summaries, per_records, *_ = eb.load_previous(tmp_path, second)
    assert set(summaries) == {"FT-W"} and second["hparams"]["ft-w"] == current["ft-w"]
    summaries["ROME"], per_records["ROME"] = row, pd.DataFrame({"case_id": [0]})
    eb.save_progress(tmp_path, second, summaries, per_records, [], [], {})
    third = {**first, "hparams": dict(current)}
    assert set(eb.load_previous(tmp_path, third)[0]) == {"FT-W", "ROME"}
    changed = {**first, "hparams": {**current, "ft-w": {**current["ft-w"], "steps": 3}}}
    assert set(eb.load_previous(tmp_path, changed)[0]) == {"ROME"}


def test_rows_follow_the_tables_order_whatever_order_they_were_run_in():
    eb = load_analysis("edit_benchmark")
    assert eb.in_table_order(["PMET w/o δ_a", "ROME", "AlphaEdit", "other", "SmolLM2 (unedited)", "FT-W"]) == [
        "SmolLM2 (unedited)", "FT-W", "ROME", "AlphaEdit", "PMET w/o δ_a", "other"]
    official = {"metric": "official", **{c: 0.5 for c in eb.ZSRE_TESTS}, **{f"{c}_ci95": 0.1 for c in eb.ZSRE_TESTS}}
    table = {e: {"official": official} for e in ("ROME", "MEND", "SmolLM2 (unedited)")}
    rows = eb.zsre_vs_paper(table)
    assert list(rows[rows["source"].str.contains("this run")]["editor"]) == ["SmolLM2 (unedited)", "MEND", "ROME"]


def test_the_unedited_line_is_a_dashed_grey_reference(tmp_path):
    """Fig. 5 draws the unedited model as a dashed grey line and every editor as a solid coloured one."""
    eb = load_analysis("edit_benchmark")
    rows = [{"n_edits": n, "editor": e, **{k: 0.5 for k in eb.METRICS}} for n in (1, 10) for e in (eb.UNEDITED, "ROME")]
    fig = eb.scaling_figure(rows, "t", tmp_path / "f.png")
    styles = {(t.name, t.line.dash, t.line.color) for t in fig.data}  # one trace per editor and metric facet
    assert len(fig.data) == 2 * len(eb.METRICS)
    assert {s[1:] for s in styles if s[0] == eb.UNEDITED} == {("dash", "grey")}
    assert all(dash == "solid" and color != "grey" for name, dash, color in styles if name == "ROME")
    assert (tmp_path / "f.png").is_file()


def test_png_lines_follow_the_tables_order_and_only_the_unedited_one_is_grey(tmp_path, monkeypatch):
    """The PNG draws its lines (and so its legend) in the tables' order, whatever order the rows come in,
    and each editor in its own colour, none of them the grey of the unedited reference."""
    import matplotlib.axes
    from matplotlib.colors import to_rgb

    eb = load_analysis("edit_benchmark")
    drawn: list[tuple[str, tuple[float, float, float]]] = []
    real = matplotlib.axes.Axes.plot

    def recording_plot(self, *a, **k):
        lines = real(self, *a, **k)
        drawn.append((k["label"], to_rgb(lines[0].get_color())))
        return lines

    monkeypatch.setattr(matplotlib.axes.Axes, "plot", recording_plot)
    editors = [*reversed(eb.LABELS.values()), eb.UNEDITED]
    rows = [{"n_edits": n, "editor": e, **{k: 0.5 for k in eb.METRICS}} for n in (1, 10) for e in editors]
    eb.scaling_figure(rows, "t", tmp_path / "f.png")
    first_facet = drawn[:len(editors)]
    assert [name for name, _ in first_facet] == [eb.UNEDITED, *eb.LABELS.values()]
    colours = dict(first_facet)
    assert colours.pop(eb.UNEDITED) == to_rgb("grey")
    assert len(set(colours.values())) == len(colours)  # no two editors share a colour
    assert all(max(abs(a - b) for a, b in zip(c, to_rgb("grey"))) > 0.05 for c in colours.values())


def test_fig5_png_draws_ci_bands_where_the_points_have_them(tmp_path, monkeypatch):
    """A line whose n = 1 point has no CI still gets its band over the points that have one."""
    import matplotlib.axes

    eb = load_analysis("edit_benchmark")
    bands = []
    real = matplotlib.axes.Axes.fill_between
    monkeypatch.setattr(matplotlib.axes.Axes, "fill_between",
                        lambda self, x, *a, **k: bands.append(list(x)) or real(self, x, *a, **k))
    rows = [{"n_edits": n, "editor": "ROME", **{k: 0.5 for k in eb.METRICS},
             **{f"{k}_ci95": (None if n == 1 else 0.1) for k in eb.METRICS[1:]}} for n in (1, 10, 32)]
    eb.scaling_figure(rows, "t", tmp_path / "f.png")
    assert bands == [[10, 32]] * (len(eb.METRICS) - 1)  # every metric with a CI column, from n = 10


def test_figs_3_and_5_optimise_targets_only_up_to_the_largest_count_table1_does_not_give(tmp_path, monkeypatch):
    """With Table 1's edit of all cases kept (``--resume``), Figs. 3 and 5 of a mass editor take their
    point at all cases from Table 1 and optimise the targets of the cases up to their next largest count
    only, once for both figures (and save them); each other point is an edit of the first n cases with the
    first n rows of those targets."""
    import argparse

    import pandas as pd

    from conftest import make_tiny_model
    from pmet_lens.editing import EditResult, MEMITHyperParams
    from pmet_lens.editing import edit as real_edit

    eb = load_analysis("edit_benchmark")
    model = make_tiny_model(parallel=True, norm="LN", gated=False)
    hparams = {"memit": MEMITHyperParams(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=4, lam=0.5,
                                         context_prefixes=("Once upon a time",)),
               "pmet": tiny_pmet_hparams()}
    optimised: list[int] = []
    edited: list[tuple[int, int]] = []

    def counting_edit(model, facts, **kw):
        if kw.get("apply", True):
            edited.append((len(facts), eb.n_rows(kw["targets"])))
        else:
            optimised.append(len(facts))
        return real_edit(model, facts, **kw)

    def fake_evaluation(model, facts, args, generation=True, log=None):
        return pd.DataFrame({"case_id": range(len(facts))}), {"score": 0.5, "efficacy": len(facts) / 10,
                                                              "paraphrase": 0.5, "neighborhood": 0.5}

    monkeypatch.setattr(eb, "preset", lambda name, method: hparams[method])
    monkeypatch.setattr(eb, "split_facts", lambda split, limit=None: FACTS)
    monkeypatch.setattr(eb, "edit", counting_edit)
    monkeypatch.setattr(eb, "evaluate_cf", fake_evaluation)
    table1 = {"score": 0.9, "efficacy": 0.99, "paraphrase": 0.9, "neighborhood": 0.8}
    meta = {"n_cases": 3, "gen_every": 0, "model": model.cfg.model_name, "compile": False,
            "hparams": {m: hp.to_dict() for m, hp in hparams.items()}}
    eb.save_progress(tmp_path, meta, {"MEMIT": table1}, {"MEMIT": pd.DataFrame({"case_id": range(3)})}, [], [], {})
    args = argparse.Namespace(out=str(tmp_path), limit=None, zsre_limit=None, gen_every=0, compile=False, resume=True,
                              merge=[], targets_from=[], pool=None, protocols=["answer"], sweep_count_list=[1, 2, 3],
                              scaling_points=3)
    assert eb.run(args, model, tmp_path, ["memit"], {}, {"table1", "ablations", "zsre"}) == 0

    assert optimised == [2]  # the cases up to n = 2, once for both figures
    assert edited == [(1, 1), (2, 2), (1, 1), (2, 2)]  # Fig. 3, then Fig. 5, at n = 1 and 2
    for name in ("edit_benchmark_fig3_scaling.csv", "edit_benchmark_fig5_sweep.csv"):
        rows = pd.read_csv(tmp_path / name).set_index("n_edits")["efficacy"]
        assert list(rows.index) == [1, 2, 3] and rows[3] == table1["efficacy"] and rows[2] == 0.2
    saved = EditResult.load(tmp_path / "edit_benchmark_edits" / "cf_memit.safetensors", model)
    assert len(saved.facts) == 2  # a later --resume reuses them
