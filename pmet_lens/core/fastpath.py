"""The one place where pmet-lens changes how a TransformerLens forward pass is computed.

TransformerLens 3.9's ``GatedMLP`` and ``Unembed`` call ``F.linear(x, W.T.contiguous())``,
which copies a transposed weight on every forward (for SmolLM2 the 576 x 49152 unembedding
alone is ~110 MB per call; ``benchmarks/`` measures what the copies cost).

Dropping ``.contiguous()`` is *not* bit-identical (BLAS then runs a different kernel). Instead
:func:`install_fast_linear` stores those weights **transposed in memory**: each parameter keeps
its TransformerLens shape and values but gets column-major strides, so ``W.T`` is already
contiguous, ``.contiguous()`` returns it without copying, and ``F.linear`` sees exactly the
same memory layout as the stock path. The stock ``forward`` code is untouched and the logits
are bit-identical by construction (``tests/core/test_fastpath.py`` checks it). In-place weight
updates (``W_out += delta``) work unchanged on such parameters.
"""

from __future__ import annotations

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import transposed_linear_weights


def _column_major(param: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(param.detach().T.contiguous().T, requires_grad=param.requires_grad)


def _row_major(param: torch.nn.Parameter) -> torch.nn.Parameter:
    return torch.nn.Parameter(param.detach().contiguous(), requires_grad=param.requires_grad)


def _restride(model: HookedTransformer, convert) -> HookedTransformer:
    for module in model.modules():
        for name in transposed_linear_weights(module):
            setattr(module, name, convert(getattr(module, name)))
    return model


def install_fast_linear(model: HookedTransformer) -> HookedTransformer:
    """Store ``model``'s gated-MLP and unembedding weights transposed in memory (same values).

    Removes the per-forward transposed copy of TransformerLens 3.9 while keeping outputs
    bit-identical. Acts on this one model instance. Returns ``model`` for chaining.
    """
    return _restride(model, _column_major)


def uninstall_fast_linear(model: HookedTransformer) -> HookedTransformer:
    """Give the weights back their stock row-major layout (undo :func:`install_fast_linear`)."""
    return _restride(model, _row_major)


def is_fast(model: HookedTransformer) -> bool:
    """Whether :func:`install_fast_linear` is in effect on ``model`` (all relevant weights)."""
    found = [
        getattr(module, name)
        for module in model.modules()
        for name in transposed_linear_weights(module)
    ]
    return bool(found) and all(p.T.is_contiguous() for p in found)
