"""The dashboard builds its figures before/after an edit (applied or as hooks) and writes a
self-contained HTML report; the weights are left as they were."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.data import Fact, load_counterfact
from pmet_lens.editing import EditResult
from pmet_lens.evaluation import evaluate_counterfact
from pmet_lens.viz.dashboard import dashboard


@pytest.fixture(scope="module")
def tiny():
    """One tiny variant (the dashboard only reads hooks every variant has)."""
    from conftest import TINY_VARIANTS, make_tiny_model

    return make_tiny_model(*TINY_VARIANTS["par-ln"])


def _fact() -> Fact:
    f = load_counterfact(limit=1)[0]
    return Fact(**{**f.__dict__, "neighborhood_prompts": f.neighborhood_prompts[:2]})


def test_dashboard_before_after(tiny, tmp_path):
    fact = _fact()
    gen = torch.Generator().manual_seed(0)
    w = tiny.blocks[1].mlp.W_out
    result = EditResult(model=tiny, method="pmet", deltas={"blocks.1.mlp.W_out": 3 * torch.randn(w.shape, generator=gen)},
                        targets={}, facts=[fact], hparams={}, model_hash="test")
    before = w.detach().clone()
    per_record, _ = evaluate_counterfact(tiny, [fact], generation=False, progress=False)
    board = dashboard(tiny, fact, result, batch={"unedited": per_record}, html_path=tmp_path / "r.html")
    assert torch.equal(w, before)  # previewed as hooks, weights untouched
    probs = board.tables["probabilities"]
    assert set(probs["phase"]) == {"before", "after"}
    b = probs[(probs.phase == "before")]["p"].to_numpy()
    a = probs[(probs.phase == "after")]["p"].to_numpy()
    assert not (abs(a - b) < 1e-9).all()  # the edit changes something
    assert len(board.tables["logit_lens"]) == 2 * 2 * tiny.cfg.n_layers
    assert board.tables["delta_norms"]["layer"].tolist() == [1]
    assert any(k.startswith("Attention patterns") for k in board.attention)
    page = (tmp_path / "r.html").read_text()
    assert "plotly" in page.lower() and "CircuitsVis" in page
    assert '<script src="http' not in page  # self-contained: no external scripts
    # applied edit: same 'after' numbers, weights restored to applied state afterwards
    with result:
        board2 = dashboard(tiny, fact, result)
        assert result.applied
    a2 = board2.tables["probabilities"].query("phase == 'after'")["p"].to_numpy()
    assert abs(a2 - a).max() < 1e-4
    assert torch.equal(w, before)


def test_dashboard_without_edit(tiny):
    board = dashboard(tiny, _fact())
    assert set(board.tables["probabilities"]["phase"]) == {"model"}
    assert "Per-layer ΔW norms" not in board.figures
