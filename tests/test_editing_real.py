"""Integration: edit Danielle Darrieux's mother tongue to English on the real default model."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.data import load_counterfact
from pmet_lens.editing import CovarianceStore, edit, preset
from pmet_lens.tokens import encode, target_ids


def _score(model, text, target):
    ids, tg = encode(model, text), target_ids(model, target)
    with torch.no_grad():
        lp = model(torch.tensor([ids + tg[:-1]]))[0].log_softmax(-1)
    return sum(lp[len(ids) - 1 + k, t].item() for k, t in enumerate(tg)) / len(tg)


@pytest.fixture(scope="module")
def cov_store(tmp_path_factory):
    return CovarianceStore(tmp_path_factory.mktemp("cov"), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["pmet", "memit"])
def test_darrieux_english(default_model, cov_store, method):
    fact = load_counterfact(limit=1)[0]
    assert fact.subject == "Danielle Darrieux" and fact.target_new == "English"
    # small covariance sample keeps the test fast; λ and the optimisation are the preset's
    hp = preset("SmolLM2-135M-Instruct", method).with_(cov_tokens=8192)
    eiffel = "The Eiffel Tower is located in the city of"
    before = {k: v.clone() for k, v in default_model.state_dict().items() if "W_out" in k}
    assert _score(default_model, eiffel, "Paris") > _score(default_model, eiffel, "London")
    with edit(default_model, [fact], hparams=hp, cov_store=cov_store, progress=False):
        for prompt in (fact.text, *fact.paraphrase_prompts):
            assert _score(default_model, prompt, "English") > _score(default_model, prompt, "French"), prompt
        assert _score(default_model, eiffel, "Paris") > _score(default_model, eiffel, "London")
        assert _score(default_model, eiffel, "Paris") > _score(default_model, eiffel, "English")
    after = default_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())
