"""zsRE metrics: the official procedure record by record against a plain unbatched loop written from
its description, batching invariance of both metrics, and the metric labels on every output."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import make_tiny_model
from pmet_lens.data import load_zsre
from pmet_lens.evaluation import ZSRE_METRICS, evaluate_zsre, format_table
from pmet_lens.evaluation.scoring import score_next_tokens, score_token_ids
from pmet_lens.evaluation.zsre import official_rows

LEADING_SPACE = 26  # the shipped subset's record 26 has the answer " MAT-49"
NON_ASCII = 31  # "Gmina Łódź"
NON_ASCII_LOC = 13  # its loc answer has a curly apostrophe


# ----------------------------------------------------------------- independent reference
def _plain_official(model, prompt: str, answer: str) -> list[tuple[bool, float]]:
    """The official procedure, one prefix at a time, from its description (MEMIT Appendix C.1 as the
    released evaluator computes it): for t = tokenize(" " + answer), token i is predicted at the last
    position of tokenize(prompt + decode(t[:i])) and compared with the first id of tokenize(decode(t[i])).
    Returns (correct, log P(expected)) per answer token."""
    tok = model.tokenizer
    ids = tok(" " + answer)["input_ids"]
    out = []
    for i in range(len(ids)):
        context = tok(prompt + tok.decode(ids[:i]))["input_ids"]
        expected = tok(tok.decode(ids[i]))["input_ids"][0]
        with torch.no_grad():
            logits = model(torch.tensor([context]))[0, -1]
        out.append((int(logits.argmax()) == expected, float(logits.log_softmax(-1)[expected])))
    return out


def _tests(r):
    return {"efficacy": (r.src, r.target_new), "paraphrase": (r.rephrase, r.target_new),
            "specificity": (r.loc + "?", r.loc_ans)}


def _check_official(model, records, per_record):
    """Each record's three official scores equal the plain loop's, and so does each row's log-probability."""
    for r, (_, row) in zip(records, per_record.iterrows()):
        for test, (prompt, answer) in _tests(r).items():
            ref = _plain_official(model, prompt, answer)
            assert row[test] == pytest.approx(np.mean([c for c, _ in ref]), abs=1e-12), (r.case_id, test)
            rows = official_rows(model, prompt, answer)
            got = score_next_tokens(model, [c for c, _ in rows], [e for _, e in rows], batch_size=3)
            # float32 logits from other batch shapes: equal to ~1e-4 relative on the real model
            np.testing.assert_allclose(got.mean_logprob.numpy(), [lp for _, lp in ref], rtol=1e-4, atol=1e-4)
            assert [bool(c) for c in got.token_correct] == [c for c, _ in ref], (r.case_id, test)


def _quirk_records(loc: bool = False):
    """Records 0 and 1, a leading-space answer, a non-ASCII answer (and a non-ASCII loc answer)."""
    records = load_zsre(limit=NON_ASCII + 1)
    chosen = [records[i] for i in (0, 1, LEADING_SPACE, NON_ASCII, *((NON_ASCII_LOC,) if loc else ()))]
    assert chosen[2].target_new.startswith(" ") and not chosen[3].target_new.isascii()
    assert not loc or not chosen[4].loc_ans.isascii()
    return chosen


# ----------------------------------------------------------------- the procedure's quirks
def test_official_rows_double_space_and_non_ascii(tiny_model):
    """A leading-space answer is scored after a double space (its first expected token is a lone
    space); a non-ASCII answer decoded token by token expects U+FFFD's id, not its own tokens."""
    tok = tiny_model.tokenizer
    records = _quirk_records()
    spaced = records[2]
    rows = official_rows(tiny_model, spaced.src, spaced.target_new)
    assert tok.decode([rows[0][1]]) == " " and rows[0][0] == tiny_model.to_tokens(spaced.src)[0].tolist()
    assert tok.decode(rows[2][0]).endswith("?  MAT")
    polish = records[3]
    ids = tok(" " + polish.target_new, add_special_tokens=False)["input_ids"]
    expected = [e for _, e in official_rows(tiny_model, polish.src, polish.target_new)]
    replacement = tok("\N{REPLACEMENT CHARACTER}", add_special_tokens=False)["input_ids"][0]
    assert expected != ids and replacement in expected
    assert any("\N{REPLACEMENT CHARACTER}" in tok.decode(c) for c, _ in official_rows(tiny_model, polish.src, polish.target_new))


def test_official_matches_plain_loop_tiny(tiny_model):
    records = _quirk_records()
    per_record, _ = evaluate_zsre(tiny_model, records, metric="official", batch_size=5, progress=False)
    _check_official(tiny_model, records, per_record)


def test_official_matches_plain_loop_under_edit_hooks():
    """With an edit previewed as hooks, the official rows see the hooks like the plain loop does."""
    model = make_tiny_model(False, "RMS", True, seed=3)
    records = _quirk_records()[:2]
    gen = torch.Generator().manual_seed(0)
    delta = 3.0 * torch.randn(model.cfg.d_model, generator=gen)
    hooks = [("blocks.1.hook_resid_post", lambda a, hook: a + delta)]
    with model.hooks(fwd_hooks=hooks):
        edited, _ = evaluate_zsre(model, records, metric="official", progress=False)
        _check_official(model, records, edited)


