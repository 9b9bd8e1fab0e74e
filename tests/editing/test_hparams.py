"""Hyper-parameter dataclasses and presets."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, hp_

from pmet_lens.editing import MEMITHyperParams, PMETHyperParams, prepare_requests


def test_hparams_validation():
    with pytest.raises(ValueError, match=r"layers must be strictly ascending without repeats, got \(3, 2\)"):
        PMETHyperParams(layers=(3, 2))
    with pytest.raises(ValueError, match="lam must be a finite number > 0, got -1"):
        PMETHyperParams(lam=-1)
    with pytest.raises(ValueError, match="update_attn=True needs use_attn_delta=True"):
        PMETHyperParams(use_attn_delta=False, update_attn=True)
    with pytest.raises(ValueError, match="spread must be 'sqrt' or 'even', got 'cubic'"):
        MEMITHyperParams(spread="cubic")
    assert PMETHyperParams(layers=[1, 2]).layers == (1, 2)


def test_preset_lookup_is_by_exact_name():
    from pmet_lens.editing import preset

    assert preset("EleutherAI/gpt-j-6B", "pmet").layers == (3, 4, 5, 6, 7, 8)   # hub name -> cfg.model_name
    assert preset("GPT-J-6B", "memit").lam == 15000.0
    assert preset("gpt-neox-20b", "memit").layers == (6, 7, 8, 9, 10)
    smol = preset("SmolLM2-135M-Instruct", "pmet")
    assert isinstance(smol, PMETHyperParams) and smol.layers == (3, 4, 5, 6, 7)
    # no substring guessing: a name that merely contains "gpt-j" or "neox" has no preset and no R
    for name in ("my-gpt-j-finetune", "pythia-neox-70m", "gpt2"):
        with pytest.raises(ValueError, match="no critical layers R are known"):
            preset(name, "pmet")
    with pytest.raises(ValueError, match="method must be"):
        preset("gpt-j-6B", "serac")


def test_nullspace_block_per_target_method(tmp_path):
    from pmet_lens.core.presets import write_entry
    from pmet_lens.editing import preset
    from pmet_lens.editing.hparams import nullspace_values

    block = {"nullspace_threshold": 0.02, "l2": 1.0, "pmet": {"l2": 10.0}, "_doc": "x"}
    assert nullspace_values(block, "memit") == {"nullspace_threshold": 0.02, "l2": 1.0}
    assert nullspace_values(block, "pmet") == {"nullspace_threshold": 0.02, "l2": 10.0}
    assert nullspace_values({}, "pmet") == {}
    for bad, where in (({"tau": 0.1}, "'tau'"), ({"pmet": {"alpha": 3.0}}, "nullspace.pmet"),
                       ({"rome": {"l2": 3.0}}, "'rome'")):
        with pytest.raises(ValueError, match=where):
            nullspace_values(bad, "pmet")
    # the shipped SmolLM2 block: MEMIT's targets (alphaedit) α 1, PMET's α 10, from the tune split's search
    name = "SmolLM2-135M-Instruct"
    assert (preset(name, "alphaedit").l2, preset(name, "pmet").with_(nullspace=True).l2) == (1.0, 10.0)
    # a user preset: the alphaedit values come from the plain entries, pmet's from its own entry
    write_entry("editing.json", "tiny-x", {"memit": {"layers": [1]}, "pmet": {"layers": [1]},
                                           "nullspace": {"nullspace_threshold": 0.5, "l2": 2.0,
                                                         "pmet": {"nullspace_threshold": 0.1}}}, tmp_path)
    a, p_ = preset("tiny-x", "alphaedit", tmp_path), preset("tiny-x", "pmet", tmp_path)
    assert (a.nullspace_threshold, a.l2) == (0.5, 2.0) and (p_.nullspace_threshold, p_.l2) == (0.1, 2.0)
    # τ and α are part of an edit's effective settings only with the projection
    assert "l2" not in p_.effective_settings() and p_.with_(nullspace=True).effective_settings()["l2"] == 2.0
    assert p_.effective_settings() == p_.with_(l2=99.0).effective_settings()


@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams])
def test_update_only_fields_do_not_change_the_targets(tiny_model, cls):
    """``target_settings()`` leaves out λ, C's corpus settings and the spread (and PMET's W_O switch):
    changing all of them at once gives bit-identical targets, so saved targets may be reused."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing.targets import optimise_targets

    hp = hp_(cls, steps=4)
    changes = {"lam": 7.0, "cov_tokens": 900, "cov_seq_len": 32, "cov_dtype": "float64", "key_average": "uniform",
               "spread": "sqrt" if hp.spread == "even" else "even",
               "nullspace": True, "nullspace_threshold": 0.5, "l2": 3.0}
    if cls is PMETHyperParams:
        changes["update_attn"] = True
    assert set(changes) == cls.update_only_fields
    other = hp.with_(**changes)
    assert other.target_settings() == hp.target_settings() and other.to_dict() != hp.to_dict()
    assert hp.with_(steps=5).target_settings() != hp.target_settings()
    facts = as_facts([FACT, FACT2])
    a = optimise_targets(tiny_model, prepare_requests(tiny_model, facts, hp.context_prefixes), hp)
    b = optimise_targets(tiny_model, prepare_requests(tiny_model, facts, other.context_prefixes), other)
    assert all(torch.equal(a.delta[s], b.delta[s]) for s in a.delta) and torch.equal(a.steps, b.steps)


