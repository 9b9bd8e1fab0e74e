"""Model identity: a content hash of the weights (not the model's name)."""

from __future__ import annotations

import hashlib
from typing import Iterable, cast

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import feeds_layer

__all__ = ["weights_hash", "weights_hashes"]


def weights_hash(model: HookedTransformer, upto_layer: int | None = None) -> str:
    """blake2b hash of the model's parameters (names, shapes, dtypes and values).

    ``upto_layer`` restricts the hash to what the activations of blocks ``0..upto_layer``
    depend on (embeddings and those blocks), which is all a layer's key statistics depend on.
    The hash does not depend on memory layout (column-major fast-path weights hash like the
    stock row-major ones).
    """
    full, partial = weights_hashes(model, [] if upto_layer is None else [upto_layer])
    return full if upto_layer is None else partial[upto_layer]


def weights_hashes(model: HookedTransformer, upto_layers: Iterable[int]) -> tuple[str, dict[int, str]]:
    """The full :func:`weights_hash` and ``weights_hash(model, l)`` for each ``l``, in one pass.

    Each parameter is read and hashed once: a partial hash shares the full digest while every
    parameter so far is one it needs (embeddings and early blocks come first), then continues on
    a copy of it, which receives only the parameters it needs.
    """
    layers = sorted(set(upto_layers))
    full = hashlib.blake2b(digest_size=16)
    forked: dict[int, "hashlib.blake2b"] = {}
    for name, param in model.named_parameters():
        t = param.detach()
        header = f"{name}|{tuple(t.shape)}|{t.dtype}".encode()
        data = cast(bytes, t.cpu().contiguous().view(torch.uint8).numpy() if t.numel() else b"")  # a buffer, not a copy
        for l in layers:
            needed = feeds_layer(name, l)
            if l not in forked and not needed:
                forked[l] = full.copy()
            elif l in forked and needed:
                forked[l].update(header)
                forked[l].update(data)
        full.update(header)
        full.update(data)
    return full.hexdigest(), {l: (forked[l] if l in forked else full).hexdigest() for l in layers}
