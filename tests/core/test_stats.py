"""The one 95% confidence interval (pmet_lens.core.stats.mean_ci95): hand-computed cases, the
n = 0 / n = 1 rule, and agreement with the formulas the tables used before it existed."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from pmet_lens.core.stats import Z95, mean_ci95


def test_n2_by_hand():
    # values 1 and 3: mean 2, s = sqrt(((1-2)^2 + (3-2)^2) / 1) = sqrt(2), half = 1.96 * sqrt(2) / sqrt(2)
    mean, half = mean_ci95([1.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(1.96, abs=1e-12)
    assert isinstance(mean, float) and isinstance(half, float)


def test_n3_by_hand():
    # 2, 4, 9: mean 5, s^2 = (9 + 1 + 16) / 2 = 13
    mean, half = mean_ci95([2.0, 4.0, 9.0])
    assert mean == 5.0
    assert half == pytest.approx(Z95 * math.sqrt(13) / math.sqrt(3), rel=1e-12)


def test_n1_has_no_interval_and_n0_no_mean():
    mean, half = mean_ci95([0.7])
    assert mean == 0.7 and math.isnan(half)
    mean, half = mean_ci95([])
    assert math.isnan(mean) and math.isnan(half)
    m, h = mean_ci95(torch.tensor([[0.5, 1.0]]))
    assert m.tolist() == [0.5, 1.0] and np.isnan(h).all()


def test_missing_values_are_skipped():
    # None / NaN / inf are measurements not taken: the result is that of the finite values alone
    assert mean_ci95([1.0, None, 3.0, float("nan"), float("inf")]) == mean_ci95([1.0, 3.0])
    assert mean_ci95(pd.Series([1.0, np.nan, 3.0])) == mean_ci95([1.0, 3.0])
    x = torch.tensor([[1.0, 5.0], [float("nan"), 7.0], [3.0, 9.0]])
    m, h = mean_ci95(x)  # column 0 has n = 2, column 1 n = 3
    assert m[0] == 2.0 and h[0] == pytest.approx(1.96)
    assert m[1] == 7.0 and h[1] == pytest.approx(Z95 * 2.0 / math.sqrt(3))


def test_z_is_the_normal_quantile_to_two_decimals():
    """Z95 is the two-sided 95% quantile of the standard normal rounded to two decimals (1.96, as ROME,
    MEMIT and PMET use it), not a nearby value: the quantile comes from the inverse CDF here."""
    from statistics import NormalDist

    quantile = NormalDist().inv_cdf(0.975)
    assert abs(quantile - 1.959963984540054) < 1e-12
    assert Z95 == round(quantile, 2) == 1.96
    assert NormalDist().cdf(Z95) - NormalDist().cdf(-Z95) == pytest.approx(0.95, abs=1e-4)


def test_agrees_with_the_old_formulas():
    """The three formulas it replaces (evaluate, averaged traces, Fig. 2 summary), for n > 1."""
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(37, 6, 2, generator=gen)
    n = x.shape[0]
    m, h = mean_ci95(x)
    # analysis/averaged.py: torch, float64, z = 1.96
    old_m, old_h = x.double().mean(0), 1.96 * x.double().std(0, unbiased=True) / math.sqrt(n)
    np.testing.assert_allclose(m, old_m.numpy(), rtol=0, atol=1e-15)
    np.testing.assert_allclose(h, old_h.numpy(), rtol=1e-13, atol=0)
    # analysis/similarity.py used the exact quantile: the intervals agree to 2e-5 relative
    sim_h = 1.959963984540054 * (x.double().std(0, unbiased=True) / math.sqrt(n))
    np.testing.assert_allclose(h, sim_h.numpy(), rtol=2e-5, atol=0)
    # evaluation/evaluate.py: numpy over the finite values of a list
    values = x[:, 0, 0].tolist()
    arr = np.asarray(values)
    assert mean_ci95(values) == (float(arr.mean()), float(1.96 * arr.std(ddof=1) / math.sqrt(arr.size)))


def test_rejects_a_scalar_array():
    with pytest.raises(ValueError, match="first axis"):
        mean_ci95(np.array(1.0))


def test_paired_ci95_by_hand_and_aligned_on_the_record():
    from pmet_lens.core.stats import paired_ci95

    a = pd.DataFrame({"case_id": [1, 2, 3], "eff": [1.0, 1.0, 0.0]})
    b = pd.DataFrame({"case_id": [3, 2, 1], "eff": [0.0, 0.0, 0.0]})  # other order: pairs by case_id
    row = paired_ci95(a, b, ["eff"]).iloc[0]
    # differences 1, 1, 0: mean 2/3, s^2 = ((1/3)^2 * 2 + (2/3)^2) / 2 = 1/3
    assert row["n"] == 3 and row["difference"] == pytest.approx(2 / 3)
    assert row["ci95"] == pytest.approx(Z95 * math.sqrt(1 / 3) / math.sqrt(3))
    # a shared between-record spread cancels: a constant shift has zero half-width
    c = pd.DataFrame({"case_id": [1, 2, 3], "eff": [0.9, 0.1, 0.5]})
    shifted = c.assign(eff=c["eff"] + 0.25)
    row = paired_ci95(shifted, c, ["eff"]).iloc[0]
    assert row["difference"] == pytest.approx(0.25) and row["ci95"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no column"):
        paired_ci95(a, b, ["spe"])
    with pytest.raises(ValueError, match="repeats records"):
        paired_ci95(pd.concat([a, a]), b, ["eff"])
