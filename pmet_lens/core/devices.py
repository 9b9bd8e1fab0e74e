"""Blocks on several devices: where each part of a split model lives, and splitting one.

TransformerLens's ``HookedTransformer.forward`` moves the residual stream to block ``i``'s device
(``get_device_for_block_index``: consecutive blocks per device, ``cfg.n_devices`` devices from
``cfg.device`` on) before running it. pmet-lens code that runs blocks itself, or combines tensors
read at several blocks, takes each tensor's device from the block or parameter it meets
(:func:`block_device`), never from ``cfg.device`` alone.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import INPUT_MODULES

__all__ = ["block_device", "split_blocks"]


def block_device(model: HookedTransformer, layer: int) -> torch.device:
    """The device of block ``layer``'s parameters."""
    return next(model.blocks[layer].parameters()).device


def split_blocks(model: HookedTransformer, n_devices: int) -> HookedTransformer:
    """Place ``model``'s blocks on ``n_devices`` devices as its forward expects them: block ``i`` on
    ``get_device_for_block_index(i)`` (consecutive blocks per device, from ``cfg.device``'s index on),
    the embeddings with block 0, the final norm and the unembedding with the last block. Sets
    ``cfg.n_devices``. Parameter layouts (the fast path's column-major weights) are kept.

    Raises:
        ValueError: ``n_devices`` < 1, or more devices than the model's device type has.
    """
    from transformer_lens.utilities.multi_gpu import get_device_for_block_index

    if n_devices < 1:
        raise ValueError(f"n_devices must be >= 1, got {n_devices}")
    base = torch.device(str(model.cfg.device))
    if n_devices > 1 and (base.type != "cuda" or torch.cuda.device_count() < (base.index or 0) + n_devices):
        raise ValueError(f"n_devices={n_devices} needs that many CUDA devices from {base} on "
                         f"({torch.cuda.device_count() if torch.cuda.is_available() else 0} present)")
    model.cfg.n_devices = n_devices
    first = get_device_for_block_index(0, model.cfg)
    last = get_device_for_block_index(model.cfg.n_layers - 1, model.cfg)
    for name in INPUT_MODULES:
        if hasattr(model, name):
            getattr(model, name).to(first)
    for i, block in enumerate(model.blocks):
        block.to(get_device_for_block_index(i, model.cfg))
    if hasattr(model, "ln_final"):
        model.ln_final.to(last)
    model.unembed.to(last)
    return model
