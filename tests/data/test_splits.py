"""The fixed CounterFact tune / report split (pmet_lens.data.splits)."""

from __future__ import annotations

import random

import pytest

from pmet_lens.data import load_counterfact
from pmet_lens.data.splits import load_split, split_facts


@pytest.fixture(scope="module")
def case_ids() -> list[int]:
    return [f.case_id for f in load_counterfact()]


def test_parts_are_disjoint_and_cover_the_subset(case_ids):
    split = load_split()
    assert not set(split.tune) & set(split.report)
    assert set(split.tune) | set(split.report) == set(case_ids)
    assert len(split.tune) + len(split.report) == len(case_ids)  # no id listed twice
    assert len(set(split.tune)) == len(split.tune) and len(set(split.report)) == len(split.report)


def test_split_is_the_documented_deterministic_draw(case_ids):
    """random.Random(seed).shuffle of the sorted case ids; the first 100 are the tune part."""
    split = load_split()
    ids = sorted(case_ids)
    random.Random(split.seed).shuffle(ids)
    assert sorted(ids[:100]) == sorted(split.tune)
    assert sorted(ids[100:]) == sorted(split.report)
    assert load_split() == split


def test_split_facts(case_ids):
    split = load_split()
    tune = split_facts("tune")
    assert [f.case_id for f in tune] == sorted(split.tune)  # case-id order
    assert [f.case_id for f in split_facts("report", limit=5)] == sorted(split.report)[:5]
    with pytest.raises(ValueError, match="'tune' or 'report'"):
        split_facts("test")