def test_alphaedit_and_emmet_run_memits_target_optimisation(tiny_model):
    """AlphaEdit and EMMET optimise MEMIT's targets (``targets_of_method``): with the same settings the
    three name the same ``target_settings()`` and give bit-identical targets, so one run's targets serve
    the others; PMET's differ."""
    from pmet_lens.data import as_facts
    from pmet_lens.editing import AlphaEditHyperParams, EMMETHyperParams
    from pmet_lens.editing.targets import optimise_targets

    memit = hp_(MEMITHyperParams, steps=4)
    shared = {k: v for k, v in memit.target_settings().items() if k not in ("method", "layers")}
    others = [AlphaEditHyperParams(layers=memit.layers, **shared), EMMETHyperParams(layers=memit.layers, **shared)]
    assert all(o.target_settings() == memit.target_settings() for o in others)
    assert [o.to_dict()["method"] for o in others] == ["alphaedit", "emmet"]  # the edit still names its method
    assert hp_(PMETHyperParams, steps=4).target_settings()["method"] == "pmet"
    facts = as_facts([FACT, FACT2])
    a = optimise_targets(tiny_model, prepare_requests(tiny_model, facts, memit.context_prefixes), memit)
    for o in others:
        b = optimise_targets(tiny_model, prepare_requests(tiny_model, facts, o.context_prefixes), o)
        assert set(a.delta) == set(b.delta) and all(torch.equal(a.delta[s], b.delta[s]) for s in a.delta)


def test_presets_of_the_baseline_editors(tmp_path):
    """ROME / r-ROME / EMMET on SmolLM2: the layer of ROME's rule from the shipped causal trace with the
    official settings (EMMET's α from the tune split), FT-W / FT-L their tuned layer, weight decay and ε;
    GPT-J: the papers'; a one-layer method without a preset is an error naming the rule."""
    import pandas as pd

    from pmet_lens.analysis.layers import strongest_mlp_layer
    from pmet_lens.editing import EMMETHyperParams, ROMEHyperParams, RROMEHyperParams, preset
    from pmet_lens.editing.hparams import SMOLLM2_ROME_LAYER

    figures = __import__("pathlib").Path(__file__).resolve().parents[2] / "figures" / "causal_trace_classes.csv"
    name = "SmolLM2-135M-Instruct"
    rome, rrome, emmet = preset(name, "rome"), preset(name, "r-rome"), preset(name, "emmet")
    assert (strongest_mlp_layer(pd.read_csv(figures)),) == rome.layers == SMOLLM2_ROME_LAYER == emmet.layers
    assert isinstance(rome, ROMEHyperParams) and type(rrome) is RROMEHyperParams and isinstance(emmet, EMMETHyperParams)
    assert (rome.steps, rome.lr, rome.weight_decay, rome.kl_factor, rome.clamp_norm_factor) == (20, 0.5, 0.5, 0.0625, 4.0)
    assert rrome.to_dict() == {**rome.to_dict(), "method": "r-rome"} and rome.key_average == "uniform"
    assert (emmet.lam, emmet.emmet_lambda, emmet.spread) == (1000.0, 0.1, "even")  # α: tune split (official 1e4)
    ftw, ftl = preset(name, "ft-w"), preset(name, "ft-l")
    assert (ftw.layers, ftw.weight_decay, ftw.norm_constraint) == ((20,), 0.0, None)
    assert (ftl.layers, ftl.weight_decay, ftl.norm_constraint) == ((20,), 0.0, 0.02)
    gptj = preset("gpt-j-6B", "rome"), preset("gpt-j-6B", "ft-w"), preset("gpt-j-6B", "ft-l")
    assert [h.layers for h in gptj] == [(5,), (21,), (21,)] and gptj[1].weight_decay == 5e-4
    assert gptj[2].norm_constraint == 5e-5
    from pmet_lens.core.presets import write_entry

    write_entry("critical_layers.json", "tiny-y", {"layers": [1, 2]}, tmp_path)
    assert preset("tiny-y", "emmet", tmp_path).layers == (1, 2)  # EMMET takes R like MEMIT
    for method in ("rome", "ft-w"):
        with pytest.raises(ValueError, match="its layer is not the critical range"):
            preset("tiny-y", method, tmp_path)


def test_strongest_mlp_layer_is_the_first_maximum():
    import pandas as pd

    from pmet_lens.analysis.layers import strongest_mlp_layer

    rows = [{"kind": k, "token_class": c, "layer": l, "mean": m}
            for k, c, means in (("mlp", "last subject token", [0.1, 0.4, 0.4, 0.2]),
                                ("mlp", "last token", [0.9, 0.9, 0.9, 0.9]),
                                ("hidden", "last subject token", [0.0, 0.0, 0.0, 1.0]))
            for l, m in enumerate(means)]
    assert strongest_mlp_layer(pd.DataFrame(rows)) == 1
    with pytest.raises(ValueError, match="no MLP trace"):
        strongest_mlp_layer(pd.DataFrame(rows[4:]))
