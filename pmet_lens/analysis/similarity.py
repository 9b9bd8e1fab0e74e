"""PMET Fig. 2: how much the MHSA and the FFN change the last token's hidden state, per layer.

For every prompt, at its LAST token and for every layer l, each component's pair
(state before the component, the component's output) is compared by

* cosine similarity, and
* Jaccard similarity of the top-k vocabulary tokens of the two states (PMET eq. 7):
  J_k = |T(x) ∩ T(y)| / |T(x) ∪ T(y)|, with T(h) the k token ids of highest score.

Two variants, because the official code and the paper's text compare different states:

``"paper"`` (what the official PMET notebook computes)
    before = the component's own normalised input *with* the norm's learned scale (MHSA: ``ln1``
    output; FFN: ``ln2`` output), projected on the vocabulary with ``W_E.T``; no final norm.
``"logit_lens"`` (what the paper's text describes, after Geva et al. 2023)
    before = the residual stream entering the component (``hook_resid_pre`` for the MHSA;
    ``hook_resid_mid`` for a sequential block's FFN, ``hook_resid_pre`` for a parallel one),
    projected as ``unembed(ln_final(h))``.

In both variants "after" is the component's output (``hook_attn_out`` / ``hook_mlp_out``). For a
bfloat16 / float16 model the cosines and the vocabulary scores that decide the top-k sets are
computed in float32 from the model's activations.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

import pandas as pd
import torch
from jaxtyping import Float, Int
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import Architecture, apply_ln_affine, architecture
from pmet_lens.core.models import require_model
from pmet_lens.core.readout import HALF_DTYPES, final_logits, float32_matmul
from pmet_lens.core.stats import mean_ci95
from pmet_lens.core.tokens import decode_text, tokenize

logger = logging.getLogger(__name__)

VARIANTS = ("paper", "logit_lens")
COMPONENTS = ("mhsa", "ffn")
METRICS = ("cosine", "jaccard")
COLUMNS = ["variant", "layer", "component", "metric", "mean", "ci_low", "ci_high", "n"]


@dataclass(frozen=True)
class SimilarityScores:
    """Per-prompt scores of one variant.

    Attributes:
        variant: "paper" or "logit_lens".
        cosine: ``[n_prompts, n_layers, 2]`` cosine(before, output); last axis = (mhsa, ffn).
        jaccard: ``[n_prompts, n_layers, 2]`` top-k Jaccard of the two states' vocabulary tokens.
        k: the top-k size.
    """

    variant: str
    cosine: Float[torch.Tensor, "prompt layer 2"]
    jaccard: Float[torch.Tensor, "prompt layer 2"]
    k: int


def _check_variants(variant: str | Sequence[str]) -> tuple[str, ...]:
    variants = (variant,) if isinstance(variant, str) else tuple(variant)
    if variants in (("both",), ("all",)):
        return VARIANTS
    bad = [v for v in variants if v not in VARIANTS]
    if bad or not variants:
        raise ValueError(f"unknown variant(s) {bad or variants}: choose from {VARIANTS} (or 'both')")
    return variants


def _check_prompts(prompts: Sequence[str] | str) -> list[str]:
    if isinstance(prompts, str):
        raise TypeError("prompts must be a list of strings, not a single string; wrap it in a list")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt")
    for i, p in enumerate(prompts):
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"prompt #{i} is empty or not a string: {p!r}")
    return prompts


class _LastTokenRecorder:
    """Forward hooks that keep only each row's last-token vector of the hooked activations."""

    def __init__(self, last: Int[torch.Tensor, " batch"]):
        self.last = last
        self.store: dict[str, torch.Tensor] = {}

    def __call__(self, activation: torch.Tensor, hook) -> None:
        rows = torch.arange(activation.shape[0], device=activation.device)
        self.store[hook.name] = activation[rows, self.last].detach()


def _state_hooks(arch: Architecture, variants: tuple[str, ...]) -> list[str]:
    names: set[str] = set()
    for l in range(arch.n_layers):
        names.update({arch.attn_out_hook(l), arch.mlp_out_hook(l)})
        if "paper" in variants:
            names.update({arch.ln_normalized_hook(l, "mhsa"), arch.ln_normalized_hook(l, "ffn")})
        if "logit_lens" in variants:
            names.update({arch.attn_input_hook(l), arch.ffn_input_hook(l)})
    return sorted(names)


