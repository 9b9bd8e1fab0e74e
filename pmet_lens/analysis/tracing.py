"""Causal tracing of factual recall (ROME, Meng et al. 2022; MEMIT Appendix A and Fig. 3).

A clean run of the prompt p(s, r) gives P(o) for the model's own answer o. The corrupted run adds
Gaussian noise of std ``noise`` x sigma (sigma: empirical std of the token embeddings
``model.W_E``) to the embeddings of the subject tokens (``hook_embed``), ``samples`` draws. Each
cell (t, l) of the result restores one state to its clean value inside the corrupted run and
records P(o):

* ``kind="hidden"``: the residual stream h^l_t (``blocks.{l}.hook_resid_post``);
* ``kind="mlp"`` / ``"attn"``: the ``window`` layers of MLP outputs m_t (``hook_mlp_out``) or
  attention outputs a_t (``hook_attn_out``) centred on l, i.e. layers
  ``max(0, l - window // 2) .. min(n_layers, l + ceil(window / 2)) - 1`` (ROME's convention).

``sever="mlp"`` / ``"attn"`` (MEMIT Fig. 3, the path-dependent view): restore h^l_t as above while
the MLP (attention) outputs of the same token t in the later layers are held at their corrupted
values, so the restored state cannot act through them.

Speed: positions before the subject are not recomputed (the corrupted run equals the clean run
there, so their score is the corrupted score, exactly). Restoring a state at (t, l) changes nothing
before layer l and nothing at positions before t. The corrupted run is computed once, caching its residual
streams and attention keys/values.
For each position t only positions t.. are recomputed (the corrupted keys/values of positions < t
are fed in as a frozen key/value cache), starting at the first block a restoration can change;
all (layer, sample) rows of one position run as one batch that grows block by block, and logits
are computed at the scored positions only.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Literal, Sequence, cast

import torch
from jaxtyping import Float, Int
from transformer_lens import ActivationCache, HookedTransformer
from transformer_lens.cache.key_value_cache_entry import TransformerLensKeyValueCacheEntry
from transformer_lens.hook_points import HookPoint

from pmet_lens.core.arch import Architecture, architecture
from pmet_lens.core.batching import run_halving
from pmet_lens.core.devices import block_device
from pmet_lens.core.models import require_model
from pmet_lens.core.readout import final_logits
from pmet_lens.core.tokens import decode_text, encode, subject_range, target_ids

logger = logging.getLogger(__name__)

__all__ = [
    "KINDS",
    "SEVER",
    "EmbeddingStats",
    "TRACE_TOKENS",
    "TraceResult",
    "trace",
    "embedding_std",
    "target_probability",
    "window_layers",
]

Kind = Literal["hidden", "mlp", "attn"]
KINDS: tuple[str, ...] = ("hidden", "mlp", "attn")
"""Trace kinds: restore h^l_t, a window of m_t, or a window of a_t."""
SEVER: tuple[str, ...] = ("mlp", "attn")
"""Components that can be severed (held at their corrupted value) in a hidden-state trace."""
TRACE_TOKENS = 16384
"""Default token budget of one restoration forward of :func:`trace`: (layer, sample) rows x positions."""

@dataclass(frozen=True)
class TraceResult:
    """The causal trace of one prompt.

    Attributes:
        scores: ``[n_tokens, n_layers]`` P(target) with that cell restored (mean over noise
            samples); NaN for positions that were not traced (see ``positions`` of :func:`trace`).
        low_score: P(target) in the corrupted run (mean over noise samples).
        high_score: P(target) in the clean run.
        tokens: the prompt's tokens as text (one per row of ``scores``).
        token_ids: the prompt's token ids.
        subject_range: ``(start, end)`` token positions of the subject (end exclusive).
        kind: "hidden", "mlp" or "attn".
        target: the scored answer text (the model's greedy token when not given).
        target_ids: token ids of ``target``.
        window: restored window of layers (``kind`` "mlp"/"attn"; 1 for "hidden").
        samples: number of noise draws.
        noise: noise level in units of the embedding std.
        sever: "mlp" / "attn" when that path of the restored token was severed, else None.
        prompt: the prompt text.
        subject: the subject text.
    """

    scores: Float[torch.Tensor, "n_tokens n_layers"]
    low_score: float
    high_score: float
    tokens: list[str]
    token_ids: list[int]
    subject_range: tuple[int, int]
    kind: str
    target: str
    target_ids: list[int]
    window: int = 1
    samples: int = 10
    noise: float = 3.0
    sever: str | None = None
    prompt: str = ""
    subject: str = ""
    positions: list[int] = field(default_factory=list)

    @property
    def effect(self) -> Float[torch.Tensor, "n_tokens n_layers"]:
        """Indirect effect of each cell: ``scores - low_score`` (ROME's plotted quantity)."""
        return self.scores - self.low_score

    @property
    def n_layers(self) -> int:
        """Number of layers (columns of ``scores``)."""
        return int(self.scores.shape[1])


def embedding_std(model: HookedTransformer, *, rows: int = 8192) -> float:
    """Empirical std sigma of the token embeddings (all entries of ``model.W_E``, ``ddof = 1``).

    ROME measures sigma over the embeddings of the subjects of its data set; this is the std over
    the whole embedding matrix (MEMIT Appendix A: "the empirically observed variance of embedding
    activations"), which needs no data set. Two passes in float64 over blocks of ``rows`` rows (no
    float32 copy of the whole matrix); :class:`EmbeddingStats` keeps it per model.
    """
    W = model.W_E.detach()
    n = W.numel()
    total = sum(float(W[i:i + rows].double().sum()) for i in range(0, W.shape[0], rows))
    mean = total / n
    squares = sum(float((W[i:i + rows].double() - mean).pow(2).sum()) for i in range(0, W.shape[0], rows))
    return math.sqrt(squares / max(1, n - 1))


class EmbeddingStats:
    """Cache of :func:`embedding_std` per model, for callers that trace many prompts
    (:func:`~pmet_lens.analysis.averaged.average_traces`): sigma is computed once per embedding
    matrix and again only when that matrix changes (its identity or its in-place version counter).
    An object the caller passes in, no module-level state."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[torch.Tensor, int, float]] = {}

    def std(self, model: HookedTransformer) -> float:
        """sigma of ``model.W_E`` (:func:`embedding_std`), computed at most once per state of the matrix."""
        W = model.W_E
        hit = self._known.get(id(W))
        if hit is not None and hit[0] is W and hit[1] == W._version:
            return hit[2]
        value = embedding_std(model)
        self._known[id(W)] = (W, W._version, value)
        return value


def window_layers(layer: int, window: int, n_layers: int) -> range:
    """Layers of the window of ``window`` layers centred on ``layer`` (ROME's ``trace_important_window``)."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def target_probability(
    logits: Float[torch.Tensor, "batch n_target d_vocab"], target: Sequence[int]
) -> Float[torch.Tensor, " batch"]:
    """P(target) per row: ``exp(mean_i log P(target_i | prefix))``.

    ``logits[:, i]`` must be the logits predicting ``target[i]``. A single-token target gives its
    plain probability; a multi-token target gets the geometric mean of its token probabilities
    (its mean token log-probability turned into a probability).
    """
    ids = torch.as_tensor(list(target), device=logits.device)
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, ids.view(1, -1, 1).expand(logits.shape[0], -1, 1)).squeeze(-1)
    return picked.mean(dim=-1).exp()


def _validate(
    model: HookedTransformer, prompt: str, kind: str, window: int, samples: int, noise: float, sever: str | None
) -> Architecture:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"cannot trace an empty prompt (got {prompt!r})")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if sever is not None:
        if sever not in SEVER:
            raise ValueError(f"sever must be None or one of {SEVER}, got {sever!r}")
        if kind != "hidden":
            raise ValueError(f"severing applies to hidden-state traces (MEMIT Fig. 3), not kind={kind!r}")
    arch = architecture(model)
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    if kind != "hidden" and window > arch.n_layers:
        raise ValueError(f"window {window} is larger than the model: it has {arch.n_layers} layers")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be an int >= 1, got {samples!r}")
    if not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise ValueError(f"noise must be a finite number >= 0, got {noise!r}")
    return arch


