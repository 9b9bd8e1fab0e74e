"""Integration: every baseline editor (ROME, r-ROME, EMMET, FT-W, FT-L) on the real default model with a few
CounterFact facts and its SmolLM2 preset: the edit takes (efficacy as the tables count it) and restore()
gives the weights back bit for bit."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.data import load_counterfact
from pmet_lens.editing import CovarianceStore, edit, preset
from pmet_lens.evaluation import evaluate_counterfact

N_FACTS = 3


@pytest.fixture(scope="module")
def small_store(tmp_path_factory):
    """C from a small corpus sample (8192 tokens) keeps the module fast; the methods' other settings are the presets'."""
    return CovarianceStore(tmp_path_factory.mktemp("cov"), progress=False)


@pytest.fixture(scope="module")
def rome_prefixes(default_model):
    """ROME's 20 context prefixes, sampled once for ROME and r-ROME (the same seed gives the same ones)."""
    from pmet_lens.editing import context_prefixes

    return context_prefixes(default_model, preset("SmolLM2-135M-Instruct", "rome"))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rome", "r-rome", "emmet", "ft-w", "ft-l"])
def test_baseline_editor_on_the_default_model(default_model, small_store, rome_prefixes, method):
    facts = load_counterfact(limit=N_FACTS)
    hp = preset("SmolLM2-135M-Instruct", method)
    if method in ("rome", "r-rome"):
        hp = hp.with_(context_prefixes=rome_prefixes)
    if hasattr(hp, "cov_tokens"):
        hp = hp.with_(cov_tokens=8192)
    names = {s.param_name for s in hp.editor().sites(default_model, hp)}
    before = {k: v.clone() for k, v in default_model.state_dict().items() if k in names}
    with edit(default_model, facts, hparams=hp, cov_store=small_store, progress=False) as result:
        _, edited = evaluate_counterfact(default_model, facts, generation=False, progress=False)
    after = default_model.state_dict()
    assert set(result.deltas) == names and all(torch.equal(v, after[k]) for k, v in before.items())
    assert edited["efficacy"] == 1.0, (method, edited)  # every fact's new object ahead of its true one
