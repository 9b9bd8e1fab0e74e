"""Model identity hashes, and their per-parameter cache (computed once per model state)."""

from __future__ import annotations

import hashlib

import torch

from conftest import make_tiny_model


def _reference(model, upto):
    """Independent two-level blake2b: per-parameter digests, then the sequence of headers + digests."""
    digest = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        if upto is not None and name.startswith("blocks.") and int(name.split(".")[1]) > upto:
            continue
        if upto is not None and not name.startswith(("blocks.", "embed.", "pos_embed.")):
            continue
        t = p.detach().contiguous()
        inner = hashlib.blake2b(t.view(torch.uint8).numpy().tobytes(), digest_size=16).digest()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode() + inner)
    return digest.hexdigest()


def test_one_pass_hashes_equal_separate_hashes(tiny_model):
    """weights_hashes reads the weights once; each hash equals an independent computation."""
    from pmet_lens.editing.identity import weights_hash, weights_hashes

    layers = list(range(tiny_model.cfg.n_layers))
    full, partial = weights_hashes(tiny_model, layers)
    assert full == _reference(tiny_model, None) == weights_hash(tiny_model)
    assert partial == {l: _reference(tiny_model, l) for l in layers}
    assert len(set(partial.values())) == len(layers)


def test_legacy_hash_is_the_one_pass_blake2b():
    from pmet_lens.editing.identity import legacy_weights_hash

    model = make_tiny_model(False, "LN", False)
    digest = hashlib.blake2b(digest_size=16)
    for name, p in model.named_parameters():
        t = p.detach().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    assert legacy_weights_hash(model) == digest.hexdigest()


def test_identity_is_cached_per_model_state():
    """An unchanged model is not read again; an in-place write rehashes only that parameter, and a
    write through ``.data`` (unseen by the version counter) is caught by the sampled entries."""
    from pmet_lens.core.fastpath import install_fast_linear
    from pmet_lens.editing.identity import identity_cache, weights_hash

    model = install_fast_linear(make_tiny_model(False, "RMS", True))
    n_params = len(list(model.parameters()))
    first = weights_hash(model)
    cache = identity_cache(model)
    assert cache.rehashed == n_params
    assert weights_hash(model) == first and cache.rehashed == n_params  # nothing read again
    w = model.blocks[1].mlp.W_out
    original = w.detach().clone()
    with torch.no_grad():
        w.add_(0.01)
    changed = weights_hash(model)
    assert changed != first and changed == _reference(model, None) and cache.rehashed == n_params + 1
    with torch.no_grad():
        w.copy_(original)
    assert weights_hash(model) == first and cache.rehashed == n_params + 2
    w.data.mul_(1.5)  # bypasses the version counter
    assert weights_hash(model) == _reference(model, None) != first
    w.data.copy_(original)
    assert weights_hash(model) == first
    other = make_tiny_model(False, "RMS", True)  # same values, another model: its own cache
    assert weights_hash(other) == first and identity_cache(other) is not cache