def _restore_hook(
    values: Float[torch.Tensor, "rows d_model"], rows: Int[torch.Tensor, " rows"], pos: Int[torch.Tensor, " rows"]
) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
    """Hook fn writing ``values[i]`` into ``activation[rows[i], pos[i]]``."""

    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        activation[rows, pos] = values
        return activation

    return hook


def _noise_hook(
    eps: Float[torch.Tensor, "samples n_subject d_model"], start: int, end: int
) -> Callable[[torch.Tensor, HookPoint], torch.Tensor]:
    def hook(activation: torch.Tensor, hook: HookPoint) -> torch.Tensor:
        activation[:, start:end] = activation[:, start:end] + eps
        return activation

    return hook


def trace(
    model: HookedTransformer,
    prompt: str,
    subject: str,
    *,
    kind: Kind = "hidden",
    window: int = 10,
    samples: int = 10,
    noise: float = 3.0,
    seed: int = 0,
    target: str | None = None,
    sever: Literal["mlp", "attn"] | None = None,
    positions: Sequence[int] | None = None,
    max_tokens: int = TRACE_TOKENS,
    stats: EmbeddingStats | None = None,
    workers: Any = None,
    shard_size: int | None = None,
) -> TraceResult:
    """Causal trace of ``prompt`` (ROME Fig. 1; MEMIT Fig. 8, and Fig. 3 with ``sever``).

    Args:
        model: a hooked model (sequential or parallel blocks).
        prompt: the fact prompt p(s, r), e.g. "The Eiffel Tower is located in the city of".
        subject: the subject s, a substring of ``prompt`` (its last occurrence is corrupted).
        kind: "hidden" (restore h^l_t, ``hook_resid_post``), "mlp" (``hook_mlp_out``) or "attn"
            (``hook_attn_out``) windows, see :func:`window_layers`.
        window: layers restored together for "mlp"/"attn" (ROME/MEMIT: 10); ignored for "hidden".
        samples: noise draws; every score is the mean probability over them (ROME).
        noise: noise std in units of :func:`embedding_std` (ROME/MEMIT: 3).
        seed: seeds a private ``torch.Generator`` (the global RNG is untouched); the same seed
            gives the same noise and scores.
        target: the answer to score (a leading space is added as in ROME, see
            :func:`pmet_lens.core.tokens.target_ids`); default the model's greedy next token. A
            multi-token target is scored as ``exp(mean token log-probability)`` of its tokens
            (teacher-forced after the prompt), see :func:`target_probability`.
        sever: "mlp" / "attn": hold the MLP / attention outputs of the restored token at all
            later layers at their corrupted values (MEMIT Fig. 3). Only with ``kind="hidden"``.
        positions: prompt positions to trace (default all); rows not traced are NaN.
        max_tokens: token budget of one restoration forward ((layer, sample) rows x positions from
            ``t``); the layers of a position are split into groups that fit (each group one growing
            batch), and a group that meets a CUDA out-of-memory error is halved and retried
            (:func:`~pmet_lens.core.batching.run_halving`). Scores do not depend on the grouping
            (up to float rounding).
        stats: a cache of sigma (:class:`EmbeddingStats`) shared by many calls; default computed here.
        workers: ``None`` (this process), an int (a local pool of that many workers) or a
            :class:`~pmet_lens.parallel.Workers` pool: the positions are traced in shards of
            ``shard_size`` (default: about two shards per worker), each worker calling this function
            on its positions; a position's row does not depend on the others, so the result equals
            the single process's.
        shard_size: positions per shard on a pool.

    Returns:
        a :class:`TraceResult` (``scores`` [n_tokens, n_layers] over the prompt's tokens).

    Raises:
        ValueError: empty prompt, subject not in the prompt, unknown kind / sever, window larger
            than the model, samples < 1, noise < 0, a position out of range.
    """
    require_model(model, "pmet_lens.trace")
    arch = _validate(model, prompt, kind, window, samples, noise, sever)
    n_layers = arch.n_layers
    prompt_ids = encode(model, prompt)
    subj = subject_range(model, prompt, subject)
    n_prompt = len(prompt_ids)
    if positions is None:
        pos_list = list(range(n_prompt))
    else:
        pos_list = sorted({int(p) for p in positions})
        bad = [p for p in pos_list if not 0 <= p < n_prompt]
        if bad or not pos_list:
            raise ValueError(f"positions {bad or list(positions)} are out of range: the prompt has {n_prompt} tokens")
    if workers is not None:
        return _sharded_trace(model, prompt, subject, pos_list, workers, shard_size,
                              {"kind": kind, "window": window, "samples": samples, "noise": noise, "seed": seed,
                               "target": target, "sever": sever, "max_tokens": max_tokens})
    device = model.cfg.device
    tgt = target_ids(model, target) if target is not None else None

    with torch.inference_mode():
        # ---- clean run: every state a restoration may need --------------------------------
        input_ids = prompt_ids + (tgt[:-1] if tgt is not None else [])
        tokens = torch.tensor([input_ids], device=device)
        names = {arch.resid_post_hook(l) for l in range(n_layers)}
        comp_hook = {"mlp": arch.mlp_out_hook, "attn": arch.attn_out_hook}
        if kind != "hidden":
            names |= {comp_hook[kind](l) for l in range(n_layers)}
        out, clean = model.run_with_cache(tokens, names_filter=lambda n: n in names, stop_at_layer=n_layers)
        resid = cast(torch.Tensor, out)  # [1, pos, d_model]; read out only where scored
        if tgt is None:
            tgt = [int(final_logits(model, resid[0, n_prompt - 1]).argmax())]
        score_pos = list(range(n_prompt - 1, n_prompt - 1 + len(tgt)))
        high = float(target_probability(final_logits(model, resid[:, score_pos]), tgt)[0])

        # ---- corrupted run: noise on the subject embeddings, one row per sample -----------
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        eps = torch.randn(samples, subj[1] - subj[0], model.cfg.d_model, generator=gen)
        sigma = stats.std(model) if stats is not None else embedding_std(model)
        eps = (eps * (noise * sigma)).to(device=device, dtype=model.cfg.dtype)
        noise_hooks = [(arch.embed_hook(), _noise_hook(eps, *subj))]
        corrupt_names = set()
        for l in range(n_layers):
            corrupt_names |= {arch.resid_pre_hook(l), arch.attn_k_hook(l), arch.attn_v_hook(l)}
        if sever is not None:
            corrupt_names |= {comp_hook[sever](l) for l in range(n_layers)}
        store: dict[str, torch.Tensor] = {}

        def keep(activation: torch.Tensor, hook: HookPoint) -> None:
            store[cast(str, hook.name)] = activation.clone()

        with model.hooks(fwd_hooks=noise_hooks + [(n, keep) for n in sorted(corrupt_names)]):
            final = model(tokens.expand(samples, -1), stop_at_layer=n_layers)
        low = float(target_probability(final_logits(model, final[:, score_pos]), tgt).mean())
        store["final"] = final

        # ---- restorations: one growing batch of (layer, sample) rows per position ----------
        scores = torch.full((n_prompt, n_layers), float("nan"))
        for t in pos_list:
            if t < subj[0]:
                # noise enters at the subject and attention is causal: before the subject the clean
                # and corrupted states agree, so any restoration (windowed or severed) is a no-op
                scores[t] = low
                continue
            per_group = max(1, max_tokens // (samples * (len(input_ids) - t)))  # layers per forward
            groups = [list(range(s, min(s + per_group, n_layers))) for s in range(0, n_layers, per_group)]

            def restore(layers: Sequence[int], t: int = t) -> None:
                got = _trace_position(model, arch, t, kind, window, sever, clean, store, samples, score_pos, tgt,
                                      layers=list(layers)).cpu()
                scores[t, list(layers)] = got[list(layers)]

            run_halving(groups, restore, what="causal tracing")

    decoded = [decode_text(model, [i]) for i in prompt_ids]
    return TraceResult(
        scores=scores, low_score=low, high_score=high, tokens=decoded, token_ids=prompt_ids,
        subject_range=subj, kind=kind, target=decode_text(model, tgt), target_ids=list(tgt),
        window=window if kind != "hidden" else 1, samples=samples, noise=float(noise), sever=sever,
        prompt=prompt, subject=subject, positions=pos_list,
    )


def _trace_positions(model: HookedTransformer, positions: list[int], prompt: str, subject: str,
                     **settings: Any) -> TraceResult:
    """One shard of a traced prompt: :func:`trace` at ``positions``."""
    return trace(model, prompt, subject, positions=positions, **settings)


def _sharded_trace(model: HookedTransformer, prompt: str, subject: str, positions: list[int], workers: Any,
                   shard_size: int | None, settings: dict[str, Any]) -> TraceResult:
    """:func:`trace` with its positions in shards on a pool, the rows put together."""
    from pmet_lens.parallel import auto_shard_size, run_shards, shard_ranges

    size = shard_size or auto_shard_size(len(positions), workers, per_worker=2)
    shards = [(positions[a:b], prompt, subject) for a, b in shard_ranges(len(positions), size)]
    parts = run_shards(model, _trace_positions, shards, common=settings, workers=workers, desc="trace positions")
    scores = torch.full_like(parts[0].scores, float("nan"))
    for part in parts:
        scores[part.positions] = part.scores[part.positions]
    return replace(parts[0], scores=scores, positions=list(positions))


def _trace_position(
    model: HookedTransformer,
    arch: Architecture,
    t: int,
    kind: str,
    window: int,
    sever: str | None,
    clean: ActivationCache | dict[str, torch.Tensor],
    corrupt: dict[str, torch.Tensor],
    samples: int,
    score_pos: list[int],
    tgt: list[int],
    layers: list[int] | None = None,
) -> Float[torch.Tensor, " n_layers"]:
    """Mean P(target) over samples for position ``t`` restored at each of ``layers`` (default every
    layer; the entries of other layers are NaN).

    Only positions ``t..`` are recomputed: earlier positions are unchanged by a restoration at
    ``t`` (causal attention), so their keys and values are those of the corrupted run and are
    fed in as a frozen key/value cache. Rows (layer l, sample s) are ordered by the first block
    they change; at block j the active rows are a prefix of that order, so each block runs once
    per position on one batch that grows as restorations come in.
    """
    n_layers = arch.n_layers
    device = corrupt["final"].device
    if layers is None:
        layers = list(range(n_layers))
    spans = [window_layers(l, window, n_layers) for l in range(n_layers)]
    starts = [l + 1 for l in range(n_layers)] if kind == "hidden" else [sp.start for sp in spans]
    comp_hook = {"mlp": arch.mlp_out_hook, "attn": arch.attn_out_hook}

    def entering(l: int, dev: torch.device) -> torch.Tensor:
        start = starts[l]
        base = corrupt[arch.resid_pre_hook(start)] if start < n_layers else corrupt["final"]
        rows = base[:, t:].to(dev, copy=True)
        if kind == "hidden":
            rows[:, 0] = clean[arch.resid_post_hook(l)][0, t].to(dev)
        return rows

    x = corrupt["final"].new_zeros((0, corrupt["final"].shape[1] - t, model.cfg.d_model))
    active: list[int] = []
    for j in range(n_layers + 1):
        # a model split over devices: the rows move to block j's device (the read-out's after the last)
        dev = block_device(model, j) if j < n_layers else device
        x = x.to(dev)
        new = [l for l in layers if starts[l] == j]
        if new:
            x = torch.cat([x] + [entering(l, dev) for l in new])
            active += new
        if j == n_layers or not active:
            continue
        sample_idx = torch.arange(samples, device=dev).repeat(len(active))
        hooks: list[tuple[str | Callable, Callable]] = []
        if kind != "hidden":
            mine = [i for i, l in enumerate(active) if j in spans[l]]
            if mine:
                rows = (torch.as_tensor(mine, device=dev)[:, None] * samples
                        + torch.arange(samples, device=dev)).flatten()
                name = comp_hook[kind](j)
                hooks.append((name, _restore_hook(clean[name][0, t], rows, torch.zeros_like(rows))))
        elif sever is not None:
            name = comp_hook[sever](j)  # every active row restored h at a layer l < j
            rows = torch.arange(x.shape[0], device=dev)
            hooks.append((name, _restore_hook(corrupt[name][sample_idx, t], rows, torch.zeros_like(rows))))
        entry = TransformerLensKeyValueCacheEntry(
            past_keys=corrupt[arch.attn_k_hook(j)][sample_idx, :t],
            past_values=corrupt[arch.attn_v_hook(j)][sample_idx, :t],
            frozen=True,
        )
        with model.hooks(fwd_hooks=hooks):
            x = model.blocks[j](x, past_kv_cache_entry=entry)
    probs = target_probability(final_logits(model, x[:, [p - t for p in score_pos]]), tgt)
    device = probs.device
    out = torch.full((n_layers,), float("nan"), device=device)
    out[torch.as_tensor(active, device=device)] = probs.view(len(active), samples).mean(dim=1)
    return out
