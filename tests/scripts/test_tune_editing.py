"""analyses/tune_editing.py: how the best setting is picked."""

from __future__ import annotations

import pandas as pd

from conftest import load_analysis
from pmet_lens.editing import PMETHyperParams


def _rows(scores: dict[tuple[int, float, float], float]) -> pd.DataFrame:
    return pd.DataFrame([{"method": "pmet", "clamp": 1.5, "steps": steps, "lr": lr, "cov_tokens": 100_000,
                          "lam": lam, "score": score} for (steps, lr, lam), score in scores.items()])


def test_pick_best_takes_the_highest_score():
    base = PMETHyperParams(steps=30, lr=0.2, lam=30.0, clamp_norm_factor=1.5, cov_tokens=100_000)
    best = load_analysis("tune_editing").pick_best(_rows({(15, 0.1, 10.0): 0.90, (30, 0.2, 30.0): 0.85, (60, 0.4, 100.0): 0.80}), base)
    assert (best["steps"], best["lr"], best["lam"], best["score"]) == (15, 0.1, 10.0, 0.90)


def test_pick_best_breaks_ties_towards_the_preset_not_the_grid_order():
    base = PMETHyperParams(steps=30, lr=0.2, lam=30.0, clamp_norm_factor=1.5, cov_tokens=100_000)
    tied = {(15, 0.2, 10.0): 0.85, (30, 0.2, 10.0): 0.85, (30, 0.2, 30.0): 0.85, (60, 0.2, 100.0): 0.85,
            (30, 0.4, 300.0): 0.70}
    best = load_analysis("tune_editing").pick_best(_rows(tied), base)
    assert (best["steps"], best["lr"], best["lam"]) == (30, 0.2, 30.0)
    del tied[(30, 0.2, 30.0)]  # without the preset itself, the nearest tied setting wins
    best = load_analysis("tune_editing").pick_best(_rows(tied), base)
    assert (best["steps"], best["lr"], best["lam"]) == (30, 0.2, 10.0)
