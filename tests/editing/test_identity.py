"""Model identity hashes."""

from __future__ import annotations

import torch


def test_one_pass_hashes_equal_separate_hashes(tiny_model):
    """weights_hashes reads the weights once; each hash equals one computed on its own."""
    import hashlib

    from pmet_lens.editing.identity import weights_hash, weights_hashes

    def reference(upto):
        digest = hashlib.blake2b(digest_size=16)
        for name, p in tiny_model.named_parameters():
            if upto is not None and name.startswith("blocks.") and int(name.split(".")[1]) > upto:
                continue
            if upto is not None and not name.startswith(("blocks.", "embed.", "pos_embed.")):
                continue
            t = p.detach().contiguous()
            digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
            digest.update(t.view(torch.uint8).numpy().tobytes())
        return digest.hexdigest()

    layers = list(range(tiny_model.cfg.n_layers))
    full, partial = weights_hashes(tiny_model, layers)
    assert full == reference(None) == weights_hash(tiny_model)
    assert partial == {l: reference(l) for l in layers}
    assert len(set(partial.values())) == len(layers)
