"""The read-out of a bfloat16 / float16 model is taken in float32 (issue 34): logits equal the float32
product of the model's own final norm output with W_U, in slices or whole, with the same gradient."""

from __future__ import annotations

import pytest
import torch

import pmet_lens.core.readout as readout
from conftest import make_tiny_model
from pmet_lens.core.readout import final_logits, float32_matmul


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half_model(request):
    model = make_tiny_model(False, "RMS", True)
    return model.to(request.param)


def _reference(model, resid):
    x = model.ln_final(resid.reshape(-1, 1, resid.shape[-1]))
    return (x.float() @ model.unembed.W_U.float() + model.unembed.b_U.float()).reshape(*resid.shape[:-1], -1)


def test_half_model_logits_are_float32_products(half_model):
    resid = torch.randn(3, 5, half_model.cfg.d_model).to(half_model.cfg.dtype)
    with torch.no_grad():
        logits = final_logits(half_model, resid)
        assert logits.dtype == torch.float32 and logits.shape == (3, 5, half_model.cfg.d_vocab)
        torch.testing.assert_close(logits, _reference(half_model, resid), rtol=1e-6, atol=1e-5)
        # the model's own half-precision logits agree up to their rounding
        torch.testing.assert_close(half_model.unembed(half_model.ln_final(resid)).float(), logits, rtol=0.02, atol=0.05)


def test_sliced_product_and_its_gradient(half_model, monkeypatch):
    """float32_matmul casts W one column slice at a time; value and gradient equal the whole product."""
    W = half_model.unembed.W_U.detach()
    x = torch.randn(4, W.shape[0]).to(W.dtype).requires_grad_(True)
    g = torch.randn(4, W.shape[1])
    whole = x.float() @ W.float()
    (whole * g).sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    monkeypatch.setattr(readout, "_CHUNK_ENTRIES", 16 * 1000)  # ~1000 columns per slice: 50 slices
    sliced = float32_matmul(x, W)
    (sliced * g).sum().backward()
    torch.testing.assert_close(sliced, whole, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x.grad, expected_grad)


def test_float32_model_read_out_is_unchanged(tiny_model):
    resid = torch.randn(2, tiny_model.cfg.d_model)
    with torch.no_grad():
        assert torch.equal(final_logits(tiny_model, resid), tiny_model.unembed(tiny_model.ln_final(resid[:, None]))[:, 0])
