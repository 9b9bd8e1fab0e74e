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
        preset("gpt-j-6B", "rome")


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
    changes = {"lam": 7.0, "cov_tokens": 900, "cov_seq_len": 32, "cov_dtype": "float64",
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
