"""CovarianceStore's bounded working set: layers grouped into corpus passes, C kept on the CPU."""

from __future__ import annotations

import torch

from pmet_lens.core.tokens import pad
from pmet_lens.editing.covariance import CovarianceStore

HOOKS = ["blocks.1.mlp.hook_post", "blocks.3.mlp.hook_post", "blocks.2.attn.hook_z"]


def _reference(model, store, hooks, n_tokens, seq_len):
    """E[k kᵀ] over the store's corpus chunks from one cached forward of all of them, in float64."""
    chunks = store._chunks(model, n_tokens, seq_len)
    batch = pad(model, chunks)
    _, cache = model.run_with_cache(batch.tokens, names_filter=lambda n: n in hooks)
    real = (torch.arange(batch.tokens.shape[1])[None, :] < batch.lengths[:, None]).reshape(-1)  # [rows * pos]
    out = {}
    for h in hooks:
        k = cache[h].reshape(real.shape[0], -1)[real].double()  # [rows, pos, ...] -> [tokens, d_k]
        out[h] = k.T @ k / int(real.sum())
    return out


def test_grouped_passes_equal_one_pass_bit_for_bit_and_the_formula(tiny_model):
    one_pass = CovarianceStore(False, progress=False, working_bytes=None)
    per_layer = CovarianceStore(False, progress=False, working_bytes=1)  # every layer its own pass
    assert per_layer._passes(tiny_model, HOOKS) == [[HOOKS[0]], [HOOKS[2]], [HOOKS[1]]]  # layers ascending
    d_mlp, d_attn = tiny_model.cfg.d_mlp, tiny_model.cfg.n_heads * tiny_model.cfg.d_head
    two = CovarianceStore(False, progress=False, working_bytes=8 * (d_mlp**2 + d_attn**2))
    assert two._passes(tiny_model, HOOKS) == [[HOOKS[0], HOOKS[2]], [HOOKS[1]]]
    per_layer._tokenizer_hashes = one_pass._tokenizer_hashes  # hashed once for both
    a = one_pass.get(tiny_model, HOOKS, 600, "float32", 64)
    b = per_layer.get(tiny_model, HOOKS, 600, "float32", 64)
    ref = _reference(tiny_model, one_pass, HOOKS, 600, 64)
    for h in HOOKS:
        assert a[h].device.type == "cpu" and a[h].dtype == torch.float32
        assert torch.equal(a[h], b[h])
        torch.testing.assert_close(a[h].double(), ref[h], rtol=1e-5, atol=1e-5)
    f64 = per_layer.get(tiny_model, HOOKS[:1], 600, "float64", 64)
    assert f64[HOOKS[0]].dtype == torch.float64
    torch.testing.assert_close(f64[HOOKS[0]], ref[HOOKS[0]], rtol=1e-10, atol=1e-12)


def test_working_bytes_is_validated():
    import pytest

    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="working_bytes"):
            CovarianceStore(False, working_bytes=bad)
