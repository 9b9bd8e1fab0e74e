"""Shared data and helpers of the editing tests (tiny random models, see conftest.make_tiny_model)."""

from __future__ import annotations

import torch

from pmet_lens.editing import CovarianceStore, PMETHyperParams

FACT = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English",
        "target_true": "French"}
FACT2 = {"subject": "Eiffel Tower", "prompt": "The {} is located in", "target_new": "Rome", "target_true": "Paris"}
FACT3 = {"subject": "Toko Yasuda", "prompt": "{}, who plays the instrument called the", "target_new": "electric piano",
         "target_true": "guitar"}


def hp_(cls=PMETHyperParams, **kw):
    base = dict(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=8, prefix_len=3, lam=0.5,
                context_prefixes=("Once upon a time", "I think"))
    base.update(kw)
    return cls(**base)


def new_store(tmp_path_factory) -> CovarianceStore:
    """A covariance store cached on disk in a temporary folder (one per test module: its ``store`` fixture)."""
    return CovarianceStore(tmp_path_factory.mktemp("cov"), progress=False)


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def no_hooks(model):
    return all(not hp.fwd_hooks and not hp.bwd_hooks for hp in model.hook_dict.values())


def same(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)
