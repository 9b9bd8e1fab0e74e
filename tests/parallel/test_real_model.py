"""The real default model on 2 workers: a 16-record CounterFact evaluation (with generation) equals the
single process's."""

from __future__ import annotations

import numpy as np
import pytest

from pmet_lens.data.splits import split_facts
from pmet_lens.evaluation.counterfact import evaluate_counterfact


@pytest.mark.slow
def test_sixteen_record_evaluation_on_two_workers_equals_one_process(pool, default_model):
    records = split_facts("report", limit=16)
    kwargs = dict(generation=True, gen_every=4, progress=False)
    single, s_sum = evaluate_counterfact(default_model, records, **kwargs)
    sharded, p_sum = evaluate_counterfact(default_model, records, **kwargs, workers=pool)
    success = [c for c in single.columns if c.endswith("_success")]
    assert single[success].equals(sharded[success])  # identical success flags
    numeric = single.select_dtypes("number").columns
    diff = np.nanmax(np.abs(single[numeric].to_numpy(float) - sharded[numeric].to_numpy(float)))
    print(f"16 records, 2 workers vs one process: max |diff| of per-record scores {diff:.1e}")
    assert np.array_equal(np.isnan(single[numeric].to_numpy(float)), np.isnan(sharded[numeric].to_numpy(float)))
    assert diff <= 1e-5
    assert s_sum["n_generation"] == p_sum["n_generation"] == 4
