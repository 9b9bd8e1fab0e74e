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
    """An in-place update of a weight in the fast layout (as an edit writes ΔW) gives the logits of the
    stock layout with the same update, bit for bit, and the update survives switching layouts."""
    from conftest import TINY_VARIANTS, make_tiny_model

    variant = next(v for v, args in TINY_VARIANTS.items() if args == (tiny_model.cfg.parallel_attn_mlp,
                                                                       tiny_model.cfg.normalization_type,
                                                                       tiny_model.cfg.gated_mlp))
    stock = uninstall_fast_linear(make_tiny_model(*TINY_VARIANTS[variant]))  # the same weights, stock layout
    install_fast_linear(tiny_model)
    assert torch.equal(_logits(stock), _logits(tiny_model))
    update = 0.5 * torch.randn(tiny_model.blocks[0].mlp.W_out.shape, generator=torch.Generator().manual_seed(0))
    before, saved = _logits(tiny_model), tiny_model.blocks[0].mlp.W_out.detach().clone()
    with torch.no_grad():
        tiny_model.blocks[0].mlp.W_out += update
        stock.blocks[0].mlp.W_out += update
    changed = _logits(tiny_model)
    assert torch.equal(changed, _logits(stock))
    assert (changed - before).abs().max() > 1e-3
    assert torch.equal(_logits(uninstall_fast_linear(tiny_model)), changed)
    with torch.no_grad():
        tiny_model.blocks[0].mlp.W_out.copy_(saved)
    assert torch.equal(_logits(tiny_model), before)


@pytest.mark.slow
def test_fast_layout_bit_identical_default(default_model):
    assert is_fast(default_model)
    fast = _logits(default_model)
    stock = _logits(uninstall_fast_linear(default_model))
    install_fast_linear(default_model)
    assert torch.equal(stock, fast)
