"""Data records and loaders: shipped files load; bad records fail loudly and name the record."""

from __future__ import annotations

import json

import pytest

from pmet_lens.data import (
    DataError,
    Fact,
    as_facts,
    load_counterfact,
    load_known_facts,
    load_zsre,
    load_zsre_train,
    read_records,
    wikitext_path,
)


def test_shipped_files_load():
    known = load_known_facts()
    assert len(known) == 1209 and known[0].subject == "Vinson Massif"
    cf = load_counterfact()
    assert len(cf) == 869 and cf[0].subject == "Danielle Darrieux"
    assert cf[0].text == "The mother tongue of Danielle Darrieux is"
    assert (cf[0].target_new, cf[0].target_true) == ("English", "French")
    assert len(cf[0].paraphrase_prompts) == 2 and len(cf[0].neighborhood_prompts) == 10
    zs = load_zsre()
    assert len(zs) == 1208 and zs[0].loc.startswith("nq question: ")
    assert zs[0].to_fact().text == zs[0].src
    assert all(p.is_file() for p in wikitext_path())


def test_zsre_target_is_alt_or_the_recorded_answer(tmp_path):
    """target="alt" edits towards the file's alternative answer, target="answer" towards answers[0]
    (the released ROME / MEMIT loaders); everything else about the record is the same."""
    alt, answer = load_zsre(limit=3), load_zsre(limit=3, target="answer")
    assert alt[0].target_new == "2006" and answer[0].target_new == "1998"  # the shipped record #0
    for a, b in zip(alt, answer):
        assert b.target_new == b.answers[0] and a.answers == b.answers
        assert (a.src, a.rephrase, a.loc, a.loc_ans, a.case_id) == (b.src, b.rephrase, b.loc, b.loc_ans, b.case_id)
        assert a.to_fact().target_new == a.target_new and b.to_fact().target_new == b.target_new
        assert a.to_fact().target_true == a.answers[0] and b.to_fact().target_true is None
    with pytest.raises(ValueError, match="unknown zsRE target 'answers'.*'alt', 'answer'"):
        load_zsre(limit=1, target="answers")  # type: ignore[arg-type]
    rec = {"subject": "Zeus", "src": "Who is Zeus's father?", "rephrase": "Who fathered Zeus?", "alt": "Kronos",
           "answers": [], "loc": "nq question: who wrote hamlet", "loc_ans": "Shakespeare"}
    path = tmp_path / "z.json"
    path.write_text(json.dumps([rec]))
    assert load_zsre(path)[0].target_new == "Kronos"
    with pytest.raises(DataError, match=r"zsRE record #0 has an empty 'answers' list.*target='alt'"):
        load_zsre(path, target="answer")


def test_zsre_record_whose_alt_repeats_its_answer_is_an_edit_without_a_true_target():
    """34 shipped records have alt == answers[0] up to spaces (the first is #112, "male"); they edit like the rest."""
    same = [r for r in load_zsre() if r.target_new.strip() == r.answers[0].strip()]
    assert len(same) == 34 and same[0].case_id == 112 and same[0].target_new == "male"
    facts = [r.to_fact() for r in same]
    # no true target, so the editors' "target_new equals the true target" check has nothing to reject
    assert all(f.target_true is None and f.target_new == r.target_new for f, r in zip(facts, same))


def test_zsre_training_records_are_apart_from_the_eval_subset():
    """The shipped training split (MEND's editor network trains on it) loads without its two records whose
    alt is empty, keeps file positions as case ids, and shares no question with the eval subset."""
    train = load_zsre_train()
    assert len(train) == 998 and {534, 723}.isdisjoint(r.case_id for r in train) and train[-1].case_id == 999
    assert len(load_zsre_train(target="answer")) == 1000 and len(load_zsre_train(limit=10)) == 10
    assert {(r.subject, r.src) for r in train}.isdisjoint((r.subject, r.src) for r in load_zsre())


def test_known_fact_to_fact_keeps_prompt():
    k = load_known_facts(limit=3)
    assert [f.to_fact().text for f in k] == [x.prompt for x in k]


def test_limit_and_user_path(tmp_path):
    cf = load_counterfact(limit=5)
    path = tmp_path / "cf.json"
    path.write_text(json.dumps([f.to_counterfact() for f in cf]))
    again = load_counterfact(path)
    assert [f.text for f in again] == [f.text for f in cf]
    with pytest.raises(ValueError, match="limit must be >= 0, got -1"):
        load_counterfact(limit=-1)


