"""The fast linear layout must give bit-identical outputs (it only changes memory strides)."""

from __future__ import annotations

import pytest
import torch

from pmet_lens.core.fastpath import install_fast_linear, is_fast, uninstall_fast_linear


def _logits(model):
    with torch.no_grad():
        return model(["The Eiffel Tower is located in", "A much longer prompt about many different things, to pad"])


def test_fast_layout_bit_identical_tiny(tiny_model):
    stock = _logits(uninstall_fast_linear(tiny_model))
    fast = _logits(install_fast_linear(tiny_model))
    assert torch.equal(stock, fast)
    assert is_fast(tiny_model)
    uninstall_fast_linear(tiny_model)
    assert not is_fast(tiny_model)


def test_fast_layout_keeps_in_place_updates(tiny_model):
    install_fast_linear(tiny_model)
    w = tiny_model.blocks[0].mlp.W_out
    before = _logits(tiny_model)
    with torch.no_grad():
        w += 0.5
    changed = _logits(tiny_model)
    with torch.no_grad():
        w -= 0.5
    assert not torch.equal(before, changed)
    uninstall_fast_linear(tiny_model)


@pytest.mark.slow
def test_fast_layout_bit_identical_default(default_model):
    assert is_fast(default_model)
    fast = _logits(default_model)
    stock = _logits(uninstall_fast_linear(default_model))
    install_fast_linear(default_model)
    assert torch.equal(stock, fast)
