"""Evaluation metrics agree with an independent plain loop over prompts (full forward, log-softmax),
on unedited and edited models; text metrics match hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from conftest import real_hparams
from pmet_lens.core.generation import sample_texts
from pmet_lens.data import DataError, Fact, load_counterfact, load_zsre
from pmet_lens.editing import edit
from pmet_lens.evaluation import evaluate_counterfact, evaluate_zsre, format_table, harmonic_mean, mean_ci95
from pmet_lens.evaluation.consistency import ProxyReference
from pmet_lens.evaluation.textmetrics import Tfidf, ngram_entropy


# ----------------------------------------------------------------- independent reference
def _ref_logprob(model, prompt: str, target: str) -> float:
    """Mean token log P(target | prompt), one prompt at a time, full logits (no shared code)."""
    p = model.to_tokens(prompt)[0].tolist()
    t = model.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = model(torch.tensor([p + t])).log_softmax(-1)[0]
    return float(np.mean([float(logp[len(p) - 1 + j, tok]) for j, tok in enumerate(t)]))


def _ref_token_acc(model, prompt: str, target: str) -> float:
    p = model.to_tokens(prompt)[0].tolist()
    t = model.tokenizer(" " + target, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([p + t]))[0]
    return float(np.mean([int(logits[len(p) - 1 + j].argmax()) == tok for j, tok in enumerate(t)]))


def _ref_counterfact(model, fact: Fact) -> dict[str, float]:
    def pair(prompt):
        return _ref_logprob(model, prompt, fact.target_new), _ref_logprob(model, prompt, fact.target_true)

    e_new, e_true = pair(fact.text)
    para = [pair(p) for p in fact.paraphrase_prompts]
    neigh = [pair(p) for p in fact.neighborhood_prompts]
    return {
        "efficacy_success": float(e_new > e_true),
        "paraphrase_success": float(np.mean([a > b for a, b in para])),
        "neighborhood_success": float(np.mean([b > a for a, b in neigh])),
        "efficacy_magnitude": math.exp(e_new) - math.exp(e_true),
        "paraphrase_magnitude": float(np.mean([math.exp(a) - math.exp(b) for a, b in para])),
        "neighborhood_magnitude": float(np.mean([math.exp(b) - math.exp(a) for a, b in neigh])),
    }


def _facts(n: int) -> list[Fact]:
    facts = load_counterfact(limit=n)
    # keep it small on CPU: 3 neighborhood prompts each
    return [Fact(**{**f.__dict__, "neighborhood_prompts": f.neighborhood_prompts[:3]}) for f in facts]


def _check_against_reference(model, facts, per_record):
    for fact, (_, row) in zip(facts, per_record.iterrows()):
        ref = _ref_counterfact(model, fact)
        for key, value in ref.items():
            assert row[key] == pytest.approx(value, abs=1e-5), (fact.case_id, key)


# ----------------------------------------------------------------- probability metrics
def test_counterfact_matches_plain_loop_unedited(tiny_model):
    facts = _facts(3)
    per_record, summary = evaluate_counterfact(tiny_model, facts, generation=False, batch_size=5, progress=False)
    assert list(per_record["case_id"]) == [f.case_id for f in facts]
    _check_against_reference(tiny_model, facts, per_record)
    for name in ("efficacy", "paraphrase", "neighborhood"):
        assert summary[name] == pytest.approx(per_record[f"{name}_success"].mean())
    assert summary["score"] == pytest.approx(harmonic_mean([summary["efficacy"], summary["paraphrase"], summary["neighborhood"]]))
    assert "fluency" not in summary and "consistency" not in summary


def test_a_subset_of_the_rows_summarises_as_an_evaluation_of_its_records(tiny_model):
    """``probability_summary`` of the first n per-record rows equals evaluating the first n facts (what
    Fig. 5's unedited reference line takes from the full evaluation)."""
    from pmet_lens.evaluation import probability_summary

    facts = _facts(4)
    per_record, summary = evaluate_counterfact(tiny_model, facts, generation=False, progress=False)
    assert probability_summary(per_record) == pytest.approx(summary)
    _, first = evaluate_counterfact(tiny_model, facts[:2], generation=False, progress=False)
    assert probability_summary(per_record.iloc[:2]) == pytest.approx(first)

def test_pairs_with_one_sequence_share_a_row_and_score_as_alone(tiny_model):
    """Pairs whose teacher-forced sequences coincide (a prompt with two single-token objects; a
    prompt + o[0] scored for o[1:]) share one forward row, and each still gets its own score."""
    from pmet_lens.evaluation.scoring import score_token_ids

    p = tiny_model.to_tokens("The mother tongue of Danielle Darrieux is")[0].tolist()
    pairs = [(p, [11]), (p, [42]), (p, [11, 7, 9]), (p + [11], [7, 9]), (p[:-1], [p[-1], 5]), (p, [11])]
    shared = score_token_ids(tiny_model, [a for a, _ in pairs], [b for _, b in pairs], batch_size=2)
    for i, (prompt, target) in enumerate(pairs):
        alone = score_token_ids(tiny_model, [prompt], [target])
        assert float(shared.mean_logprob[i]) == pytest.approx(float(alone.mean_logprob[0]), abs=1e-5)
        assert torch.equal(shared.token_correct[i], alone.token_correct[0])
    assert float(shared.mean_logprob[0]) != pytest.approx(float(shared.mean_logprob[1]))


def test_a_shared_position_is_read_out_once(tiny_model, monkeypatch):
    """o* and o^c after the same prompt need one unembedding of the prompt's last position."""
    import pmet_lens.evaluation.scoring as scoring

    widths = []
    real = scoring._unembed
    monkeypatch.setattr(scoring, "_unembed", lambda model, resid: widths.append(resid.shape[0]) or real(model, resid))
    p = tiny_model.to_tokens("The Eiffel Tower is located in the city of")[0].tolist()
    scores = scoring.score_token_ids(tiny_model, [p, p, p], [[11], [42], [11, 7]])
    # rows: p (o* = [11] and o^c = [42] share its last position) and p + [11] (two positions): 3, not 4
    assert widths == [3]
    assert float(scores.mean_logprob[0]) != pytest.approx(float(scores.mean_logprob[1]))


def _random_edit_hooks(model, scale: float = 2.0):
    """An 'edit' as hooks: a random rank-1 ΔW_out on two layers (what EditResult.as_hooks adds)."""
    gen = torch.Generator().manual_seed(1)
    hooks = []
    for layer in (1, 2):
        d_mlp, d_model = model.blocks[layer].mlp.W_out.shape
        delta = scale * torch.randn(d_mlp, 1, generator=gen) @ torch.randn(1, d_model, generator=gen)
        store = {}
        hooks.append((f"blocks.{layer}.mlp.hook_post", lambda a, hook, s=store: s.__setitem__("k", a)))
        hooks.append((f"blocks.{layer}.hook_mlp_out", lambda a, hook, s=store, d=delta: a + s["k"] @ d))
    return hooks


def test_counterfact_matches_plain_loop_edited(tiny_model):
    facts = _facts(2)
    with tiny_model.hooks(fwd_hooks=_random_edit_hooks(tiny_model)):
        per_record, _ = evaluate_counterfact(tiny_model, facts, generation=False, progress=False)
        _check_against_reference(tiny_model, facts, per_record)
    unedited, _ = evaluate_counterfact(tiny_model, facts, generation=False, progress=False)
    assert not np.allclose(unedited["efficacy_magnitude"], per_record["efficacy_magnitude"])


@pytest.mark.slow
def test_counterfact_matches_plain_loop_real_edit(default_model, real_cov_store):
    """With the real editor (issue 5) on the real model: an applied edit, then the same edit as hooks."""
    facts = _facts(1)
    result = edit(default_model, facts, hparams=real_hparams("pmet"), cov_store=real_cov_store, apply=False,
                  progress=False)
    with result:
        applied, s = evaluate_counterfact(default_model, facts, generation=False, progress=False)
        _check_against_reference(default_model, facts, applied)
    with default_model.hooks(fwd_hooks=result.as_hooks()):
        hooked, _ = evaluate_counterfact(default_model, facts, generation=False, progress=False)
    np.testing.assert_allclose(applied["efficacy_magnitude"], hooked["efficacy_magnitude"], atol=1e-4)
    assert applied["p_new"][0] > applied["p_true"][0]  # the edit took


def test_zsre_matches_plain_loop(tiny_model):
    records = load_zsre(limit=3)
    per_record, summary = evaluate_zsre(tiny_model, records, batch_size=4, progress=False)
    for r, (_, row) in zip(records, per_record.iterrows()):
        assert row["efficacy"] == pytest.approx(_ref_token_acc(tiny_model, r.src, r.target_new))
        assert row["paraphrase"] == pytest.approx(_ref_token_acc(tiny_model, r.rephrase, r.target_new))
        assert row["specificity"] == pytest.approx(_ref_token_acc(tiny_model, r.loc + "?", r.loc_ans))
    assert summary["efficacy"] == pytest.approx(per_record["efficacy"].mean())


def test_zsre_on_edited_model_matches_plain_loop(tiny_model):
    records = load_zsre(limit=2)
    with tiny_model.hooks(fwd_hooks=_random_edit_hooks(tiny_model, 5.0)):
        per_record, _ = evaluate_zsre(tiny_model, records, progress=False)
        for r, (_, row) in zip(records, per_record.iterrows()):
            assert row["efficacy"] == pytest.approx(_ref_token_acc(tiny_model, r.src, r.target_new))


# ----------------------------------------------------------------- generation metrics
def test_generation_seeded_and_batch_independent(tiny_model):
    prompts = ["The mother tongue of", "Paris is a city in the country of", "Hello"]
    one = sample_texts(tiny_model, prompts, max_length=12, seed=3, batch_size=1)
    many = sample_texts(tiny_model, prompts, max_length=12, seed=3, batch_size=3)
    assert one == many
    assert all(t.startswith(p) for t, p in zip(one, prompts))
    assert sample_texts(tiny_model, prompts, max_length=12, seed=4, batch_size=3) != many


def test_generation_metrics_match_texts(tiny_model):
    facts = _facts(2)
    per_record, summary = evaluate_counterfact(tiny_model, facts, generation=True, max_length=16, seed=7,
                                               gen_every=2, progress=False)
    texts = sample_texts(tiny_model, list(facts[0].generation_prompts), max_length=16, seed=7)
    assert per_record["fluency"][0] == pytest.approx(np.mean([ngram_entropy(t) for t in texts]))
    assert np.isnan(per_record["fluency"][1])  # gen_every=2 skips record 1
    assert "consistency" not in per_record and "consistency" not in summary  # proxy, never the paper's name
    assert summary["consistency_kind"] == "consistency_proxy"
    assert summary["n_generation"] == 1
    # the proxy is the TF-IDF cosine of the record's texts, joined, and its reference text about o*
    ref = ProxyReference.from_wikitext()
    expected = ref.tfidf.similarity(" ".join(texts), ref.reference_text(facts[0]))
    assert per_record["consistency_proxy"][0] == pytest.approx(expected, abs=1e-12)
    assert expected > 0  # the texts share words with the reference: a value, not an empty match
    assert np.isnan(per_record["consistency_proxy"][1])
    assert summary["consistency_proxy"] == pytest.approx(expected)


def test_bad_records(tiny_model):
    with pytest.raises(DataError, match="target_true"):
        evaluate_counterfact(tiny_model, [Fact(subject="A", prompt="{} is", target_new="B")], generation=False)
    with pytest.raises(ValueError, match="gen_every"):
        evaluate_counterfact(tiny_model, _facts(1), gen_every=0)


# ----------------------------------------------------------------- text metrics
def test_ngram_entropy_by_hand():
    # "a b a b": bigrams ab, ba, ab -> f = 2/3, 1/3; trigrams aba, bab -> 1/2, 1/2
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    h3 = 1.0
    assert ngram_entropy("a b a b") == pytest.approx((2 / 3 * h2 + 4 / 3 * h3) / 2)
    assert ngram_entropy("repeat repeat repeat repeat") == 0.0


def test_tfidf_matches_sklearn_formula():
    docs = ["the cat sat", "the dog sat", "a bird flew"]
    tf = Tfidf.fit(docs)
    idf_cat = math.log(4 / 2) + 1
    idf_the = math.log(4 / 3) + 1
    v = tf.vector("the cat the")
    norm = math.hypot(2 * idf_the, idf_cat)
    assert v["the"] == pytest.approx(2 * idf_the / norm)
    assert v["cat"] == pytest.approx(idf_cat / norm)
    assert tf.similarity("cat sat", "cat sat") == pytest.approx(1.0)
    assert tf.similarity("cat", "dog") == 0.0
    assert "zebra" in tf.vector("zebra")  # out-of-vocabulary words keep the unseen-term idf


def test_proxy_reference_uses_attribute_prompts_and_wikitext():
    ref = ProxyReference.from_wikitext(max_paragraphs=3)
    fact = load_counterfact(limit=1)[0]
    text = ref.reference_text(fact)
    assert text.startswith(f"{fact.attribute_prompts[0]} {fact.target_new}")
    assert len(ref.paragraphs_about(fact.target_new)) == 3


def test_format_table():
    table = format_table({"x": {"score": 0.5, "efficacy": 0.991, "efficacy_ci95": 0.004, "paraphrase": 0.5,
                                "neighborhood": 0.5, "fluency": 6.2, "fluency_ci95": 0.01}})
    assert table.loc["x", "efficacy"] == "99.1 (0.4)"
    assert table.loc["x", "fluency"] == "620.0 (1.0)"
    assert math.isnan(mean_ci95([1.0])[1])  # n = 1: no interval (pmet_lens.core.stats)
