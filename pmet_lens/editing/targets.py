"""Batched optimisation of the target vectors (PMET eq. 9; MEMIT eq. 16), one pipeline for both.

Per fact i, the rows are the context-prefixed prompts pref_j ⊕ p(s_i) ⊕ o*[:-1] (j = 0 is the
bare prompt) and the KL prompt "{s_i} is a", all from one :class:`PreparedRequests`. The δ's of
all facts of a chunk live in one tensor per site ([facts, d_model]) and are added by hooks at each
row's lookup position (the subject's last token); each fact has its own Adam state
(:class:`PerFactAdam`), φ and stopping state, and a fact that has stopped leaves the batch.
Savings over a full forward per step, exact by construction:

* layers before L do not depend on δ: ``resid_pre`` of block L is computed once without grad;
* positions before a row's lookup position do not depend on δ either (causal attention): their
  keys and values at blocks L.. are taken once from the unedited run and fed in as a frozen
  key/value cache, so every step recomputes only the positions from the lookup on (the subject's
  last token, the rest of the prompt and the target), see ``_Suffix``;
* ``ln_final`` and the unembedding run only at the target and KL positions;
* the model's parameters do not require grad during the loop (only δ does);
* the per-fact bookkeeping stays on the device: the host reads it (one transfer) only every few
  steps on an accelerator (:func:`default_check_every`), stopped facts being masked in between.

δ, its Adam state, the initial outputs' norms and the loss terms are float32 (float64 for a float64
model) whatever the model's dtype; δ is cast to the activation's dtype where the hooks add it. With a
float16 model each fact's loss is scaled for the backward pass (``_LossScale``), whose gradients
would otherwise underflow in float16.

Loss per fact (PMET eq. 9, MEMIT eq. 16, with the official code's weights):
    φ_i · mean_j [Σ_t −log P(o*_t | pref_j ⊕ p(s_i) ⊕ o*_<t)] / |o*|
  + μ · KL(P_edited ‖ P_init)  at the KL prompt's lookup position (the official
    ``kl_div(kl_distr_init, kl_log_probs, log_target=True)``: ``F.kl_div(input, target)`` is
    KL(target ‖ input), here target = the edited distribution)
  + wd · Σ_sites |δ| / |initial output|²   (norm over squared norm, as the official code)
Stopping: loss < ``loss_stop``; PMET also: on a step where every target token is the top
prediction in every prompt, φ_i is 0.1·``nll_factor`` (else ``nll_factor``, so it comes back if o*
loses the top) and the fact stops when its KL term is ≤ ``kl_stop``. After each Adam
step |δ| is clamped to c·|initial output| (c = ``clamp_norm_factor``). As in the official loop
the last iteration only evaluates (``steps`` − 1 updates at most).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Callable, cast

import torch
from jaxtyping import Float
from tqdm.auto import tqdm
from transformer_lens import HookedTransformer
from transformer_lens.cache.key_value_cache_entry import (
    TransformerLensKeyValueCacheEntry,
)

from pmet_lens.core.arch import Architecture, architecture
from pmet_lens.core.devices import block_device
from pmet_lens.core.readout import final_logits
from pmet_lens.editing.hparams import EditHyperParams, Settings, settings_for
from pmet_lens.editing.prepared import PreparedRequests
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["PerFactAdam", "Targets", "compiled_blocks", "default_check_every", "optimise_targets", "require_compiler"]


@dataclass
class Targets:
    """Optimised targets of a list of facts (row i = fact i).

    Attributes:
        init: site -> [facts, d_model] output at L, lookup position of the bare prompt, unedited.
        delta: site -> [facts, d_model] optimised δ.
        steps: [facts] optimisation steps taken by each fact.
        loss: [facts] each fact's loss at its last evaluation.
        prob: [facts] P(o*) at that evaluation (exp of the weighted mean token log-probability).
        phi: [facts] the NLL weight φ_i in that loss (PMET eq. 9: ``nll_factor``, or 0.1·``nll_factor``
            when o* was top in every prompt at the step before).
    """

    init: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    steps: torch.Tensor
    loss: torch.Tensor
    prob: torch.Tensor = field(default_factory=lambda: torch.empty(0))
    phi: torch.Tensor = field(default_factory=lambda: torch.empty(0))

    def value(self, site: str) -> Float[torch.Tensor, "facts d_model"]:
        """Target vector v = initial output + δ at ``site``."""
        return self.init[site] + self.delta[site]


@dataclass
class _Rows:
    tokens: torch.Tensor      # [rows, pos]
    lengths: torch.Tensor     # [rows] unpadded length
    fact: torch.Tensor        # [rows] fact index (chunk-local)
    lookup: torch.Tensor      # [rows] subject-last position
    bare: torch.Tensor        # [facts] row index of the bare prompt
    kl: torch.Tensor          # [facts] row index of the KL prompt
    nll_row: torch.Tensor     # [n_targets] row of each predicted target token
    nll_pos: torch.Tensor     # [n_targets] position whose logits predict it
    nll_tok: torch.Tensor     # [n_targets] the target token id
    nll_fact: torch.Tensor    # [n_targets]
    nll_weight: torch.Tensor  # [n_targets] 1 / (|o*| · P)


def _rows(model: HookedTransformer, requests: PreparedRequests) -> _Rows:
    """The optimisation's rows (:meth:`PreparedRequests.rows` with the target and KL prompts) and,
    per predicted target token, where its log-probability is read and its weight in the NLL term."""
    rows = requests.rows(model, append_target=True, kl=True)
    n_templates = len(requests.templates)
    nll = []
    for r, (i, j) in enumerate(zip(rows.fact.tolist(), rows.template.tolist())):
        if j < 0:
            continue
        tgt = requests.target_ids[i]
        prompt_len = len(requests.prompt_ids[i][j])
        for k, tok in enumerate(tgt):
            nll.append((r, prompt_len - 1 + k, tok, i, 1.0 / (len(tgt) * n_templates)))
    dev = rows.tokens.device
    cols = list(zip(*nll))
    return _Rows(
        tokens=rows.tokens, lengths=rows.lengths, fact=rows.fact, lookup=rows.lookup, bare=rows.bare, kl=rows.kl,
        nll_row=torch.tensor(cols[0], device=dev), nll_pos=torch.tensor(cols[1], device=dev),
        nll_tok=torch.tensor(cols[2], device=dev), nll_fact=torch.tensor(cols[3], device=dev),
        nll_weight=torch.tensor(cols[4], device=dev, dtype=torch.float32),
    )


class PerFactAdam:
    """Adam (Kingma & Ba 2015, Algorithm 1; PyTorch's defaults β = (0.9, 0.999), ε = 1e-8) on
    tensors whose row i belongs to fact i, with a step count t_i per fact.

    A step updates only the rows of the facts it is told to, so every fact follows the trajectory
    that its own ``torch.optim.Adam`` would give it alone, whichever facts share its chunk.

    Args:
        params: name -> ``[facts, d]`` leaf tensors (``requires_grad``), updated in place.
        lr: learning rate.
    """

    def __init__(self, params: dict[str, torch.Tensor], lr: float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = params
        self.lr, self.betas, self.eps = lr, betas, eps
        self.m = {name: torch.zeros_like(p) for name, p in params.items()}  # [facts, d] first moments
        self.v = {name: torch.zeros_like(p) for name, p in params.items()}  # [facts, d] second moments
        first = next(iter(params.values()))
        self.t = torch.zeros(first.shape[0], device=first.device)            # [facts] steps taken

    @torch.no_grad()
    def step(self, update: torch.Tensor) -> None:
        """One Adam step on the rows where ``update`` ([facts] bool) is True, from each ``param.grad``."""
        b1, b2 = self.betas
        self.t = self.t + update.float()
        upd = update[:, None]                    # [facts] -> [facts, 1]
        tt = self.t.clamp_min(1)[:, None]        # [facts] -> [facts, 1]
        for name, d in self.params.items():
            g = d.grad
            if g is None:
                raise RuntimeError(f"Adam step on {name!r} without a gradient (backward was not run)")
            self.m[name] = torch.where(upd, b1 * self.m[name] + (1 - b1) * g, self.m[name])
            self.v[name] = torch.where(upd, b2 * self.v[name] + (1 - b2) * g * g, self.v[name])
            m_hat = self.m[name] / (1 - b1 ** tt)
            v_hat = self.v[name] / (1 - b2 ** tt)
            step = self.lr * m_hat / (v_hat.sqrt() + self.eps)
            d -= torch.where(upd, step, torch.zeros_like(step))


def _clamp_rows(d: torch.Tensor, max_norm: torch.Tensor) -> None:
    """Scale each row of ``d`` ([facts, d]) in place so that its norm is at most ``max_norm`` ([facts])."""
    norm = d.norm(dim=-1)
    scale = torch.where(norm > max_norm, max_norm / norm.clamp_min(1e-12), torch.ones_like(norm))
    d.mul_(scale[:, None])  # [facts] -> [facts, 1]


@dataclass
class _Suffix:
    """The run from block L on, restricted to each row's positions from its lookup position on.

    Row r keeps positions ``lookup_r .. length_r - 1`` (right-padded to a common width S); the keys
    and values of its positions ``0 .. lookup_r - 1`` at every block j >= L come from the unedited
    run and are left-padded to a common length P, with an attention mask that hides the padding.
    Rotary position ids follow from the mask (the real tokens keep their own positions), so the
    result at the kept positions equals the full forward's.
    """

    x: Float[torch.Tensor, "rows S d_model"]
    keys: dict[int, torch.Tensor]     # block -> [rows, P, kv_heads, d_head]
    values: dict[int, torch.Tensor]
    mask: torch.Tensor                # [rows, P + S]
    start: torch.Tensor               # [rows] lookup position (suffix position 0)

    @classmethod
    def build(cls, arch: Architecture, resid_L: torch.Tensor, kv: dict[str, torch.Tensor], rows: "_Rows", L: int,
              n_layers: int) -> "_Suffix":
        dev = resid_L.device
        look, lengths = rows.lookup.to(dev), rows.lengths.to(dev)
        P = int(look.max())
        S = int((lengths - look).max())
        src = look[:, None] + torch.arange(S, device=dev)[None]                   # [rows, S]
        keep = src < lengths[:, None]
        x = resid_L.gather(1, src.clamp(max=resid_L.shape[1] - 1)[..., None].expand(-1, -1, resid_L.shape[-1]))
        x = x * keep[..., None].to(x.dtype)                                           # [rows, S, d_model]
        psrc = torch.arange(P, device=dev)[None] - (P - look)[:, None]              # [rows, P]
        pkeep = psrc >= 0

        def past(t: torch.Tensor) -> torch.Tensor:  # on t's own device (its block's)
            idx = psrc.clamp(min=0).to(t.device)[:, :, None, None].expand(-1, -1, *t.shape[2:])  # [rows, P] -> [rows, P, heads, d_head]
            return t.gather(1, idx) * pkeep.to(t.device)[:, :, None, None].to(t.dtype)

        keys = {j: past(kv[arch.attn_k_hook(j)]) for j in range(L, n_layers)}
        values = {j: past(kv[arch.attn_v_hook(j)]) for j in range(L, n_layers)}
        return cls(x=x, keys=keys, values=values, mask=torch.cat([pkeep, keep], 1).long(), start=look)

    def run(self, model: HookedTransformer, rows: torch.Tensor,
            blocks: dict[int, torch.nn.Module] | None = None) -> Float[torch.Tensor, "rows S d_model"]:
        """Blocks L.. on the suffix of ``rows`` (hooks of ``model.hooks`` fire as usual); ``blocks``
        replaces some of ``model.blocks`` by callables computing the same (compiled ones).

        With a model split over devices (``n_devices > 1``) the residual stream, the mask and the
        row index move to each block's device before it runs, as ``HookedTransformer.forward`` does;
        each block's cached keys and values already live there.
        """
        x, mask = self.x[rows.to(self.x.device)], self.mask[rows.to(self.mask.device)]
        for j in sorted(self.keys):
            dev = self.keys[j].device
            r = rows.to(dev)
            entry = TransformerLensKeyValueCacheEntry(past_keys=self.keys[j][r], past_values=self.values[j][r], frozen=True)
            block = blocks[j] if blocks is not None and j in blocks else model.blocks[j]
            x = block(x.to(dev), past_kv_cache_entry=entry, attention_mask=mask.to(dev))
        return x


def require_compiler(model: HookedTransformer) -> None:
    """Raise :class:`EditError` when ``torch.compile`` cannot work for ``model``: on a CPU, inductor
    needs a C++ compiler."""
    if torch.device(cast(str, model.cfg.device)).type == "cpu" and not (os.environ.get("CXX") or any(
            shutil.which(c) for c in ("c++", "g++", "clang++"))):
        raise EditError("compile=True needs a C++ compiler for torch.compile on a CPU and none was found "
                        "(no c++, g++ or clang++ on PATH, CXX unset): install one (e.g. `apt install g++`) "
                        "or edit with compile=False")


def compiled_blocks(model: HookedTransformer, after: int) -> dict[int, torch.nn.Module]:
    """``torch.compile``d wrappers of the blocks after layer ``after`` (dynamic shapes, so one
    compilation serves every chunk; the model itself is not changed).

    Block L itself stays eager: the δ hooks live there and change at every step, which would make a
    compiled block recompile. Inductor fuses TransformerLens's norm, rotary and GQA layout ops, which
    are about half of a step on a CPU; the result equals the eager run up to float rounding.
    """
    require_compiler(model)
    return {j: cast(torch.nn.Module, torch.compile(model.blocks[j], dynamic=True))
            for j in range(after + 1, model.cfg.n_layers)}


def _final_logprobs(model: HookedTransformer, resid: torch.Tensor) -> torch.Tensor:
    """log-softmax of the logits of a few residual vectors [N, d] (ln_final + unembed only there)."""
    return torch.log_softmax(final_logits(model, resid).float(), dim=-1)


def optimise_targets(
    model: HookedTransformer,
    requests: PreparedRequests,
    hparams: EditHyperParams,
    progress: bool = False,
    compile: bool = False,
    check_every: int | None = None,
    *,
    workers: Any = None,
    shard_size: int | None = None,
    checkpoint: Any = None,
) -> Targets:
    """Optimise every fact's δ's at layer L = max(R), ``hparams.batch_size`` facts per forward.

    ``compile``: run the blocks after L through :func:`compiled_blocks` (``torch.compile``; needs a C++
    compiler on CPU; the first chunk pays the compilation).

    ``check_every``: steps between two reads of the loop's state on the host (stopping, NaN/inf);
    default :func:`default_check_every` of the read-out's device. Every fact's updates and stopping
    step are those of a check at every step (see ``_optimise_chunk``).

    ``workers`` (an int or a :class:`~pmet_lens.parallel.Workers` pool): the facts are optimised in
    shards of ``shard_size`` (default: about two shards per worker, whole chunks when larger than a
    chunk), each worker calling this function on its shard; every fact has its own Adam state, φ and
    stopping, so its targets do not depend on the facts that share its shard (up to float rounding).
    ``checkpoint`` (a :class:`~pmet_lens.parallel.ShardLog`) records each finished shard (one chunk per
    shard in this process), so that a killed run resumes with the unfinished ones.

    Raises:
        EditError: when a loss becomes NaN/inf.
    """
    settings = settings_for(hparams)
    # Facts with similar suffix lengths share a chunk, so little of each step is spent on padding
    # (a row's cost is its padded suffix width). Facts are optimised independently (own Adam
    # state, φ and stopping), so the grouping changes no fact's targets beyond float rounding.
    order = sorted(range(len(requests)), key=requests.suffix_length)
    if workers is not None or checkpoint is not None:
        return _sharded_targets(model, requests, hparams, order, workers, shard_size, progress, compile, checkpoint,
                                check_every)
    chunks = [order[s:s + hparams.batch_size] for s in range(0, len(requests), hparams.batch_size)]
    blocks = compiled_blocks(model, max(hparams.layers)) if compile else None
    parts = [_optimise_chunk(model, requests.subset(idx), hparams, settings, blocks, check_every)
             for idx in tqdm(chunks, desc="targets", disable=not progress or len(chunks) < 2)]
    back = torch.argsort(torch.tensor(order))  # row i of the result = fact i

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors)[back.to(tensors[0].device)]

    return Targets(
        init={s: cat([p.init[s] for p in parts]) for s in settings.delta_sites},
        delta={s: cat([p.delta[s] for p in parts]) for s in settings.delta_sites},
        steps=cat([p.steps for p in parts]), loss=cat([p.loss for p in parts]), prob=cat([p.prob for p in parts]),
        phi=cat([p.phi for p in parts]),
    )


@dataclass
class _Plan:
    """Which rows a run of steps computes (the facts active when it was made) and where their
    target tokens and KL positions are read; fixed between two checks of the host."""

    row_ix: torch.Tensor     # [run rows] rows of the batch that run (on the rows' device)
    r_fact: torch.Tensor     # [run rows] their fact (on δ's device)
    ar: torch.Tensor         # [run rows] 0..run rows − 1 (on δ's device)
    nll_rows: torch.Tensor   # [n_targets] run row of each target token (on the output's device)
    nll_pos: torch.Tensor    # [n_targets] its suffix position
    nll_tok: torch.Tensor    # [n_targets] token id (loss device)
    nll_fact: torch.Tensor   # [n_targets] fact (loss device)
    nll_weight: torch.Tensor  # [n_targets] 1 / (|o*| · P) (loss device)
    kl_rows: torch.Tensor    # [run facts] run row of each fact's KL prompt (on the output's device)
    kl_facts: torch.Tensor   # [run facts] fact index (loss device)

    @classmethod
    def make(cls, rows: _Rows, active: torch.Tensor, delta_dev: torch.device, out_dev: torch.device,
             loss_dev: torch.device) -> "_Plan":
        """The plan of the facts ``active`` ([facts] bool, loss device) now (reads ``active`` on the host)."""
        act = active.to(rows.fact.device)
        act_facts = act.nonzero().flatten()
        row_mask = act[rows.fact]
        row_ix = row_mask.nonzero().flatten()
        new_index = torch.full((rows.tokens.shape[0],), -1, dtype=torch.long, device=row_ix.device)
        new_index[row_ix] = torch.arange(len(row_ix), device=row_ix.device)
        sel = row_mask[rows.nll_row].nonzero().flatten()
        nll_row = rows.nll_row[sel]
        return cls(
            row_ix=row_ix, r_fact=rows.fact[row_ix].to(delta_dev), ar=torch.arange(len(row_ix), device=delta_dev),
            nll_rows=new_index[nll_row].to(out_dev), nll_pos=(rows.nll_pos[sel] - rows.lookup[nll_row]).to(out_dev),
            nll_tok=rows.nll_tok[sel].to(loss_dev), nll_fact=rows.nll_fact[sel].to(loss_dev),
            nll_weight=rows.nll_weight[sel].to(loss_dev), kl_rows=new_index[rows.kl[act_facts]].to(out_dev),
            kl_facts=act_facts.to(loss_dev))


def default_check_every(device: torch.device | str) -> int:
    """Steps between two reads of the optimisation's state on the host (stopping, NaN/inf): 1 on a
    CPU, where reading costs nothing and finished facts leave the batch at once; 5 on an
    accelerator, where each read waits for the device."""
    return 1 if torch.device(device).type == "cpu" else 5


def _sharded_targets(model: HookedTransformer, requests: PreparedRequests, hparams: EditHyperParams, order: list[int],
                     workers: Any, shard_size: int | None, progress: bool, compile: bool, checkpoint: Any,
                     check_every: int | None = None) -> Targets:
    """:func:`optimise_targets` over shards of facts (in the chunks' suffix-length order), on a pool or
    (with a checkpoint alone) here, one chunk per shard."""
    from pmet_lens.parallel import auto_shard_size, run_shards, shard_ranges

    size = shard_size or (auto_shard_size(len(order), workers, per_worker=2) if workers is not None else hparams.batch_size)
    if shard_size is None and size > hparams.batch_size:  # whole chunks, as the single process forms them
        size = hparams.batch_size * -(-size // hparams.batch_size)
    shards = [(requests.subset(order[a:b]),) for a, b in shard_ranges(len(order), size)]
    parts = run_shards(model, optimise_targets, shards, common={"hparams": hparams, "compile": compile, "check_every": check_every},
                       workers=workers, checkpoint=checkpoint, desc="targets", progress=progress)
    back = torch.argsort(torch.tensor(order))  # row i of the result = fact i
    device = torch.device(cast(str, model.cfg.device))

    def cat(tensors: list[torch.Tensor], to_device: bool = True) -> torch.Tensor:
        out = torch.cat([t.cpu() for t in tensors])[back]
        return out.to(device) if to_device else out

    sites = list(parts[0].init)
    return Targets(init={s: cat([p.init[s] for p in parts]) for s in sites},
                   delta={s: cat([p.delta[s] for p in parts]) for s in sites},
                   steps=cat([p.steps for p in parts], False), loss=cat([p.loss for p in parts], False),
                   prob=cat([p.prob for p in parts], False), phi=cat([p.phi for p in parts], False))


def _optimise_chunk(model: HookedTransformer, requests: PreparedRequests, hparams: EditHyperParams,
                    settings: Settings, blocks: dict[int, torch.nn.Module] | None = None,
                    check_every: int | None = None) -> Targets:
    """One chunk of facts (see :func:`optimise_targets`).

    All per-fact bookkeeping (active set, φ, steps, last loss and probability, the step of a first
    NaN/inf) stays on the device and is updated every step with stopped facts masked out; the host
    reads it only after every ``check_every``-th step (one transfer), to end the loop when every
    fact has stopped, to raise on NaN/inf, and to drop the stopped facts' rows from the batch. A
    fact's updates are those of a check at every step: a fact that stops between two checks is
    masked from then on (no Adam step, no recorded loss, no gradient), it only keeps being computed
    until the next check. With ``check_every=1`` this is the loop that reads the host every step.
    """
    arch = architecture(model)
    L = max(hparams.layers)
    rows = _rows(model, requests)
    n = len(requests)
    n_layers = model.cfg.n_layers
    hooks = {site: arch.delta_hook(site, L) for site in settings.delta_sites}
    loss_dev = model.unembed.W_U.device      # the read-out's device: per-fact losses and bookkeeping
    out_dev = block_device(model, n_layers - 1)  # where the suffix run ends
    every = check_every if check_every is not None else default_check_every(loss_dev)
    if every < 1:
        raise ValueError(f"check_every must be >= 1, got {every}")
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grad_state:
            p.requires_grad_(False)
        with torch.no_grad():
            resid_L = model(rows.tokens, stop_at_layer=L)  # resid_pre of block L, computed once
            captured: dict[str, torch.Tensor] = {}

            kv: dict[str, torch.Tensor] = {}

            def capture(act, hook):
                bare = rows.bare.to(act.device)
                captured[hook.name] = act[bare, rows.lookup.to(act.device)[bare]].detach().clone()

            def keep_kv(act, hook):
                kv[hook.name] = act.detach()

            kv_hooks: list[tuple[str | Callable, Callable]] = [
                (h, keep_kv) for j in range(L, n_layers) for h in (arch.attn_k_hook(j), arch.attn_v_hook(j))]
            fwd: list[tuple[str | Callable, Callable]] = [(h, capture) for h in hooks.values()]
            with model.hooks(fwd_hooks=fwd + kv_hooks):
                final = model(resid_L, start_at_layer=L, stop_at_layer=n_layers)
            kl_at = rows.kl.to(final.device)
            kl_init = _final_logprobs(model, final[kl_at, rows.lookup.to(final.device)[kl_at]]).to(loss_dev)
            suffix = _Suffix.build(arch, resid_L, kv, rows, L, n_layers)
            kv.clear()  # the suffix keeps only the cached prefix of each tensor
            del final
        # δ, its Adam state and the initial outputs' norms in float32 (float64 for a float64 model)
        init = {site: captured[h].to(torch.promote_types(captured[h].dtype, torch.float32)) for site, h in hooks.items()}
        delta = {site: torch.zeros_like(v, requires_grad=True) for site, v in init.items()}
        init_norm = {site: v.norm(dim=-1) for site, v in init.items()}
        delta_dev = next(iter(init.values())).device  # block L's
        adam = PerFactAdam(delta, hparams.lr)
        # float16 activations: the backward through the model underflows without loss scaling
        scale = _LossScale(n, delta_dev) if next(iter(captured.values())).dtype == torch.float16 else None
        nll_factor = float(hparams.nll_factor)
        phi = torch.full((n,), nll_factor, device=loss_dev)
        active = torch.ones(n, dtype=torch.bool, device=loss_dev)
        steps = torch.zeros(n, dtype=torch.long, device=loss_dev)
        last_loss = torch.zeros(n, device=loss_dev)
        last_prob = torch.zeros(n, device=loss_dev)
        last_phi = torch.zeros(n, device=loss_dev)
        bad_step = torch.full((n,), -1, dtype=torch.long, device=loss_dev)  # first step with NaN/inf, per fact
        plan = _Plan.make(rows, active, delta_dev, out_dev, loss_dev)
        for it in range(hparams.steps):
            pl = plan

            def add_delta(act, hook, _site_of={h: s for s, h in hooks.items()}):
                d = delta[_site_of[hook.name]][pl.r_fact].to(act.dtype)
                return act.index_put((pl.ar, torch.zeros_like(pl.ar)), d, accumulate=True)  # suffix position 0 = lookup

            with torch.enable_grad(), model.hooks(fwd_hooks=[(h, add_delta) for h in hooks.values()]):
                out = suffix.run(model, pl.row_ix, blocks)
                lp = _final_logprobs(model, out[pl.nll_rows, pl.nll_pos]).to(loss_dev)
                tok_lp = lp.gather(1, pl.nll_tok[:, None])[:, 0]  # [n_targets, vocab] -> [n_targets]
                is_top = lp.argmax(-1) == pl.nll_tok
                nll = torch.zeros(n, device=loss_dev).index_add(0, pl.nll_fact, -tok_lp * pl.nll_weight)
                all_top = torch.zeros(n, device=loss_dev).index_add(0, pl.nll_fact, (~is_top).float()) == 0
                kl_lp = _final_logprobs(model, out[pl.kl_rows, 0]).to(loss_dev)
                kl = torch.zeros(n, device=loss_dev)
                kl = kl.index_put((pl.kl_facts,), _kl_term(kl_lp, kl_init[pl.kl_facts]))
                wd = torch.zeros(n, device=loss_dev)
                for site in delta:
                    wd = wd + (hparams.weight_decay * delta[site].norm(dim=-1) / init_norm[site].clamp_min(1e-12) ** 2
                               ).to(loss_dev, torch.float32)
                loss = phi * nll + hparams.kl_factor * kl + wd
            with torch.no_grad():
                finite = torch.isfinite(loss)
                bad_step = torch.where(active & ~finite & (bad_step < 0), it, bad_step)
                ok = active & finite  # a fact with NaN/inf stops here; the next check raises
                last_loss = torch.where(ok, loss.detach(), last_loss)
                prob = torch.zeros(n, device=loss_dev).index_add(0, pl.nll_fact, tok_lp.detach() * pl.nll_weight).exp()
                last_prob = torch.where(ok, prob, last_prob)
                last_phi = torch.where(ok, phi, last_phi)  # the φ of this loss, before the update below
                steps = torch.where(ok, it, steps)
                stop = (loss.detach() < hparams.loss_stop) & ok
                if settings.kl_stop is not None:
                    top = all_top & ok
                    # φ is 0.1·nll_factor on a step where o* is top and back to nll_factor on a step
                    # where it is not (the official compute_zs's if/else), not 0.1 for good
                    phi = torch.where(top, 0.1 * nll_factor, nll_factor)
                    stop |= top & (kl.detach() <= settings.kl_stop)
            if it == hparams.steps - 1:
                break
            still = ok & ~stop
            check = (it + 1) % every == 0
            if check:  # the host reads the state: one transfer
                any_still, any_bad = torch.stack([still.any(), (bad_step >= 0).any()]).tolist()
                if any_bad:
                    _raise_nonfinite(requests, bad_step)
                if not any_still:
                    break
            with torch.enable_grad():  # callers often run under torch.no_grad() / set_grad_enabled(False)
                scaled = loss if scale is None else loss * scale.value.to(loss_dev)
                torch.where(still, scaled, torch.zeros_like(scaled)).sum().backward()  # no gradient from stopped facts
            update = still.to(delta_dev)
            if scale is not None:
                update = update & scale.unscale(delta, update)
            adam.step(update)
            with torch.no_grad():
                for site, d in delta.items():
                    _clamp_rows(d, hparams.clamp_norm_factor * init_norm[site])
                    d.grad = None
            active = still
            if check:  # the stopped facts' rows leave the batch
                plan = _Plan.make(rows, active, delta_dev, out_dev, loss_dev)
        if bool((bad_step >= 0).any()):
            _raise_nonfinite(requests, bad_step)
        return Targets(init=init, delta={s: d.detach() for s, d in delta.items()}, steps=(steps + 1).cpu(),
                       loss=last_loss.cpu(), prob=last_prob.cpu(), phi=last_phi.cpu())
    finally:
        for p, state in grad_state:
            p.requires_grad_(state)


class _LossScale:
    """Per-fact dynamic loss scaling of the target loss for a float16 model (as mixed-precision
    training does): fact i's loss is multiplied by s_i (a power of 2, so exactly) before the backward
    pass and its δ's gradient divided by s_i after it, in float32. A fact whose gradient overflowed
    skips that step's update and halves s_i; everything stays on the device."""

    def __init__(self, n: int, device: torch.device, init: float = 2.0 ** 16) -> None:
        self.value = torch.full((n,), init, device=device)  # [facts]

    @torch.no_grad()
    def unscale(self, delta: dict[str, torch.Tensor], update: torch.Tensor) -> torch.Tensor:
        """Divide each δ's gradient by the scale; [facts] bool: the rows whose gradient is finite
        (the others' scales are halved where ``update``)."""
        finite = torch.ones_like(update)
        for d in delta.values():
            if d.grad is not None:
                d.grad = d.grad / self.value[:, None]  # [facts] -> [facts, 1]
                finite &= torch.isfinite(d.grad).all(dim=-1)
        self.value = torch.where(update & ~finite, self.value / 2, self.value)
        return finite


def _raise_nonfinite(requests: PreparedRequests, bad_step: torch.Tensor) -> None:
    """Raise :class:`EditError` naming the facts whose loss became NaN/inf and the first such step."""
    bad = bad_step.cpu()
    facts = [requests.facts[i].where for i in (bad >= 0).nonzero().flatten().tolist()]
    raise EditError(f"the target optimisation produced NaN/inf for {facts} at step {int(bad[bad >= 0].min())}")


def _kl_term(edited: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """KL(P_edited ‖ P_init) = Σ_v P_edited(v) (log P_edited(v) − log P_init(v)) per row, from the
    ``[facts, vocab]`` log-probabilities at the KL prompt (PMET eq. 9's KL term in the direction of the
    official code, whose ``F.kl_div(log P_init, log P_edited, log_target=True)`` is this)."""
    return (edited.exp() * (edited - init)).sum(-1)