def test_official_equals_teacher_forced_without_quirks(tiny_model):
    """Where every decoded prefix re-tokenises to the same ids, the official rows are the
    teacher-forced positions: same log-probabilities, same top-1 outcomes."""
    checked = 0
    for r in load_zsre(limit=12):
        for prompt, answer in _tests(r).values():
            rows = official_rows(tiny_model, prompt, answer)
            base = tiny_model.to_tokens(prompt)[0].tolist()
            forced = tiny_model.tokenizer(" " + answer, add_special_tokens=False)["input_ids"]
            if answer.startswith(" ") or [e for _, e in rows] != forced or any(
                    c != base + forced[:i] for i, (c, _) in enumerate(rows)):
                continue
            official = score_next_tokens(tiny_model, [c for c, _ in rows], [e for _, e in rows])
            teacher = score_token_ids(tiny_model, [base], [forced])
            lp = torch.stack([tiny_model(torch.tensor([base + forced]))[0, len(base) - 1 + j].log_softmax(-1)[t]
                              for j, t in enumerate(forced)]).detach()
            np.testing.assert_allclose(official.mean_logprob.numpy(), lp.numpy(), atol=1e-4)
            assert torch.equal(torch.cat(official.token_correct), teacher.token_correct[0])
            checked += 1
    assert checked >= 10


# ----------------------------------------------------------------- batching
@pytest.mark.parametrize("metric", ZSRE_METRICS)
def test_batching_invariance(tiny_model, metric):
    records = load_zsre(limit=6)
    one, s_one = evaluate_zsre(tiny_model, records, metric=metric, batch_size=1, progress=False)
    many, s_many = evaluate_zsre(tiny_model, records, metric=metric, batch_size=64, progress=False)
    np.testing.assert_array_equal(one[["efficacy", "paraphrase", "specificity"]].to_numpy(),
                                  many[["efficacy", "paraphrase", "specificity"]].to_numpy())
    assert s_one == s_many


def test_next_token_prefix_contexts_share_a_row_and_score_as_alone(tiny_model, monkeypatch):
    """Contexts that are token prefixes of a longer one are read from its forward, each with its own
    label, and score as they would alone."""
    import pmet_lens.evaluation.scoring as scoring

    p = tiny_model.to_tokens("The mother tongue of Danielle Darrieux is")[0].tolist()
    contexts = [p, p + [11], p + [11, 7], p[:3], p + [11], [5, 6], p]
    labels = [11, 7, 9, 42, 8, 1, 12]
    widths = []
    real = tiny_model.forward
    monkeypatch.setattr(tiny_model, "forward", lambda tokens, **kw: widths.append(tuple(tokens.shape)) or real(tokens, **kw))
    shared = scoring.score_next_tokens(tiny_model, contexts, labels, batch_size=8)
    monkeypatch.undo()
    assert widths == [(2, len(p) + 2)]  # one forward of the two rows p+[11, 7] and [5, 6]
    for i, (c, label) in enumerate(zip(contexts, labels)):
        alone = scoring.score_next_tokens(tiny_model, [c], [label])
        assert float(shared.mean_logprob[i]) == pytest.approx(float(alone.mean_logprob[0]), abs=1e-5)
        assert torch.equal(shared.token_correct[i], alone.token_correct[0])
    assert float(shared.mean_logprob[0]) != pytest.approx(float(shared.mean_logprob[6]))


# ----------------------------------------------------------------- labels and errors
@pytest.mark.parametrize("metric", ZSRE_METRICS)
def test_every_output_names_its_metric(tiny_model, metric):
    per_record, summary = evaluate_zsre(tiny_model, load_zsre(limit=2), metric=metric, progress=False)
    assert summary["metric"] == metric and set(per_record["metric"]) == {metric}
    table = format_table({"unedited": summary})
    assert table.loc["unedited", "metric"] == metric
    assert list(table.columns) == ["metric", "score", "efficacy", "paraphrase", "specificity"]


def test_default_metric_is_teacher_forced(tiny_model):
    records = load_zsre(limit=2)
    default, s = evaluate_zsre(tiny_model, records, progress=False)
    assert s["metric"] == "teacher_forced"
    explicit, _ = evaluate_zsre(tiny_model, records, metric="teacher_forced", progress=False)
    assert default.equals(explicit)


def test_bad_metric_and_records(tiny_model):
    with pytest.raises(ValueError, match="unknown zsRE metric 'paper'.*official"):
        evaluate_zsre(tiny_model, load_zsre(limit=1), metric="paper")
    with pytest.raises(ValueError, match="no records"):
        evaluate_zsre(tiny_model, [], metric="official")


# ----------------------------------------------------------------- the real model
@pytest.mark.slow
def test_official_matches_plain_loop_real_model(default_model):
    """On the real default model: two plain records, a leading-space answer, a non-ASCII answer and a
    non-ASCII loc answer, record by record and row by row."""
    records = _quirk_records(loc=True)
    per_record, summary = evaluate_zsre(default_model, records, metric="official", batch_size=7, progress=False)
    assert summary["metric"] == "official"
    _check_official(default_model, records, per_record)
    assert per_record[["efficacy", "paraphrase", "specificity"]].to_numpy().sum() > 0  # not a test of zeros only
