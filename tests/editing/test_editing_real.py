"""Integration: edit Danielle Darrieux's mother tongue to English on the real default model."""

from __future__ import annotations

import pytest
import torch

from conftest import load_analysis, real_hparams
from pmet_lens.core.tokens import encode, target_ids
from pmet_lens.data import load_counterfact, load_known_facts
from pmet_lens.editing import edit

EIFFEL = "The Eiffel Tower is located in the city of"
# Measured on SmolLM2 with the presets (PMET λ 30, c 1.5; MEMIT λ 30, c 0.75; `analyses/paraphrase_probe.py`
# with the presets' 100k-token C): neither editor moves this paraphrase (log P English / French: -10.73 /
# -8.85 before; PMET -10.14 / -9.25, MEMIT -10.58 / -9.08 after, although P(o*) on the edit prompt's
# targets is 0.95 / 0.99); the model predicts " of" after "spoke the language" and the edited
# subject state does not reach it. `analyses/paraphrase_probe.py` (figures/paraphrase_probe.txt) shows
# that the optimised targets themselves do not carry over: adding the optimised δ's as hooks at layer L
# on this prompt leaves English behind French for both methods (PMET -10.57 / -9.02, MEMIT -10.35 / -8.91),
# and only δ's scaled x4, far beyond what the presets produce, flip it.
# `analyses/paraphrase_control.py` (figures/paraphrase_control.txt) shows why no faithful edit is expected
# to: on this template the unedited model puts French ahead of English for all 24 subjects of the shipped
# data whose mother tongue is English (Obama, Tolkien, ...), so it does not state anybody's mother tongue
# there; `test_hard_paraphrase_states_nobodys_mother_tongue` checks that.
HARD_PARAPHRASE = "An album was recorded for Capitol Nashville but never released. Danielle Darrieux spoke the language"


def _score(model, text, target):
    ids, tg = encode(model, text), target_ids(model, target)
    with torch.no_grad():
        lp = model(torch.tensor([ids + tg[:-1]]))[0].log_softmax(-1)
    return sum(lp[len(ids) - 1 + k, t].item() for k, t in enumerate(tg)) / len(tg)


@pytest.fixture(scope="module", params=["pmet", "memit"])
def darrieux(request, default_model, real_cov_store):
    """Scores before / during the edit and whether the weights came back bit-for-bit."""
    fact = load_counterfact(limit=1)[0]
    assert fact.subject == "Danielle Darrieux" and fact.target_new == "English"
    assert HARD_PARAPHRASE in fact.paraphrase_prompts
    # the suite's small covariance sample keeps the test fast; λ and the optimisation are the preset's
    hp = real_hparams(request.param)
    store = real_cov_store
    before = {k: v.clone() for k, v in default_model.state_dict().items() if "W_out" in k}
    prompts = (fact.text, *fact.paraphrase_prompts)
    pairs = [(p, "English", "French") for p in prompts] + [(EIFFEL, "Paris", "London"), (EIFFEL, "Paris", "English")]
    unedited = {(p, a, b): _score(default_model, p, a) > _score(default_model, p, b) for p, a, b in pairs}
    with edit(default_model, [fact], hparams=hp, cov_store=store, progress=False):
        edited = {(p, a, b): _score(default_model, p, a) > _score(default_model, p, b) for p, a, b in pairs}
    after = default_model.state_dict()
    restored = all(torch.equal(v, after[k]) for k, v in before.items())
    return fact, unedited, edited, restored


@pytest.mark.slow
def test_darrieux_english(darrieux):
    fact, unedited, edited, restored = darrieux
    assert not unedited[(fact.text, "English", "French")]  # the model said French before
    for prompt in (fact.text, *fact.paraphrase_prompts):
        if prompt != HARD_PARAPHRASE:
            assert edited[(prompt, "English", "French")], prompt
    assert unedited[(EIFFEL, "Paris", "London")] and edited[(EIFFEL, "Paris", "London")]
    assert edited[(EIFFEL, "Paris", "English")]
    assert restored


@pytest.mark.slow
@pytest.mark.xfail(strict=True, raises=AssertionError,
                   reason="known miss on SmolLM2: the model states nobody's mother tongue on this template (see "
                          "HARD_PARAPHRASE and the control test below); an unexpected pass fails the run, and so "
                          "does any error other than this assertion")
def test_darrieux_hard_paraphrase(darrieux):
    fact, _, edited, _ = darrieux
    assert edited[(HARD_PARAPHRASE, "English", "French")]


@pytest.mark.slow
def test_hard_paraphrase_states_nobodys_mother_tongue(default_model):
    """The xfail above is the model's, not the editors': on the hard paraphrase's template English never
    beats French, even for subjects whose mother tongue is English and who get English on the edit prompt."""
    control = load_analysis("paraphrase_control")
    fact = load_counterfact(limit=1)[0]
    english = sorted(control.subjects_by_object("P103", load_counterfact(), load_known_facts())["English"])
    assert len(english) >= 20
    on_edit_prompt = control.margins(default_model, fact.prompt, english, "English", "French")
    on_hard = control.margins(default_model, HARD_PARAPHRASE.replace(fact.subject, "{}"), english, "English", "French")
    assert sum(m > 0 for m in on_edit_prompt) > len(english) / 2  # the model knows most of them (19 of 24)
    assert not any(m > 0 for m in on_hard)
