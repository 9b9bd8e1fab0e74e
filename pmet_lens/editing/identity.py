"""Model identity: a content hash of the weights (not the model's name)."""

from __future__ import annotations

import hashlib

import torch
from transformer_lens import HookedTransformer


def weights_hash(model: HookedTransformer, upto_layer: int | None = None) -> str:
    """blake2b hash of the model's parameters (names, shapes, dtypes and values).

    ``upto_layer`` restricts the hash to what the activations of blocks ``0..upto_layer``
    depend on (embeddings and those blocks), which is all a layer's key statistics depend on.
    The hash does not depend on memory layout (column-major fast-path weights hash like the
    stock row-major ones).
    """
    digest = hashlib.blake2b(digest_size=16)
    for name, param in model.named_parameters():
        if upto_layer is not None and not _needed(name, upto_layer):
            continue
        t = param.detach()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _needed(name: str, upto_layer: int) -> bool:
    if name.startswith("blocks."):
        return int(name.split(".")[1]) <= upto_layer
    return name.startswith(("embed.", "pos_embed."))
