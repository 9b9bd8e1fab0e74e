"""Sequential-editing figures and the dashboard's session view, on synthetic tables."""

from __future__ import annotations

import pandas as pd
import pytest

from pmet_lens.viz.dashboard import session_dashboard
from pmet_lens.viz.sequential import curves_png


def _tables():
    curves = pd.DataFrame([
        {"method": m, "batch": b, "efficacy_batch": 1.0, "efficacy_first": 1.0 - 0.1 * b * (m == "memit"),
         "perplexity": 38 + b, "delta_norm": 9.0, "weight_change_norm": 9.0 * b, "weight_norm": 174 + b}
        for m in ("memit", "alphaedit") for b in (1, 2, 3)])
    eff = pd.DataFrame([
        {"method": m, "after": a, "batch": k, "case_id": 10 * k + i, "p_new": 0.9 - 0.1 * a, "p_true": 0.05,
         "success": float(a < 3 or m == "alphaedit")}
        for m in ("memit", "alphaedit") for a in (1, 2, 3) for k in range(1, a + 1) for i in range(2)])
    return curves, eff


def test_session_view_follows_the_chosen_batch(tmp_path):
    curves, eff = _tables()
    board = session_dashboard(curves, eff, batch=1, html_path=tmp_path / "s.html")
    assert {"per-batch curves", "batch 1 after later batches", "batch 1 edits before / after"} <= set(board.figures)
    table = board.tables["batch 1 edits"]
    assert list(table.columns[-3:]) == [1, 2, 3] and len(table) == 4  # 2 methods x 2 cases of batch 1
    survival = board.figures["batch 1 after later batches"]
    memit = next(t for t in survival.data if t.name == "memit")
    assert list(memit.y) == [1.0, 1.0, 0.0]
    assert (tmp_path / "s.html").stat().st_size > 0
    with pytest.raises(ValueError, match="batch 5"):
        session_dashboard(curves, eff, batch=5)


def test_curves_png_is_written(tmp_path):
    curves, _ = _tables()
    path = curves_png(curves, tmp_path / "c.png")
    assert path.read_bytes()[:4] == b"\x89PNG"
