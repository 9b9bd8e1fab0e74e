"""The model's own read-out of residual-stream vectors: the tail of ``HookedTransformer.forward``.

Every analysis that turns a residual vector into logits (target losses, causal-trace scores,
continuation scores, the logit lens, the ``logit_lens`` variant of PMET Fig. 2) goes through
:func:`final_logits`, so they all apply the final norm, the unembedding and the logit soft-cap
exactly as the forward pass does, and only at the vectors they need.

For a half-precision model (bfloat16 / float16) the unembedding product of those few vectors is
taken in float32 (:func:`float32_matmul`, the weight cast a slice at a time), so the logits that
are scored, compared and soft-maxed are not rounded to 8 or 11 significant bits; the final norm
is the model's own. A float32 or float64 model's read-out is the forward's, unchanged.
"""

from __future__ import annotations

from typing import Callable

import torch
from jaxtyping import Bool, Float, Int
from transformer_lens import HookedTransformer
from transformer_lens.utilities import apply_softcap

__all__ = ["HALF_DTYPES", "final_logits", "float32_matmul", "label_logprobs"]

HALF_DTYPES = (torch.bfloat16, torch.float16)
"""Dtypes whose products and statistics pmet-lens takes in float32."""

_CHUNK_ENTRIES = 1 << 26  # entries of a weight slice cast to float32 at a time (256 MB)


def _column_chunks(weight: torch.Tensor) -> list[slice]:
    """Column slices of ``weight`` ([d_in, d_out]) of at most ``_CHUNK_ENTRIES`` entries each."""
    width = max(1, _CHUNK_ENTRIES // max(1, weight.shape[0]))
    return [slice(s, min(s + width, weight.shape[-1])) for s in range(0, weight.shape[-1], width)]


class _Float32Matmul(torch.autograd.Function):
    """``x @ W`` in float32 with ``W`` cast one column slice at a time; the gradient flows to ``x``
    only (``W`` is a frozen weight), recomputing the casts instead of keeping them."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        xf = x.float()
        out = xf.new_empty(*x.shape[:-1], weight.shape[-1])  # [..., d_out] float32
        for cols in _column_chunks(weight):
            out[..., cols] = xf @ weight[:, cols].float()
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        gx = grad.new_zeros(*grad.shape[:-1], weight.shape[0])  # [..., d_in] float32
        for cols in _column_chunks(weight):
            gx += grad[..., cols].float() @ weight[:, cols].float().T
        return gx.to(ctx.x_dtype), None


def float32_matmul(x: Float[torch.Tensor, "*batch d_in"], weight: Float[torch.Tensor, "d_in d_out"]
                   ) -> Float[torch.Tensor, "*batch d_out"]:
    """``x @ weight`` in float32 whatever their dtypes, without a float32 copy of the whole weight
    (slices of about 256 MB); ``x`` is moved to the weight's device. Differentiable in ``x`` (a
    weight that requires grad is cast whole)."""
    x = x.to(weight.device)
    if weight.requires_grad:
        return x.float() @ weight.float()
    return _Float32Matmul.apply(x, weight)


def final_logits(
    model: HookedTransformer, resid: Float[torch.Tensor, "*batch d_model"]
) -> Float[torch.Tensor, "*batch d_vocab"]:
    """``soft_cap(unembed(ln_final(resid)))`` for residual vectors of any leading shape.

    ``ln_final`` is skipped for models without a final norm; the soft-cap is the identity unless
    ``cfg.output_logits_soft_cap`` is set (Gemma 2). The vectors are moved to the read-out's device
    (the last block's, for a model split over devices). For a bfloat16 / float16 model the
    unembedding product and the logits are float32 (:func:`float32_matmul`).
    """
    lead = resid.shape[:-1]
    x = resid.reshape(-1, 1, resid.shape[-1]).to(model.unembed.W_U.device)  # [N, 1, d_model]
    if model.cfg.normalization_type is not None:
        x = model.ln_final(x)
    if x.dtype in HALF_DTYPES:
        logits = float32_matmul(x, model.unembed.W_U) + model.unembed.b_U.float().to(x.device)
    else:
        logits = model.unembed(x)
    logits = apply_softcap(logits, model.cfg.output_logits_soft_cap)
    return logits.reshape(*lead, logits.shape[-1])


def label_logprobs(
    model: HookedTransformer,
    resid: Float[torch.Tensor, "n d_model"],
    labels: Int[torch.Tensor, " k"],
    rows: Int[torch.Tensor, " k"] | None = None,
    *,
    max_logits: int = 2**24,
    readout: Callable[[HookedTransformer, torch.Tensor], torch.Tensor] = final_logits,
) -> tuple[Float[torch.Tensor, " k"], Bool[torch.Tensor, " k"]]:
    """``log P(labels[j] | resid[rows[j]])`` and whether ``labels[j]`` is the top-1 token there.

    Each residual row is read out once (:func:`final_logits`), however many labels are scored at it
    (``rows`` default ``0..n-1``, one label per row), a chunk of at most ``max_logits // d_vocab``
    rows at a time, so only one ``[chunk, d_vocab]`` block of logits exists (never
    ``[batch, pos, d_vocab]``). ``log P = logit[label] − logsumexp(logits)`` in float32 whatever the
    model's dtype. ``readout`` maps ``[chunk, d_model]`` rows to their logits (default
    :func:`final_logits`).
    """
    n = resid.shape[0]
    if rows is None:
        rows = torch.arange(n, device=labels.device)
    chunk = max(1, max_logits // model.cfg.d_vocab)
    logp = torch.zeros(labels.shape[0], dtype=torch.float32)
    top1 = torch.zeros(labels.shape[0], dtype=torch.bool)
    out_device = None
    for i in range(0, n, chunk):
        logits = readout(model, resid[i:i + chunk]).float()  # [chunk, d_vocab], on the unembedding's device
        if out_device is None:
            out_device = logits.device
            logp, top1, rows, labels = logp.to(out_device), top1.to(out_device), rows.to(out_device), labels.to(out_device)
        mine = ((rows >= i) & (rows < i + logits.shape[0])).nonzero()[:, 0]  # labels read in this chunk
        local, lab = rows[mine] - i, labels[mine]
        logp[mine] = logits[local, lab] - torch.logsumexp(logits, dim=-1)[local]
        top1[mine] = logits.argmax(-1)[local] == lab
        del logits
    return logp, top1
