"""PreparedRequests: the requests tokenised once, and the rows every stage builds from them."""

from __future__ import annotations

import pytest
from editing_helpers import FACT, FACT2

from pmet_lens.core.tokens import encode, subject_last_position, target_ids
from pmet_lens.data import DataError, as_facts
from pmet_lens.editing import prepare_requests


def test_rows_hold_every_template_then_the_kl_prompt(tiny_model):
    prefixes = ("Once upon a time", "I")
    req = prepare_requests(tiny_model, as_facts([FACT, FACT2]), prefixes)
    assert req.templates == ("{}", "Once upon a time. {}", "I. {}")
    rows = req.rows(tiny_model, append_target=True, kl=True)
    assert rows.fact.tolist() == [0, 0, 0, 0, 1, 1, 1, 1] and rows.template.tolist() == [0, 1, 2, -1] * 2
    assert rows.bare.tolist() == [0, 4] and rows.kl.tolist() == [3, 7]
    for r, (i, j) in enumerate(zip(rows.fact.tolist(), rows.template.tolist())):
        fact = req.facts[i]
        tmpl = "{} is a" if j < 0 else req.templates[j].replace("{}", fact.prompt)
        ids = encode(tiny_model, tmpl.format(fact.subject)) + ([] if j < 0 else target_ids(tiny_model, fact.target_new)[:-1])
        assert rows.tokens[r, : rows.lengths[r]].tolist() == ids
        assert rows.lookup[r] == subject_last_position(tiny_model, tmpl, fact.subject)
    plain = req.rows(tiny_model)
    assert plain.template.tolist() == [0, 1, 2] * 2 and plain.kl.numel() == 0
    sub = req.subset([1])
    assert sub.facts == (req.facts[1],) and sub.prompt_ids == (req.prompt_ids[1],)
    assert sub.suffix_length(0) == req.suffix_length(1) == (
        len(req.prompt_ids[1][0]) - req.lookup[1][0] + len(req.target_ids[1]) - 1)


def test_untokenisable_request_names_the_record(tiny_model, monkeypatch):
    import pmet_lens.editing.prepared as prepared

    def nothing(model, target):
        raise ValueError(f"target {target!r} tokenises to nothing")

    monkeypatch.setattr(prepared, "target_ids", nothing)
    with pytest.raises(DataError, match="tokenises to nothing"):
        prepare_requests(tiny_model, as_facts([FACT]), ())
