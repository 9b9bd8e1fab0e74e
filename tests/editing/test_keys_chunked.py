"""request_keys over a PromptRun in chunks of rows (a token budget) equals one forward over all rows."""

from __future__ import annotations

import pytest
import torch
from editing_helpers import FACT, FACT2, FACT3

from pmet_lens.core.arch import architecture
from pmet_lens.data import as_facts
from pmet_lens.editing import prepare_requests, request_keys
from pmet_lens.editing.keys import PromptRun
from pmet_lens.editing.site import edit_site


def test_chunked_keys_equal_one_forward(tiny_model):
    requests = prepare_requests(tiny_model, as_facts([FACT, FACT2, FACT3]), ("Once upon a time", "I think"))
    arch = architecture(tiny_model)
    sites = [edit_site(arch, "W_out", 1), edit_site(arch, "W_O", 2), edit_site(arch, "W_out", 2)]
    outputs = [arch.mlp_out_hook(2)]
    rows = requests.rows(tiny_model)
    whole = PromptRun.build(tiny_model, requests, 1, max_tokens=10**9)
    assert len(whole.chunks) == 1
    one = request_keys(tiny_model, requests, sites, outputs=outputs, stop_layer=3, run=whole)
    widest = int(rows.lengths.max())
    for budget in (1, 2 * widest, 3 * widest + 1):
        run = PromptRun.build(tiny_model, requests, 1, max_tokens=budget)
        sizes = [resid.shape[0] for _, resid in run.chunks]
        assert sum(sizes) == rows.tokens.shape[0] and len(sizes) > 1
        assert all(resid.shape[0] * resid.shape[1] <= max(budget, resid.shape[1]) for _, resid in run.chunks)
        chunked = request_keys(tiny_model, requests, sites, outputs=outputs, stop_layer=3, run=run)
        for site in sites:
            torch.testing.assert_close(chunked.keys[site], one.keys[site], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(chunked.outputs[outputs[0]], one.outputs[outputs[0]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="max_tokens"):
        PromptRun.build(tiny_model, requests, 1, max_tokens=0)
