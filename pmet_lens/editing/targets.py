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
* the model's parameters do not require grad during the loop (only δ does).

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
from pmet_lens.core.readout import final_logits
from pmet_lens.editing.hparams import EditHyperParams, Settings, settings_for
from pmet_lens.editing.prepared import PreparedRequests
from pmet_lens.editing.validate import EditError

logger = logging.getLogger(__name__)

__all__ = ["PerFactAdam", "Targets", "compiled_blocks", "optimise_targets", "require_compiler"]


@dataclass
class Targets:
    """Optimised targets of a list of facts (row i = fact i).

    Attributes:
        init: site -> [facts, d_model] output at L, lookup position of the bare prompt, unedited.
        delta: site -> [facts, d_model] optimised δ.
        steps: [facts] optimisation steps taken by each fact.
        loss: [facts] each fact's loss at its last evaluation.
    """

    init: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    steps: torch.Tensor
    loss: torch.Tensor
    prob: torch.Tensor = field(default_factory=lambda: torch.empty(0))

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
        look, lengths = rows.lookup, rows.lengths
        dev = resid_L.device
        P = int(look.max())
        S = int((lengths - look).max())
        src = look[:, None] + torch.arange(S, device=dev)[None]                   # [rows, S]
        keep = src < lengths[:, None]
        x = resid_L.gather(1, src.clamp(max=resid_L.shape[1] - 1)[..., None].expand(-1, -1, resid_L.shape[-1]))
        x = x * keep[..., None].to(x.dtype)                                           # [rows, S, d_model]
        psrc = torch.arange(P, device=dev)[None] - (P - look)[:, None]              # [rows, P]
        pkeep = psrc >= 0

        def past(t: torch.Tensor) -> torch.Tensor:
            idx = psrc.clamp(min=0)[:, :, None, None].expand(-1, -1, *t.shape[2:])  # [rows, P] -> [rows, P, heads, d_head]
            return t.gather(1, idx) * pkeep[:, :, None, None].to(t.dtype)

        keys = {j: past(kv[arch.attn_k_hook(j)]) for j in range(L, n_layers)}
        values = {j: past(kv[arch.attn_v_hook(j)]) for j in range(L, n_layers)}
        return cls(x=x, keys=keys, values=values, mask=torch.cat([pkeep, keep], 1).long(), start=look)

    def run(self, model: HookedTransformer, rows: torch.Tensor,
            blocks: dict[int, torch.nn.Module] | None = None) -> Float[torch.Tensor, "rows S d_model"]:
        """Blocks L.. on the suffix of ``rows`` (hooks of ``model.hooks`` fire as usual); ``blocks``
        replaces some of ``model.blocks`` by callables computing the same (compiled ones)."""
        x, mask = self.x[rows], self.mask[rows]
        for j in sorted(self.keys):
            entry = TransformerLensKeyValueCacheEntry(
                past_keys=self.keys[j][rows], past_values=self.values[j][rows], frozen=True)
            block = blocks[j] if blocks is not None and j in blocks else model.blocks[j]
            x = block(x, past_kv_cache_entry=entry, attention_mask=mask)
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
    *,
    workers: Any = None,
    shard_size: int | None = None,
    checkpoint: Any = None,
) -> Targets:
    """Optimise every fact's δ's at layer L = max(R), ``hparams.batch_size`` facts per forward.

    ``compile``: run the blocks after L through :func:`compiled_blocks` (``torch.compile``; needs a C++
    compiler on CPU; the first chunk pays the compilation).

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
        return _sharded_targets(model, requests, hparams, order, workers, shard_size, progress, compile, checkpoint)
    chunks = [order[s:s + hparams.batch_size] for s in range(0, len(requests), hparams.batch_size)]
    blocks = compiled_blocks(model, max(hparams.layers)) if compile else None
    parts = [_optimise_chunk(model, requests.subset(idx), hparams, settings, blocks)
             for idx in tqdm(chunks, desc="targets", disable=not progress or len(chunks) < 2)]
    back = torch.argsort(torch.tensor(order))  # row i of the result = fact i

    def cat(tensors: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(tensors)[back.to(tensors[0].device)]

    return Targets(
        init={s: cat([p.init[s] for p in parts]) for s in settings.delta_sites},
        delta={s: cat([p.delta[s] for p in parts]) for s in settings.delta_sites},
        steps=cat([p.steps for p in parts]), loss=cat([p.loss for p in parts]), prob=cat([p.prob for p in parts]),
    )


def _sharded_targets(model: HookedTransformer, requests: PreparedRequests, hparams: EditHyperParams, order: list[int],
                     workers: Any, shard_size: int | None, progress: bool, compile: bool, checkpoint: Any) -> Targets:
    """:func:`optimise_targets` over shards of facts (in the chunks' suffix-length order), on a pool or
    (with a checkpoint alone) here, one chunk per shard."""
    from pmet_lens.parallel import auto_shard_size, run_shards, shard_ranges

    size = shard_size or (auto_shard_size(len(order), workers, per_worker=2) if workers is not None else hparams.batch_size)
    if shard_size is None and size > hparams.batch_size:  # whole chunks, as the single process forms them
        size = hparams.batch_size * -(-size // hparams.batch_size)
    shards = [(requests.subset(order[a:b]),) for a, b in shard_ranges(len(order), size)]
    parts = run_shards(model, optimise_targets, shards, common={"hparams": hparams, "compile": compile},
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
                   prob=cat([p.prob for p in parts], False))


def _optimise_chunk(model: HookedTransformer, requests: PreparedRequests, hparams: EditHyperParams,
                    settings: Settings, blocks: dict[int, torch.nn.Module] | None = None) -> Targets:
    arch = architecture(model)
    L = max(hparams.layers)
    rows = _rows(model, requests)
    n = len(requests)
    n_layers = model.cfg.n_layers
    hooks = {site: arch.delta_hook(site, L) for site in settings.delta_sites}
    grad_state = [(p, p.requires_grad) for p in model.parameters()]
    try:
        for p, _ in grad_state:
            p.requires_grad_(False)
        with torch.no_grad():
            resid_L = model(rows.tokens, stop_at_layer=L)  # resid_pre of block L, computed once
            captured: dict[str, torch.Tensor] = {}

            kv: dict[str, torch.Tensor] = {}

            def capture(act, hook):
                captured[hook.name] = act[rows.bare, rows.lookup[rows.bare]].detach().clone()

            def keep_kv(act, hook):
                kv[hook.name] = act.detach()

            kv_hooks: list[tuple[str | Callable, Callable]] = [
                (h, keep_kv) for j in range(L, n_layers) for h in (arch.attn_k_hook(j), arch.attn_v_hook(j))]
            fwd: list[tuple[str | Callable, Callable]] = [(h, capture) for h in hooks.values()]
            with model.hooks(fwd_hooks=fwd + kv_hooks):
                final = model(resid_L, start_at_layer=L, stop_at_layer=n_layers)
            kl_init = _final_logprobs(model, final[rows.kl, rows.lookup[rows.kl]])
            suffix = _Suffix.build(arch, resid_L, kv, rows, L, n_layers)
            kv.clear()  # the suffix keeps only the cached prefix of each tensor
            del final
        init = {site: captured[h] for site, h in hooks.items()}
        delta = {site: torch.zeros_like(v, requires_grad=True) for site, v in init.items()}
        init_norm = {site: v.norm(dim=-1) for site, v in init.items()}
        adam = PerFactAdam(delta, hparams.lr)
        phi = torch.full((n,), float(hparams.nll_factor), device=resid_L.device)
        active = torch.ones(n, dtype=torch.bool, device=resid_L.device)
        steps = torch.zeros(n, dtype=torch.long)
        last_loss = torch.zeros(n)
        last_prob = torch.zeros(n)
        for it in range(hparams.steps):
            act_facts = active.nonzero().flatten()
            row_mask = active[rows.fact]
            row_ix = row_mask.nonzero().flatten()
            new_index = torch.full((rows.tokens.shape[0],), -1, dtype=torch.long, device=row_ix.device)
            new_index[row_ix] = torch.arange(len(row_ix), device=row_ix.device)
            r_fact = rows.fact[row_ix]
            ar = torch.arange(len(row_ix), device=row_ix.device)
            zero = torch.zeros_like(ar)

            def add_delta(act, hook, _site_of={h: s for s, h in hooks.items()}):
                d = delta[_site_of[hook.name]][r_fact].to(act.dtype)
                return act.index_put((ar, zero), d, accumulate=True)  # suffix position 0 = lookup

            with torch.enable_grad(), model.hooks(fwd_hooks=[(h, add_delta) for h in hooks.values()]):
                out = suffix.run(model, row_ix, blocks)
                sel = row_mask[rows.nll_row]
                nll_rows = new_index[rows.nll_row[sel]]
                lp = _final_logprobs(model, out[nll_rows, rows.nll_pos[sel] - rows.lookup[rows.nll_row[sel]]])
                tok = rows.nll_tok[sel]
                tok_lp = lp.gather(1, tok[:, None])[:, 0]  # [n_targets, vocab] -> [n_targets]
                is_top = lp.argmax(-1) == tok
                nll = torch.zeros(n, device=lp.device).index_add(0, rows.nll_fact[sel], -tok_lp * rows.nll_weight[sel])
                all_top = torch.zeros(n, device=lp.device).index_add(0, rows.nll_fact[sel], (~is_top).float()) == 0
                kl_lp = _final_logprobs(model, out[new_index[rows.kl[act_facts]], 0])
                kl = torch.zeros(n, device=lp.device)
                kl = kl.index_put((act_facts,), _kl_term(kl_lp, kl_init[act_facts]))
                wd = torch.zeros(n, device=lp.device)
                for site in delta:
                    wd = wd + hparams.weight_decay * delta[site].norm(dim=-1).float() / init_norm[site].float().clamp_min(1e-12) ** 2
                loss = phi * nll + hparams.kl_factor * kl + wd
            if not torch.isfinite(loss[active]).all():
                bad = [requests.facts[int(i)].where for i in act_facts if not torch.isfinite(loss[i])]
                raise EditError(f"the target optimisation produced NaN/inf for {bad} at step {it}")
            with torch.no_grad():
                la = loss.detach().cpu()
                last_loss[active.cpu()] = la[active.cpu()]
                prob = torch.zeros(n, device=lp.device).index_add(0, rows.nll_fact[sel], tok_lp.detach() * rows.nll_weight[sel]).exp()
                last_prob[active.cpu()] = prob.cpu()[active.cpu()]
                steps[active.cpu()] = it
                stop = (loss.detach() < hparams.loss_stop) & active
                if settings.kl_stop is not None:
                    top = all_top & active
                    # φ is 0.1·nll_factor on a step where o* is top and back to nll_factor on a step
                    # where it is not (the official compute_zs's if/else), not 0.1 for good
                    phi = torch.where(top, 0.1 * float(hparams.nll_factor), float(hparams.nll_factor))
                    stop |= top & (kl.detach() <= settings.kl_stop)
            if it == hparams.steps - 1:
                break
            still = active & ~stop
            if not still.any():
                active = still
                break
            with torch.enable_grad():  # callers often run under torch.no_grad() / set_grad_enabled(False)
                loss[still].sum().backward()
            adam.step(still)
            with torch.no_grad():
                for site, d in delta.items():
                    _clamp_rows(d, hparams.clamp_norm_factor * init_norm[site])
                    d.grad = None
            active = still
        steps += 1
        return Targets(init=init, delta={s: d.detach() for s, d in delta.items()}, steps=steps, loss=last_loss,
                       prob=last_prob)
    finally:
        for p, state in grad_state:
            p.requires_grad_(state)


def _kl_term(edited: torch.Tensor, init: torch.Tensor) -> torch.Tensor:
    """KL(P_edited ‖ P_init) = Σ_v P_edited(v) (log P_edited(v) − log P_init(v)) per row, from the
    ``[facts, vocab]`` log-probabilities at the KL prompt (PMET eq. 9's KL term in the direction of the
    official code, whose ``F.kl_div(log P_init, log P_edited, log_target=True)`` is this)."""
    return (edited.exp() * (edited - init)).sum(-1)
