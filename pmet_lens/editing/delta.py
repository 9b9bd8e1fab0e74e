"""How an edit's ΔW enters a weight, in any dtype: the one write every path uses.

The update is computed in float32 or float64 whatever the weight's dtype (MEMIT eq. 14, PMET eq.
10); the weight itself may be bfloat16 or float16. :func:`write_update` writes it once,
W ← round(W + ΔW), and returns the change actually applied, d = W_new − W_old in the delta dtype
(:func:`delta_dtype`: float32, float64 for float64 weights). :func:`add_delta` is the one operation
that adds a recorded d to a weight, round(W + d) computed in the delta dtype; ``write_update``
writes exactly what ``add_delta`` gives for its returned d, so re-applying a saved edit
(:meth:`~pmet_lens.editing.result.EditResult.apply`, :func:`pmet_lens.export.apply_delta`) or
replaying a session's batches reproduces the edited weights bit for bit in every dtype, and
putting the originals back undoes them bit for bit.
"""

from __future__ import annotations

import torch

__all__ = ["add_delta", "delta_dtype", "write_update"]


def delta_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype a weight's ΔW is recorded in: float32, or float64 for a float64 weight."""
    return torch.promote_types(weight_dtype, torch.float32)


@torch.no_grad()
def add_delta(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """``weight ← round(weight + delta)`` in place, the sum taken in ``delta_dtype(weight.dtype)``
    and rounded once to the weight's dtype; ``delta`` is moved to the weight's device.

    ``weight`` may be any view of a parameter's storage (a strided view inside a transformers
    parameter, see :func:`pmet_lens.export.apply_delta`).
    """
    dd = delta_dtype(weight.dtype)
    d = delta.to(device=weight.device, dtype=dd)
    if weight.dtype == dd:
        weight.add_(d)
    else:
        weight.copy_((weight.to(dd) + d).to(weight.dtype))


@torch.no_grad()
def write_update(weight: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
    """Add the computed update ΔW (``update``, float32/64, the weight's shape) to ``weight`` once and
    return the change applied, ``d`` in :func:`delta_dtype`: the weight becomes exactly what
    :func:`add_delta` makes of the old weight and ``d``, and ``d == W_new − W_old`` (computed in the
    delta dtype; exact for bfloat16 and float16 weights unless an entry cancels to below 2⁻¹⁶ of
    its old value, where ``d`` is within one float32 rounding of it).
    """
    dd = delta_dtype(weight.dtype)
    old = weight.detach().to(dd)
    new = (old + update.to(device=weight.device, dtype=dd)).to(weight.dtype)  # round(W + ΔW), once
    d = new.to(dd) - old
    add_delta(weight, d)
    return d