def component_states(
    model: HookedTransformer, arch: Architecture, store: dict[str, torch.Tensor], variant: str
) -> Float[torch.Tensor, "batch layer 4 d_model"]:
    """Stack (before MHSA, MHSA out, before FFN, FFN out) for every layer from recorded hooks, on the
    embedding's device (a model split over devices records each layer on its own)."""
    device = model.W_E.device
    per_layer = []
    for l in range(arch.n_layers):
        if variant == "paper":
            before_attn = apply_ln_affine(store[arch.ln_normalized_hook(l, "mhsa")], arch.ln_module(model, l, "mhsa"))
            before_ffn = apply_ln_affine(store[arch.ln_normalized_hook(l, "ffn")], arch.ln_module(model, l, "ffn"))
        else:
            before_attn = store[arch.attn_input_hook(l)]
            before_ffn = store[arch.ffn_input_hook(l)]
        per_layer.append(torch.stack(
            [before_attn, store[arch.attn_out_hook(l)], before_ffn, store[arch.mlp_out_hook(l)]], dim=1).to(device))
    return torch.stack(per_layer, dim=1)


def vocab_projector(model: HookedTransformer, variant: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """The vocabulary read-out of a variant: ``h @ W_E.T`` ("paper") or ``unembed(ln_final(h))``;
    in float32 for a bfloat16 / float16 model (:func:`~pmet_lens.core.readout.float32_matmul`,
    :func:`~pmet_lens.core.readout.final_logits`), so that top-k sets are not decided by rounding."""
    if variant == "paper":
        W_E = model.W_E
        if W_E.dtype in HALF_DTYPES:
            return lambda h: float32_matmul(h, W_E.T)
        return lambda h: h @ W_E.T
    if variant == "logit_lens":
        return lambda h: final_logits(model, h)
    raise ValueError(f"unknown variant {variant!r}: choose from {VARIANTS}")


def topk_jaccard(a: Int[torch.Tensor, "n k"], b: Int[torch.Tensor, "n k"]) -> Float[torch.Tensor, " n"]:
    """Jaccard similarity of two top-k id sets per row (PMET eq. 7); ids within a row are distinct."""
    inter = (a.unsqueeze(-1) == b.unsqueeze(-2)).any(-1).sum(-1).to(torch.float32)
    k = a.shape[-1] + b.shape[-1]
    return inter / (k - inter)


def _pair_scores(
    states: Float[torch.Tensor, "n layer 4 d"], project: Callable[[torch.Tensor], torch.Tensor], k: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    n, n_layers = states.shape[:2]
    before, after = states[:, :, 0::2], states[:, :, 1::2]  # [n, layer, 2(mhsa, ffn), d]
    wide = torch.promote_types(states.dtype, torch.float32)  # cosines in float32 at least
    cosine = torch.nn.functional.cosine_similarity(before.to(wide), after.to(wide), dim=-1)
    flat = states.reshape(-1, states.shape[-1])
    ids = torch.cat([project(flat[i:i + chunk]).topk(k, dim=-1).indices for i in range(0, flat.shape[0], chunk)])
    ids = ids.reshape(n, n_layers, 2, 2, k)  # [n, layer, component, before/after, k]
    jaccard = topk_jaccard(ids[..., 0, :], ids[..., 1, :])
    return cosine.float().cpu(), jaccard.cpu()


@torch.inference_mode()
def similarity_scores(
    model: HookedTransformer,
    prompts: Sequence[str],
    k: int = 50,
    variant: str | Sequence[str] = "paper",
    batch_size: int = 64,
    progress: bool = True,
    projection_chunk: int = 4096,
    *,
    workers: Any = None,
    shard_size: int | None = None,
) -> dict[str, SimilarityScores]:
    """Per-prompt cosine and top-k Jaccard scores of every layer's MHSA and FFN (PMET Fig. 2).

    One batched forward per ``batch_size`` prompts (right-padded, stopping before the final
    norm), recording only the last token of each hooked state; the vocabulary projections run
    as large matrix products of ``projection_chunk`` vectors.

    ``workers`` (an int or a :class:`~pmet_lens.parallel.Workers` pool) scores shards of
    ``shard_size`` prompts (default: whole batches, about four shards per worker) on a pool, each
    worker calling this function on its shard; prompts are sharded in the length order the batches
    use, so each prompt's scores equal the single process's up to float rounding.

    Returns:
        ``{variant: SimilarityScores}``, prompts in the given order.
    """
    prompts = _check_prompts(prompts)
    variants = _check_variants(variant)
    if not isinstance(k, int) or not 1 <= k <= model.cfg.d_vocab:
        raise ValueError(f"k must be an int in 1..{model.cfg.d_vocab} (the vocabulary size), got {k!r}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if workers is not None:
        return _sharded_scores(model, prompts, k, variants, batch_size, progress, projection_chunk, workers, shard_size)
    arch = architecture(model)
    names = _state_hooks(arch, variants)
    projectors = {v: vocab_projector(model, v) for v in variants}
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # less padding per batch
    cos = {v: torch.empty(len(prompts), arch.n_layers, 2) for v in variants}
    jac = {v: torch.empty(len(prompts), arch.n_layers, 2) for v in variants}
    bar = tqdm(total=len(prompts), desc="Fig. 2 similarity", unit="prompt", disable=not progress)
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        batch = tokenize(model, [prompts[i] for i in idx])
        recorder = _LastTokenRecorder(batch.last)
        with model.hooks(fwd_hooks=[(name, recorder) for name in names]):
            model(batch.tokens, stop_at_layer=arch.n_layers)
        for v in variants:
            states = component_states(model, arch, recorder.store, v)
            c, j = _pair_scores(states, projectors[v], k, projection_chunk)
            cos[v][idx], jac[v][idx] = c, j
        bar.update(len(idx))
    bar.close()
    return {v: SimilarityScores(variant=v, cosine=cos[v], jaccard=jac[v], k=k) for v in variants}


def _sharded_scores(model: HookedTransformer, prompts: list[str], k: int, variants: tuple[str, ...], batch_size: int,
                    progress: bool, projection_chunk: int, workers: Any, shard_size: int | None) -> dict[str, SimilarityScores]:
    """:func:`similarity_scores` over shards of prompts on a pool, put back in the prompts' order."""
    from pmet_lens.parallel import auto_shard_size, run_shards, shard_ranges

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # the batches' order
    size = shard_size or auto_shard_size(len(prompts), workers, multiple=batch_size)
    shards = [([prompts[i] for i in order[a:b]],) for a, b in shard_ranges(len(order), size)]
    parts = run_shards(model, similarity_scores, shards, workers=workers, desc="Fig. 2 similarity", progress=progress,
                       common={"k": k, "variant": variants, "batch_size": batch_size, "progress": False,
                               "projection_chunk": projection_chunk})
    idx = torch.tensor(order)
    out = {}
    for v in variants:
        cos = torch.empty(len(prompts), model.cfg.n_layers, 2)
        jac = torch.empty(len(prompts), model.cfg.n_layers, 2)
        cos[idx] = torch.cat([p[v].cosine for p in parts])
        jac[idx] = torch.cat([p[v].jaccard for p in parts])
        out[v] = SimilarityScores(variant=v, cosine=cos, jaccard=jac, k=k)
    return out


def summarize(scores: Iterable[SimilarityScores]) -> pd.DataFrame:
    """Long table: one row per (variant, layer, component, metric) with mean and 95% CI.

    The CI is :func:`pmet_lens.core.stats.mean_ci95` over prompts (n = number of prompts; with
    n = 1 there is no interval and ``ci_low`` / ``ci_high`` are NaN).
    """
    rows = []
    for s in scores:
        for metric, values in (("cosine", s.cosine), ("jaccard", s.jaccard)):
            n = values.shape[0]
            mean, half = mean_ci95(values)  # each [n_layers, 2]
            for layer in range(values.shape[1]):
                for c, component in enumerate(COMPONENTS):
                    m, e = float(mean[layer, c]), float(half[layer, c])
                    rows.append((s.variant, layer, component, metric, m, m - e, m + e, n))
    return pd.DataFrame(rows, columns=COLUMNS)


def component_similarity(
    model: HookedTransformer,
    prompts: Sequence[str],
    k: int = 50,
    variant: str | Sequence[str] = "paper",
    batch_size: int = 64,
    progress: bool = True,
    *,
    workers: Any = None,
    shard_size: int | None = None,
) -> pd.DataFrame:
    """PMET Fig. 2 as a long DataFrame.

    Args:
        model: any hooked model (sequential or parallel blocks, RMS or LayerNorm).
        prompts: full prompt texts; the state compared is each prompt's last token.
        k: top-k size of the vocabulary sets (PMET uses 50).
        variant: "paper", "logit_lens", a list of them, or "both" (see the module docstring).
        batch_size: prompts per forward pass.
        progress: show a tqdm progress bar.
        workers: ``None`` (this process), an int (a local pool of that many workers) or a
            :class:`~pmet_lens.parallel.Workers` pool: prompts are scored in shards on the workers
            (see :func:`similarity_scores`); the table equals the single process's.
        shard_size: prompts per shard on a pool (default: whole batches, about four shards per worker).

    Returns:
        Columns ``variant, layer, component ("mhsa"|"ffn"), metric ("cosine"|"jaccard"),
        mean, ci_low, ci_high, n``; one row per (variant, layer, component, metric).
    """
    require_model(model, "pmet_lens.component_similarity")
    scores = similarity_scores(model, prompts, k=k, variant=variant, batch_size=batch_size, progress=progress,
                               workers=workers, shard_size=shard_size)
    return summarize(scores.values())


@dataclass(frozen=True)
class TopKChange:
    """Vocabulary tokens that enter and leave the top-k across one component, for one prompt."""

    layer: int
    component: str
    variant: str
    before: list[str]
    after: list[str]
    entered: list[str]
    left: list[str]
    kept: list[str]
    jaccard: float


@torch.inference_mode()
def topk_change(
    model: HookedTransformer, prompt: str, layer: int, component: str = "ffn", k: int = 50, variant: str = "paper"
) -> TopKChange:
    """The per-prompt view of Fig. 2: which top-k tokens a component keeps, adds and drops.

    Compares T(before) and T(output) of ``component`` at ``layer`` for ``prompt``'s last token.
    """
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    (variant,) = _check_variants(variant)
    arch = architecture(model)
    arch.check_layer(layer)
    batch = tokenize(model, _check_prompts([prompt]))
    recorder = _LastTokenRecorder(batch.last)
    with model.hooks(fwd_hooks=[(name, recorder) for name in _state_hooks(arch, (variant,))]):
        model(batch.tokens, stop_at_layer=layer + 1)
    store = recorder.store
    ln_c = "mhsa" if component == "mhsa" else "ffn"
    if variant == "paper":
        before = apply_ln_affine(store[arch.ln_normalized_hook(layer, ln_c)], arch.ln_module(model, layer, ln_c))
    else:
        before = store[arch.attn_input_hook(layer) if component == "mhsa" else arch.ffn_input_hook(layer)]
    after = store[arch.attn_out_hook(layer) if component == "mhsa" else arch.mlp_out_hook(layer)]
    project = vocab_projector(model, variant)
    ids_b = project(before).topk(k, dim=-1).indices[0].tolist()
    ids_a = project(after).topk(k, dim=-1).indices[0].tolist()
    dec = lambda ids: [decode_text(model, [i]) for i in ids]  # noqa: E731
    sb, sa = set(ids_b), set(ids_a)
    return TopKChange(
        layer=layer, component=component, variant=variant, before=dec(ids_b), after=dec(ids_a),
        entered=dec([i for i in ids_a if i not in sb]), left=dec([i for i in ids_b if i not in sa]),
        kept=dec([i for i in ids_b if i in sa]), jaccard=len(sb & sa) / len(sb | sa),
    )
