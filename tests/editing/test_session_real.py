"""Integration: a three-batch AlphaEdit session on the real default model."""

from __future__ import annotations

import pytest
import torch

from conftest import real_hparams
from pmet_lens.data.splits import split_facts
from pmet_lens.editing.session import EditSession
from pmet_lens.evaluation.sequential import batch_efficacy


@pytest.mark.slow
def test_three_alphaedit_batches_survive_and_undo_to_one_is_exact(default_model, real_cov_store, real_nullspace_store):
    """The preset's AlphaEdit (τ, α, optimisation) with the suite's C (8192 tokens, built once per session)."""
    model = default_model
    facts = split_facts("tune", limit=12)
    batches = [facts[0:4], facts[4:8], facts[8:12]]
    session = EditSession(model, hparams=real_hparams("alphaedit"), cov_store=real_cov_store,
                          nullspace_store=real_nullspace_store, progress=False)
    try:
        session.edit(batches[0])
        after1 = {n: _param(model, n).clone() for n in session.originals}
        for batch in batches[1:]:
            session.edit(batch)
        eff = batch_efficacy(model, batches, after=3)
        per_batch = eff.groupby("batch")["success"].mean()
        # each batch's edits still succeed after the later batches (3 of 4 facts at least)
        assert (per_batch >= 0.75).all(), per_batch.to_dict()
        session.undo(to=1)
        assert all(torch.equal(_param(model, n), w) for n, w in after1.items())
    finally:
        session.undo(to=0)
    assert all(torch.equal(_param(model, n), w) for n, w in session.originals.items())


def _param(model, name):
    from pmet_lens.core.arch import architecture
    from pmet_lens.editing.site import site_of_param

    return site_of_param(architecture(model), name).param(model).detach()
