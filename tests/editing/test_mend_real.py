"""Integration: the MEND networks shipped for the default model edit it (CounterFact report facts and
zsRE eval records, none seen in training), through edit() and the CLI, and restore bit for bit."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from pmet_lens.core.tokens import encode, target_ids
from pmet_lens.data import load_zsre
from pmet_lens.data.splits import split_facts
from pmet_lens.editing import edit, preset

N_FACTS = 8
UNRELATED = "The Eiffel Tower is located in the city of"
# what the shipped networks achieve on these 8 facts each, edited alone: the mean log P(o*) during the edit is above
# this (measured: CounterFact report facts -8.7 before, -0.30 during; zsRE eval records -7.4 before, -0.76 during)
LOGP_AFTER = {"counterfact": -1.0, "zsre": -1.5}


def _logprob(model, text, target):
    """Mean log-probability of ``target``'s tokens after ``text``."""
    ids, tg = encode(model, text), target_ids(model, target)
    with torch.no_grad():
        lp = model(torch.tensor([ids + tg[:-1]]))[0].log_softmax(-1)
    return sum(lp[len(ids) - 1 + k, t].item() for k, t in enumerate(tg)) / len(tg)


def _next_logprobs(model, text):
    with torch.no_grad():
        return model(torch.tensor([encode(model, text)]))[0, -1].log_softmax(-1)


def _facts(network):
    if network == "counterfact":
        return split_facts("report", limit=N_FACTS)
    return [r.to_fact() for r in load_zsre(limit=N_FACTS)]


@pytest.fixture(scope="module", params=["counterfact", "zsre"])
def single_edits(request, default_model):
    """Each fact edited alone with the shipped network: log P(o*) on its prompt before and during the
    edit, and whether W_out came back bit for bit."""
    model = default_model
    hp = preset(str(model.cfg.model_name), "mend").with_(network=request.param)
    facts = _facts(request.param)
    before_w = {k: v.clone() for k, v in model.state_dict().items() if "W_out" in k}
    rows = []
    base = _next_logprobs(model, UNRELATED)
    for f in facts:
        lp0 = _logprob(model, f.text, f.target_new)
        with edit(model, [f], hparams=hp, progress=False) as result:
            lp1 = _logprob(model, f.text, f.target_new)
            norms = [r["relative"] for r in result.delta_norms()]
            kl = float((base.exp() * (base - _next_logprobs(model, UNRELATED))).sum())
        rows.append((lp0, lp1, norms, kl))
    after = model.state_dict()
    restored = all(torch.equal(v, after[k]) for k, v in before_w.items())
    return request.param, hp, rows, restored


@pytest.mark.slow
def test_shipped_network_raises_the_new_objects_probability(single_edits):
    network, hp, rows, restored = single_edits
    assert restored
    assert hp.layers == (27, 28, 29)  # the last 3 blocks, read from the network file
    print(network, "log P(o*) before / during each edit, max ‖ΔW‖/‖W‖, KL on an unrelated prompt:",
          [(round(a, 2), round(b, 2), round(max(n), 4), round(k, 4)) for a, b, n, k in rows])
    assert all(lp1 > lp0 for lp0, lp1, _, _ in rows)  # every single edit raises P(o*) on its prompt
    assert sum(lp1 for _, lp1, _, _ in rows) / len(rows) > LOGP_AFTER[network]
    assert all(0 < n < 0.25 for _, _, norms, _ in rows for n in norms)  # ‖ΔW‖/‖W‖: at most 13% on these facts
    # the next-token distribution after an unrelated prompt moves little on average (one CounterFact edit: KL 0.14)
    assert sum(k for *_, k in rows) / len(rows) < 0.05


@pytest.mark.slow
def test_cli_edits_with_mend(tmp_path):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([f.to_counterfact() for f in split_facts("report", limit=2)]))
    out = subprocess.run([sys.executable, "-m", "pmet_lens.cli", "edit", "--facts", str(facts), "--method", "mend",
                          "--hparams", '{"network": "zsre"}', "--out", str(tmp_path / "d.safetensors")],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr
    from safetensors import safe_open

    with safe_open(str(tmp_path / "d.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        names = sorted(k for k in fh.keys() if k.startswith("delta/"))
    assert meta["method"] == "mend" and json.loads(meta["hparams"])["network"] == "zsre"
    assert names == [f"delta/blocks.{l}.mlp.W_out" for l in (27, 28, 29)]
