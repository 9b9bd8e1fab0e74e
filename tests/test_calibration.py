"""pmet_lens.calibrate on a tiny random model with no preset: the preset it writes is what edit uses."""

from __future__ import annotations

import json

import pytest

from conftest import calibrate_best_row
from pmet_lens import calibrate, edit, load_model
from pmet_lens.core.presets import write_entry
from pmet_lens.data import load_known_facts
from pmet_lens.editing import CovarianceStore, MEMITHyperParams, PMETHyperParams, preset

FACT = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
TINY = {"steps": 3, "cov_tokens": 2000, "cov_seq_len": 64}


@pytest.fixture
def tiny_checkpoint(tiny_llama_checkpoint):
    return tiny_llama_checkpoint


def test_edit_uses_the_preset_calibrate_wrote(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PMET_LENS_PRESETS", raising=False)
    model = load_model(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="pmet-lens calibrate"):
        preset(model.cfg.model_name, "pmet")  # no preset before
    # a null-space block (τ, α) chosen for this model before: calibrate keeps it, and stores no null-space field
    write_entry("editing.json", model.cfg.model_name, {"nullspace": {"nullspace_threshold": 0.05, "l2": 3.0}})
    store = CovarianceStore(cache_dir=tmp_path / "cov", progress=False)
    result = calibrate(model, facts=load_known_facts(limit=6), n_facts=4, known_only=False, size=2, samples=2,
                       n_boot=50, tune_facts=2, lams=(10.0, 1000.0), clamps=(0.75,), base=TINY, cov_store=store,
                       progress=False)
    assert len(result.layers) == 2 and result.layers == sorted(result.layers)
    assert set(result.search["method"]) == {"pmet", "memit"} and len(result.search) == 4
    assert sorted(result.search["lam"]) == [10.0, 10.0, 1000.0, 1000.0] and set(result.search["n_facts"]) == {2}
    for method, cls in (("pmet", PMETHyperParams), ("memit", MEMITHyperParams)):
        best = calibrate_best_row(result.search, method, cls(**TINY))
        assert (result.chosen[method]["lam"], result.chosen[method]["clamp_norm_factor"]) == (best["lam"], best["clamp"])
        assert result.chosen[method]["steps"] == 3 and result.chosen[method]["cov_tokens"] == 2000
    wins = result.wins()
    assert abs(wins["share"].sum() - 1) < 1e-9 and wins["share"].is_monotonic_decreasing
    assert wins.loc[wins["is_R"], "layers"].tolist() == [result.layers]
    assert [p.parent for p in result.preset_paths] == [tmp_path / "cache" / "presets"] * 2
    stored = json.loads((tmp_path / "cache" / "presets" / "critical_layers.json").read_text())
    assert stored["my-tiny-llama"]["layers"] == result.layers and "band95" in stored["my-tiny-llama"]
    editing = json.loads((tmp_path / "cache" / "presets" / "editing.json").read_text())["my-tiny-llama"]
    assert editing["nullspace"] == {"nullspace_threshold": 0.05, "l2": 3.0}
    assert not {"nullspace", "nullspace_threshold", "l2"} & (set(editing["pmet"]) | set(editing["memit"]))
    alpha = preset(model.cfg.model_name, "alphaedit")
    assert (alpha.nullspace_threshold, alpha.l2, list(alpha.layers)) == (0.05, 3.0, result.layers)
    fig, curves = result.figure(), result.curves()
    assert [t.name for t in fig.data] == ["plain", "MLP severed", "gap (plain - severed)", "share of resamples"]
    assert list(fig.data[0].y) == list(curves["plain"]) and list(fig.data[2].y) == list(curves["gap"])
    assert list(fig.data[3].y) == list(wins["share"])
    assert curves["in_R"].tolist() == [layer in result.layers for layer in range(4)]
    for method in ("pmet", "memit"):
        hp = preset(model.cfg.model_name, method)
        assert list(hp.layers) == result.layers
        assert hp.lam == result.chosen[method]["lam"] and hp.steps == 3
    # edit without hparams finds the calibrated preset by the model's name
    out = edit(model, [FACT], method="memit", cov_store=store, progress=False, apply=False)
    assert out.hparams["layers"] == result.layers and out.hparams["lam"] == result.chosen["memit"]["lam"]


def test_calibrate_writes_nothing_on_bad_input(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PMET_LENS_PRESETS", raising=False)
    model = load_model(tiny_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="methods"):
        calibrate(model, methods=("rome",))
    with pytest.raises(ValueError, match="known_only=False"):
        calibrate(model, facts=load_known_facts(limit=3), n_facts=3, size=2, samples=1, progress=False)
    assert not (tmp_path / "cache" / "presets").exists()
