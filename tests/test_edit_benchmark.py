"""analyses/edit_benchmark.py: --resume recomputes results made with other presets."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pmet_lens.editing import preset

_PATH = Path(__file__).resolve().parents[1] / "analyses" / "edit_benchmark.py"


def _module():
    spec = importlib.util.spec_from_file_location("edit_benchmark", _PATH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_resume_drops_results_of_changed_presets():
    eb = _module()
    current = {m: preset("SmolLM2-135M-Instruct", m).to_dict() for m in ("pmet", "memit")}
    assert eb.stale_editors(current, current) == set()
    pmet_changed = {**current, "pmet": {**current["pmet"], "clamp_norm_factor": 0.75}}
    assert eb.stale_editors(pmet_changed, current) == {"PMET", *eb.ABLATIONS}
    memit_changed = {**current, "memit": {**current["memit"], "lam": 1.0}}
    assert eb.stale_editors(memit_changed, current) == {"MEMIT"}
    assert eb.stale_editors({}, current) == {"MEMIT", "PMET", *eb.ABLATIONS}


def test_only_the_no_attn_delta_ablation_reoptimises():
    """Even spread and + W_O reuse PMET's targets (on CounterFact and zsRE); w/o δ_a optimises anew."""
    eb = _module()
    reused = {abl: eb.reuses_pmet_targets(change) for abl, change in eb.ABLATIONS.items()}
    assert reused == {"PMET w/o δ_a": False, "PMET + W_O^MHSA": True, "PMET even spread": True}