@pytest.mark.parametrize("bad, match", [
    (dict(subject="Paris", prompt="{} is in", target_new=" "), "target_new is empty"),
    (dict(subject="Paris", prompt="Paris is in", target_new="France"), "exactly one"),
    (dict(subject="", prompt="{} is in", target_new="France"), "subject is empty"),
    (dict(subject="X", prompt="{} and {}", target_new="France"), "exactly one"),
    (dict(subject="X", prompt="{} is", target_new="Y", target_true=""), "target_true is empty"),
    (dict(subject="X", prompt="The {x} of {} is", target_new="Y"), "no other replacement field"),
    (dict(subject="X", prompt="{} scored 3} goals", target_new="Y"), "unmatched brace"),
])
def test_bad_fact(bad, match):
    with pytest.raises(DataError, match=match):
        Fact(**bad, case_id=7)


def test_literal_braces_in_a_template():
    fact = Fact(subject="X", prompt="In {{braces}}, {} is", target_new="Y")
    assert fact.text == "In {braces}, X is"


def test_bad_counterfact_records_named(tmp_path):
    rec = load_counterfact(limit=1)[0].to_counterfact()
    del rec["requested_rewrite"]["subject"]
    with pytest.raises(DataError, match=r"case_id=0.*requested_rewrite.subject"):
        Fact.from_counterfact(rec)
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_counterfact(path)
    path.write_text(json.dumps([{"known_id": 3, "subject": "Zeus", "prompt": "Apollo is a", "attribute": "god",
                                 "template": "{} is a", "relation_id": "P1"}]))
    with pytest.raises(DataError, match=r"known_id=3.*does not occur"):
        load_known_facts(path)
    path.write_text(json.dumps([{"known_id": 7, "subject": "Zeus"}]))
    with pytest.raises(DataError, match=r"known fact #0 \(known_id=7\): missing field\(s\) \['prompt'"):
        load_known_facts(path)
    path.write_text(json.dumps([{"subject": "Zeus"}]))
    with pytest.raises(DataError, match=r"zsRE record #0: missing field"):
        load_zsre(path)
    path.write_text(json.dumps(["Zeus"]))
    with pytest.raises(DataError, match=r"zsRE record #0: expected a JSON object"):
        load_zsre(path)
    with pytest.raises(FileNotFoundError, match=r"CounterFact file not found: .*nope\.json"):
        load_counterfact(tmp_path / "nope.json")


def test_as_facts():
    cf = load_counterfact(limit=2)
    facts = as_facts([cf[0].to_counterfact(), cf[1], {"subject": "Paris", "prompt": "{} is the capital of", "target_new": "Italy"}])
    assert [f.subject for f in facts] == ["Danielle Darrieux", cf[1].subject, "Paris"]
    with pytest.raises(TypeError, match="single record"):
        as_facts(cf[0])
    with pytest.raises(DataError, match="unknown field"):
        as_facts([{"subject": "Paris", "prompt": "{} is", "target": "x"}])


def test_read_records_json_jsonl_and_a_lone_object(tmp_path):
    recs = [load_counterfact(limit=2)[i].to_counterfact() for i in range(2)]
    as_json, as_jsonl = tmp_path / "r.json", tmp_path / "r.jsonl"
    as_json.write_text(json.dumps(recs))
    as_jsonl.write_text("\n".join(json.dumps(r) for r in recs) + "\n\n")
    assert read_records(as_json) == read_records(as_jsonl) == recs
    assert [f.case_id for f in load_counterfact(as_jsonl)] == [r["case_id"] for r in recs]
    # one record without the list around it: say so, rather than failing on its fields
    lone = tmp_path / "lone.json"
    lone.write_text(json.dumps(recs[0]))
    with pytest.raises(DataError, match=r"facts file .*lone.json must hold a JSON list of records, got a JSON object"):
        read_records(lone, "facts")
    with pytest.raises(DataError, match="must hold a JSON list of records"):
        load_counterfact(lone)
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(recs[0]) + "\n{oops\n")
    with pytest.raises(DataError, match=r"bad.jsonl, line 2: not valid JSON"):
        read_records(bad_line)
    with pytest.raises(FileNotFoundError, match="CounterFact file not found"):
        load_counterfact(tmp_path / "missing.json")
