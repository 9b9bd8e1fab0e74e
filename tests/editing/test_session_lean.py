"""A session's history off the device: ΔW, keys, the originals, P and P·KpKp·P on the CPU, and the
running P·KpKp·P equal to its definition over the kept keys."""

from __future__ import annotations

import torch

from conftest import make_tiny_model
from pmet_lens.editing.covariance import CovarianceStore
from pmet_lens.editing.hparams import AlphaEditHyperParams
from pmet_lens.editing.linsolve import SolveOptions
from pmet_lens.editing.nullspace import NullspaceStore
from pmet_lens.editing.session import EditSession, _change_norm

BATCHES = [
    [{"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English"}],
    [{"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome"},
     {"subject": "Toko Yasuda", "prompt": "{}, who plays the instrument called the", "target_new": "piano"}],
]


def test_session_state_is_on_the_cpu_and_prev_is_the_projected_gram(tmp_path):
    model = make_tiny_model(True, "LN", False)
    hp = AlphaEditHyperParams(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=3, prefix_len=3,
                              context_prefixes=("Once upon a time",), nullspace_threshold=0.05, l2=1.0)
    session = EditSession(model, hparams=hp, cov_store=CovarianceStore(tmp_path, progress=False),
                          nullspace_store=NullspaceStore(False), progress=False,
                          solve_options=SolveOptions(float64_device="cpu"))
    for facts in BATCHES:
        session.edit(facts)
    tensors = [*session.covs.values(), *(p.P for p in session.projections.values()), *session.prev.values(),
               *session.originals.values()]
    for record in session.history:
        tensors += [*record.deltas.values(), *record.keys.values()]
    assert tensors and all(t.device.type == "cpu" for t in tensors)
    for hook, proj in session.projections.items():
        P = proj.P.double()
        expected = sum(P @ r.keys[hook].T @ r.keys[hook] @ P for r in session.history)
        torch.testing.assert_close(session.prev[hook], expected, rtol=1e-9, atol=1e-12)
    for name, original in session.originals.items():
        param = dict(model.named_parameters())[name].detach()
        direct = float((param.double() - original.double()).norm())
        assert direct > 0 and abs(_change_norm(param, original, rows=5) - direct) <= 1e-12 * direct
        assert session.history[-1].metrics["weight_change_norm"][name] == _change_norm(param, original)
