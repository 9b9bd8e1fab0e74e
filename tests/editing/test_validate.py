"""Bad edit requests are rejected before any weight changes."""

from __future__ import annotations

import pytest
from editing_helpers import FACT, FACT2, hp_, new_store, no_hooks, same, snapshot

from pmet_lens.data import DataError
from pmet_lens.editing import edit


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return new_store(tmp_path_factory)



BAD = [
    ({**FACT, "prompt": "The mother tongue of X is"}, DataError),          # no {} -> subject not in prompt
    ({**FACT, "target_new": "   "}, DataError),
    ({**FACT, "target_new": ""}, DataError),
    ({**FACT, "target_new": "French"}, DataError),                         # equals the true target
]


@pytest.mark.parametrize("bad,exc", BAD)
def test_bad_input_raises_before_weights_change(tiny_model, store, bad, exc):
    before = snapshot(tiny_model)
    with pytest.raises(exc):
        edit(tiny_model, [FACT2, bad], hparams=hp_(), cov_store=store, progress=False)
    assert same(before, snapshot(tiny_model)) and no_hooks(tiny_model)
