"""Peak memory of every stage on random Llama-shaped checkpoints, beside an official-style baseline
measured in the same run, and a memory model fitted to the measured points.

Points: the shapes of ``llama_shapes.SHAPES`` (about 0.5B, 1.2B and 2.5B parameters, vocabulary
128,256, ``d_mlp`` up to 8192), each loaded in float32 and in bfloat16, R = 5 layers (3..7). Steps:

* ``load``: ``pmet_lens.load_model(checkpoint)``;
* ``cov``: C = E[kkᵀ] of R's layers (:class:`~pmet_lens.editing.covariance.CovarianceStore`);
* ``edit16`` / ``edit64``: a PMET edit of 16 / 64 CounterFact facts (C read from the cache);
* ``alphaedit``: one AlphaEdit batch of 32 facts (P computed in the step);
* ``session3``: an :class:`~pmet_lens.editing.session.EditSession` of 3 AlphaEdit batches of 16 (P
  read from the cache the ``alphaedit`` step wrote, as a session would);
* ``eval32``: :func:`~pmet_lens.evaluation.evaluate_counterfact` on 32 records (generation on every
  4th record, ROME's 100-token texts);
* ``export``: :func:`~pmet_lens.export_hf`.

How memory is measured: every (point, implementation, step) runs in a fresh subprocess. The worker
loads the model, resets the kernel's peak-RSS counter (``/proc/self/clear_refs``, value 5), runs
the step and reads ``VmHWM`` (the peak resident set size since the reset) from ``/proc/self/status``:
the step's peak with the model resident, loading's transient excluded (the ``load`` step reports the
whole process's peak instead). glibc's mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so freed
tensors are returned to the kernel and the peak is that of live memory. Peak RSS is one pool: on a
CPU it is all the memory the step used; on a GPU the lean path keeps C, P and a session's history in
host memory, so the device holds less (docs/memory.md).

The baseline (``--impl baseline``), written here and not in the library, does the same steps the way
the official MEMIT / AlphaEdit / ROME code does them, on the same model:

* ``load``: transformers' ``AutoModelForCausalLM.from_pretrained`` (the official code's model);
* ``cov``: float64 sums of every R layer at once in one pass (each batch's product converted to a
  float64 temporary), every C kept;
* ``edit*``: a whole-model copy (``copy.deepcopy``, as ``apply_memit_to_model(copy=True)`` /
  EasyEdit's ``keep_original_weight``), targets optimised one fact at a time with the full forward
  and full ``[rows, pos, vocab]`` logits in the loss (``compute_z``; only the first
  ``--baseline-facts`` facts, 4, are optimised: each fact's loop holds the same memory, so the rest
  take those facts' δ and only the time is saved), keys of all facts x templates in
  one forward per layer (``compute_ks``), and ``torch.linalg.solve(λ C.double() + KᵀK, KᵀR)`` in
  float64 per layer with every layer's C held;
* ``alphaedit`` / ``session3``: P of every layer from an SVD of C, stacked with ``cache_c``
  ([layers, d, d] float32 each), the non-symmetric ``solve(P (K1ᵀK1 + cache_c) + αI, P K1ᵀ R)``;
* ``eval32``: per record one forward of all its (prompt, object) rows with full logits, and
  generation with full logits at the prompt's forward;
* ``export``: the TransformerLens weights converted into a full transformers state dict, loaded
  into a second transformers model, saved.

The benchmark measures memory, not quality: targets take ``--steps`` (default 2) optimisation steps
(peak memory is reached in the first step) and C is estimated from ``--cov-tokens`` (default 8192)
WikiText tokens. A point predicted (from the points measured so far, see ``_guard``; a generous
prior, ``_prior``, before any) above ``--limit-gb`` is not run: it is reported as ``skipped`` with the
prediction.

The fit: per (implementation, step), least squares with non-negative coefficients of
``peak = a·W + b·S + c·F + d`` over the measured points, W = parameters x bytes per parameter,
S = |R| · d_mlp² · 4 (C of R's layers in float32), F = the facts' prompt tokens x d_model x 4 (edits
only); each point's relative error is reported. Results: ``<out>/memory_points.csv`` (one row per
point and step), ``<out>/memory_fit.json``. docs/memory.md is written from them by
``scripts/memory_doc.py``.

    python benchmarks/bench_memory.py --quick      # the 0.5B point in bfloat16, about 5 minutes
    python benchmarks/bench_memory.py              # every point (run alone; see docs/memory.md)
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
LAYERS = (3, 4, 5, 6, 7)
STEPS = ("load", "cov", "edit16", "edit64", "alphaedit", "session3", "eval32", "export")
PREFIXES = ("The first thing to say about it is that", "Therefore it is worth knowing that",
            "Because of this, many people think that", "I have always been told that",
            "You may be surprised to learn that")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
GB = 1e9


# ------------------------------------------------------------------------------------- worker
def _status(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", text).group(1)) * 1024  # type: ignore[union-attr]


def _reset_peak() -> None:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


def _facts(n: int, offset: int = 0) -> list:
    from pmet_lens.data import load_counterfact

    return load_counterfact()[offset:offset + n]


def _hparams(method: str, cov_tokens: int, steps: int):
    from pmet_lens.editing.hparams import AlphaEditHyperParams, PMETHyperParams

    common = dict(layers=LAYERS, cov_tokens=cov_tokens, cov_seq_len=256, steps=steps, context_prefixes=PREFIXES,
                  batch_size=8)
    if method == "alphaedit":
        return AlphaEditHyperParams(nullspace_threshold=2e-2, l2=10.0, **common)
    return PMETHyperParams(lam=600.0, **common)


def _fact_tokens(model, facts) -> int:
    """Tokens of the facts' prompt rows (every context template and the KL prompt)."""
    from pmet_lens.editing.prepared import prepare_requests

    req = prepare_requests(model, facts, PREFIXES)
    return sum(len(ids) for row in req.prompt_ids for ids in row) + sum(len(ids) for ids in req.kl_ids)


def lean_step(step: str, model, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    """One step with the library as it is."""
    from pmet_lens import export_hf
    from pmet_lens.core.arch import architecture
    from pmet_lens.editing import CovarianceStore, edit
    from pmet_lens.editing.nullspace import NullspaceStore
    from pmet_lens.editing.session import EditSession
    from pmet_lens.evaluation import evaluate_counterfact

    store = CovarianceStore(work / "cov", progress=False)
    info: dict[str, Any] = {}
    if step == "cov":
        arch = architecture(model)
        store.get(model, [arch.mlp_key_hook(l) for l in LAYERS], args.cov_tokens, "float32", 256)
    elif step in ("edit16", "edit64"):
        facts = _facts(int(step[4:]))
        info["fact_tokens"] = _fact_tokens(model, facts)
        edit(model, facts, hparams=_hparams("pmet", args.cov_tokens, args.steps_opt), cov_store=store, progress=False)
    elif step == "alphaedit":
        facts = _facts(32)
        info["fact_tokens"] = _fact_tokens(model, facts)
        edit(model, facts, hparams=_hparams("alphaedit", args.cov_tokens, args.steps_opt), cov_store=store,
             nullspace_store=NullspaceStore(work / "ns"), progress=False)  # P computed here, cached for session3
    elif step == "session3":
        session = EditSession(model, hparams=_hparams("alphaedit", args.cov_tokens, args.steps_opt), cov_store=store,
                              nullspace_store=NullspaceStore(work / "ns"), progress=False)  # P from alphaedit's cache
        for b in range(3):
            session.edit(_facts(16, offset=100 + 16 * b))
    elif step == "eval32":
        evaluate_counterfact(model, _facts(32), generation=True, gen_every=4, max_length=args.gen_length,
                             progress=False)
    elif step == "export":
        export_hf(model, work / "export_lean", overwrite=True)
    else:
        raise ValueError(step)
    return info


# ------------------------------------------------------------------ the official-style baseline
def _baseline_covs(model, work: Path, args: argparse.Namespace):
    """Every R layer's C as the official code holds them: all layers at once, from the cache files of the
    ``cov`` step (float32), kept together for the whole edit."""
    from pmet_lens.core.arch import architecture
    from pmet_lens.editing import CovarianceStore

    arch = architecture(model)
    hooks = [arch.mlp_key_hook(l) for l in LAYERS]
    return CovarianceStore(work / "cov", progress=False).get(model, hooks, args.cov_tokens, "float32", 256)


def _baseline_cov_build(model, args: argparse.Namespace) -> None:
    """C of R's layers as pmet-lens did before its lean path (and as MEMIT's statistics with a float64
    accumulator): one pass, a float64 sum per layer, each batch's product converted to float64."""
    import torch

    from pmet_lens.core.arch import architecture
    from pmet_lens.core.tokens import pad
    from pmet_lens.editing import CovarianceStore

    arch = architecture(model)
    hooks = [arch.mlp_key_hook(l) for l in LAYERS]
    store = CovarianceStore(False, progress=False)
    chunks = store._chunks(model, args.cov_tokens, 256)
    sums: dict[str, torch.Tensor] = {}
    mask_holder: dict[str, torch.Tensor] = {}
    count = 0

    def accumulate(act, hook):
        flat = act.reshape(act.shape[0] * act.shape[1], -1)[mask_holder["mask"]].float()
        prod = flat.T @ flat
        if hook.name in sums:
            sums[hook.name] += prod.to(torch.float64)
        else:
            sums[hook.name] = prod.to(torch.float64)

    with torch.no_grad(), model.hooks(fwd_hooks=[(h, accumulate) for h in hooks]):
        for start in range(0, len(chunks), 4):
            batch = pad(model, chunks[start:start + 4])
            width = batch.tokens.shape[1]
            mask_holder["mask"] = (torch.arange(width)[None, :] < batch.lengths[:, None]).reshape(-1)
            count += int(mask_holder["mask"].sum())
            model(batch.tokens, stop_at_layer=max(LAYERS) + 1)
    covs = {h: (sums[h] / count).to(torch.float32) for h in hooks}
    del covs


def _baseline_targets(model, requests, steps: int, site: str, layer: int, optimised: int):
    """MEMIT's ``compute_z`` one fact at a time: δ at ``site`` of ``layer`` for every row, the full forward
    and the full ``[rows, pos, vocab]`` log-softmax in the loss, Adam (lr 0.5), weight decay.

    Only the first ``optimised`` facts are optimised (each fact's loop holds the same memory, so more
    facts would not raise the peak, only the time); fact i after them gets its own initial output plus
    the δ of fact ``i mod optimised``."""
    import torch

    from pmet_lens.core.arch import architecture
    from pmet_lens.core.tokens import pad

    arch = architecture(model)
    hook_name = arch.delta_hook(site, layer)
    for p in model.parameters():  # as the official code: only δ requires grad
        p.requires_grad_(False)
    targets: list = []
    inits: list = []
    for i in range(len(requests)):
        if i >= optimised:
            targets.append(_baseline_init(model, requests, i, hook_name) + (targets[i % optimised] - inits[i % optimised]))
            continue
        tgt = list(requests.target_ids[i])
        rows = [list(ids) + tgt[:-1] for ids in requests.prompt_ids[i]] + [list(requests.kl_ids[i])]
        lookups = list(requests.lookup[i]) + [requests.kl_lookup[i]]
        batch = pad(model, rows)
        idx = torch.arange(len(rows))
        look = torch.tensor(lookups)
        delta = torch.zeros(model.cfg.d_model, requires_grad=True)
        init: dict[str, torch.Tensor] = {}

        def add(act, hook):
            if "v" not in init:
                init["v"] = act[0, lookups[0]].detach().clone()
            act = act.clone()
            act[idx, look] = act[idx, look] + delta.to(act.dtype)
            return act

        opt = torch.optim.Adam([delta], lr=0.5)
        kl_init = None
        for _ in range(steps):
            opt.zero_grad()
            with model.hooks(fwd_hooks=[(hook_name, add)]):
                logits = model(batch.tokens)  # [rows, pos, vocab]: every position, every row
            log_probs = torch.log_softmax(logits.float(), dim=2)
            kl_lp = log_probs[-1, lookups[-1]]
            if kl_init is None:
                kl_init = kl_lp.detach().clone()
            nll = 0.0
            for r in range(len(rows) - 1):
                start = len(requests.prompt_ids[i][r]) - 1
                pos = torch.arange(start, start + len(tgt))
                nll = nll - log_probs[r, pos, torch.tensor(tgt)].mean()
            loss = nll / (len(rows) - 1) + 0.0625 * torch.nn.functional.kl_div(
                kl_init, kl_lp, log_target=True, reduction="batchmean") + 0.5 * delta.norm() / init["v"].float().norm() ** 2
            loss.backward()
            opt.step()
        targets.append((init["v"].float() + delta.detach()).clone())
        inits.append(init["v"].float())
    return torch.stack(targets)


def _baseline_init(model, requests, i: int, hook_name: str):
    """The output at ``hook_name`` at fact ``i``'s lookup position of its bare prompt (no δ)."""
    import torch

    got = {}

    def grab(act, hook):
        got["v"] = act[0, requests.lookup[i][0]].detach().float().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(hook_name, grab)]):
        model(torch.tensor([list(requests.prompt_ids[i][0])]), stop_at_layer=int(hook_name.split(".")[1]) + 1)
    return got["v"]


def _baseline_keys(model, requests, layer: int):
    """``compute_ks``: every fact x template in one forward, the key at each row's lookup position,
    averaged as the official code (bare prompt and the prefixed group)."""
    import torch

    from pmet_lens.core.arch import architecture
    from pmet_lens.editing.keys import prefix_mean

    arch = architecture(model)
    rows = requests.rows(model)
    got = {}

    def grab(act, hook):
        got["k"] = act[torch.arange(act.shape[0]), rows.lookup].detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(arch.mlp_key_hook(layer), grab)]):
        model(rows.tokens, stop_at_layer=layer + 1)
    return prefix_mean(got["k"], requests)


def _baseline_outputs(model, requests, layer: int):
    import torch

    from pmet_lens.core.arch import architecture

    arch = architecture(model)
    rows = requests.rows(model)
    got = {}

    def grab(act, hook):
        got["o"] = act[torch.arange(act.shape[0]), rows.lookup].detach().clone()

    with torch.no_grad(), model.hooks(fwd_hooks=[(arch.mlp_out_hook(layer), grab)]):
        model(rows.tokens, stop_at_layer=layer + 1)
    return got["o"][rows.bare]


def _baseline_edit(model, facts, args: argparse.Namespace, work: Path, *, alphaedit: bool, state=None):
    """MEMIT / PMET (``alphaedit=False``) or AlphaEdit as the official code runs them (module docstring)."""
    import torch

    from pmet_lens.core.arch import architecture
    from pmet_lens.editing.prepared import prepare_requests

    arch = architecture(model)
    if not alphaedit:
        model = copy.deepcopy(model)  # the edited copy; the original stays (whole-model copy)
    covs = _baseline_covs(model, work, args)
    requests = prepare_requests(model, facts, PREFIXES)
    L = max(LAYERS)
    site = "resid_post" if alphaedit else "mlp_out"
    z = _baseline_targets(model, requests, args.steps_opt, site, L, args.baseline_facts)
    if alphaedit and state is not None and "P" not in state:
        d = model.cfg.d_mlp
        saved = work / "baseline_P.pt"
        if saved.is_file():  # the official code loads P once computed (session3 reads alphaedit's)
            P = torch.load(saved)
        else:
            P = torch.zeros(len(LAYERS), d, d)
            for i, l in enumerate(LAYERS):
                U, S, _ = torch.linalg.svd(covs[arch.mlp_key_hook(l)], full_matrices=False)
                small = S < 2e-2
                P[i] = U[:, small] @ U[:, small].T
            torch.save(P, saved)
        state["P"], state["cache_c"] = P, torch.zeros(len(LAYERS), d, d)
    for i, l in enumerate(LAYERS):
        K = _baseline_keys(model, requests, l)  # [n, d_mlp]
        cur = _baseline_outputs(model, requests, L)
        spread = 1.0 / (L - l + 1)
        with torch.no_grad():
            W = arch.w_out(model, l)
            if alphaedit:
                P, cache_c = state["P"][i], state["cache_c"][i]
                Kc, R = K.float().T, ((z - cur.float()) * spread).T  # official: keys as columns
                upd = torch.linalg.solve(P @ (Kc @ Kc.T + cache_c) + 10.0 * torch.eye(Kc.shape[0]), P @ Kc @ R.T)
                W.add_(upd.to(W.dtype))
            else:
                K64, R64 = K.double(), ((z - cur.float()) / math.sqrt(L - l + 1)).double()
                C = covs[arch.mlp_key_hook(l)]
                delta = torch.linalg.solve(600.0 * C.double() + K64.T @ K64, K64.T @ R64)
                W.add_(delta.to(W.dtype))
    if alphaedit and state is not None:
        for i, l in enumerate(LAYERS):
            K = _baseline_keys(model, requests, l).float()
            state["cache_c"][i] += K.T @ K
    return model


def _baseline_eval(model, records, args: argparse.Namespace) -> None:
    """ROME's ``compute_rewrite_quality_counterfact``: per record, one forward of all its (prompt,
    object) rows with full logits; generation with full logits at the prompt's forward."""
    import torch

    from pmet_lens.core.generation import top_k_sample
    from pmet_lens.core.tokens import encode, pad, target_ids

    with torch.no_grad():
        for f in records:
            prompts = [f.text, *f.paraphrase_prompts, *f.neighborhood_prompts]
            rows, spans = [], []
            for p in prompts:
                ids = encode(model, p)
                for t in (f.target_new, f.target_true):
                    tgt = target_ids(model, t)
                    spans.append((len(rows), len(ids) - 1, tgt))
                    rows.append(ids + tgt[:-1])
            logits = model(pad(model, rows).tokens)  # [rows, pos, vocab]
            for r, start, tgt in spans:
                lp = torch.log_softmax(logits[r].float(), dim=-1)
                float(lp[torch.arange(start, start + len(tgt)), torch.tensor(tgt)].mean())
        gen = [p for i, f in enumerate(records) if i % 4 == 0 for p in f.generation_prompts]
        for s in range(0, len(gen), 64):
            seqs = [encode(model, p) for p in gen[s:s + 64]]
            width = max(map(len, seqs))
            from transformer_lens.cache.key_value_cache import TransformerLensKeyValueCache

            from pmet_lens.core.tokens import pad_id

            toks = torch.full((len(seqs), width), pad_id(model), dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for r, q in enumerate(seqs):
                toks[r, width - len(q):] = torch.tensor(q)
                mask[r, width - len(q):] = 1
            cache = TransformerLensKeyValueCache.init_cache(model.cfg, model.cfg.device, len(seqs))
            gens = [torch.Generator().manual_seed(s + r) for r in range(len(seqs))]
            logits = model(toks, attention_mask=mask, past_kv_cache=cache)[:, -1]  # full logits first
            for _ in range(max(0, args.gen_length - width)):
                nxt = top_k_sample(logits, 5, gens)
                logits = model(nxt[:, None], attention_mask=torch.ones((len(seqs), 1), dtype=torch.long),
                               past_kv_cache=cache)[:, -1]


def _baseline_export(model, work: Path) -> None:
    """The TransformerLens weights as a full transformers state dict (Llama layout), loaded into a second
    transformers model, saved: whole-model copies."""
    import einops
    import torch
    from transformers import LlamaForCausalLM

    from pmet_lens.core.hf import hf_config_of

    config = hf_config_of(model)
    sd = {"model.embed_tokens.weight": model.W_E.detach().clone(), "model.norm.weight": model.ln_final.w.detach().clone(),
          "lm_head.weight": model.W_U.detach().T.contiguous()}
    for l, block in enumerate(model.blocks):
        p = f"model.layers.{l}."
        sd[p + "self_attn.q_proj.weight"] = einops.rearrange(block.attn.W_Q.detach(), "n m h -> (n h) m").contiguous()
        sd[p + "self_attn.k_proj.weight"] = einops.rearrange(block.attn._W_K.detach(), "n m h -> (n h) m").contiguous()
        sd[p + "self_attn.v_proj.weight"] = einops.rearrange(block.attn._W_V.detach(), "n m h -> (n h) m").contiguous()
        sd[p + "self_attn.o_proj.weight"] = einops.rearrange(block.attn.W_O.detach(), "n h m -> m (n h)").contiguous()
        sd[p + "mlp.gate_proj.weight"] = block.mlp.W_gate.detach().T.contiguous()
        sd[p + "mlp.up_proj.weight"] = block.mlp.W_in.detach().T.contiguous()
        sd[p + "mlp.down_proj.weight"] = block.mlp.W_out.detach().T.contiguous()
        sd[p + "input_layernorm.weight"] = block.ln1.w.detach().clone()
        sd[p + "post_attention_layernorm.weight"] = block.ln2.w.detach().clone()
    hf = LlamaForCausalLM(config).to(model.cfg.dtype)
    hf.load_state_dict(sd, strict=False)
    hf.save_pretrained(work / "export_baseline")
    del hf, sd
    torch.cuda.empty_cache() if torch.cuda.is_available() else None


def baseline_step(step: str, model, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    info: dict[str, Any] = {}
    if step == "cov":
        _baseline_cov_build(model, args)
    elif step in ("edit16", "edit64"):
        facts = _facts(int(step[4:]))
        info["fact_tokens"] = _fact_tokens(model, facts)
        _baseline_edit(model, facts, args, work, alphaedit=False)
    elif step == "alphaedit":
        facts = _facts(32)
        info["fact_tokens"] = _fact_tokens(model, facts)
        _baseline_edit(model, facts, args, work, alphaedit=True, state={})
    elif step == "session3":
        state: dict[str, Any] = {}
        for b in range(3):
            _baseline_edit(model, _facts(16, offset=100 + 16 * b), args, work, alphaedit=True, state=state)
    elif step == "eval32":
        _baseline_eval(model, _facts(32), args)
    elif step == "export":
        _baseline_export(model, work)
    else:
        raise ValueError(step)
    return info


def _touch(model) -> None:
    """Read one value per memory page of every parameter: weights that a loader left mapped from the
    checkpoint file count in the resident set only once touched, as any use of the model touches them."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            float(flat[:: max(1, 4096 // flat.element_size())].float().sum())


def worker(args: argparse.Namespace) -> None:
    """Run one step in this (fresh) process and print one JSON line."""
    import torch

    dtype = getattr(torch, args.dtype)
    work = Path(args.work)
    start = time.perf_counter()
    if args.step == "load":
        if args.impl == "lean":
            from pmet_lens import load_model

            loaded: Any = load_model(args.ckpt, dtype=dtype, device="cpu")
        else:
            from transformers import AutoModelForCausalLM

            loaded = AutoModelForCausalLM.from_pretrained(args.ckpt, dtype=dtype)
        _touch(loaded)
        out = {"peak": _status("VmHWM"), "rss_before": 0, "seconds": time.perf_counter() - start}
    else:
        import gc

        from pmet_lens import load_model

        model = load_model(args.ckpt, dtype=dtype, device="cpu")
        gc.collect()
        _reset_peak()
        before = _status("VmRSS")
        start = time.perf_counter()
        info = (lean_step if args.impl == "lean" else baseline_step)(args.step, model, work, args)
        out = {"peak": _status("VmHWM"), "rss_before": before, "seconds": time.perf_counter() - start, **info}
    print("RESULT " + json.dumps(out), flush=True)


# -------------------------------------------------------------------------------- orchestrator
def features(shape, dtype: str, step: str, fact_tokens: float = 0.0) -> dict[str, float]:
    """The fit's features of a point: W, S, F in bytes (module docstring)."""
    return {"W": shape.params * DTYPE_BYTES[dtype], "S": len(LAYERS) * shape.d_mlp ** 2 * 4,
            "F": fact_tokens * shape.d_model * 4 if step.startswith(("edit", "alphaedit")) else 0.0}


def fit(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Non-negative least squares of ``peak = a·W + b·S + c·F + d`` over measured rows (features with no
    spread among the rows are dropped; a negative coefficient is removed and the rest refitted)."""
    import numpy as np

    names = ["W", "S", "F", "1"]
    X = np.array([[r["W"], r["S"], r["F"], 1.0] for r in rows], dtype=float)
    y = np.array([r["peak"] for r in rows], dtype=float)
    active = [j for j in range(4) if j == 3 or np.ptp(X[:, j]) > 0]
    while True:
        coef, *_ = np.linalg.lstsq(X[:, active] / X[:, active].max(0), y, rcond=None)
        coef = coef / X[:, active].max(0)
        negative = [active[k] for k, c in enumerate(coef) if c < 0 and active[k] != 3]
        if not negative or len(active) == 1:
            break
        active.remove(negative[0])
    full = dict.fromkeys(names, 0.0)
    for k, j in enumerate(active):
        full[names[j]] = float(coef[k])
    pred = X @ np.array([full[n] for n in names])
    return {"coef": full, "points": len(rows),
            "rel_error": [float((p - t) / t) for p, t in zip(pred, y)],
            "max_abs_rel_error": float(np.max(np.abs((pred - y) / y))) if len(y) else float("nan")}


def predict(coef: dict[str, float], feats: dict[str, float]) -> float:
    return coef["W"] * feats["W"] + coef["S"] * feats["S"] + coef["F"] * feats["F"] + coef["1"]


def _prior(step: str, feats: dict[str, float], params: int) -> float:
    """A generous a-priori peak of a step not measured yet on any point: 4 copies of the weights and 3 of
    C of R's layers plus 1 GB; for ``export`` also 24 bytes per parameter (float64 probes and int64 index
    maps of the whole model, as an export that does not stream builds)."""
    if step == "load":
        return 4 * feats["W"] + 1 * GB
    guess = 2 * feats["W"] + 3 * feats["S"] + 1 * GB
    return guess + 24 * params if step == "export" else guess


def _guard(measured: list[dict[str, Any]], impl: str, step: str, feats: dict[str, float], params: int) -> float:
    """A conservative prediction of a point's peak before running it: the largest ratio peak / (W + S) of
    the points already measured for this implementation and step, times this point's W + S (W alone for
    ``load``), and at least the ``load`` step's prediction, whose transient every worker pays;
    :func:`_prior` for a step not measured yet."""
    size = {s: feats["W"] if s == "load" else feats["W"] + feats["S"] for s in (step, "load")}
    guesses = []
    for s in dict.fromkeys(("load", step)):
        mine = [r for r in measured if r["impl"] == impl and r["step"] == s and r["status"] == "measured"]
        if mine:
            guesses.append(max(r["peak"] / (r["W"] if s == "load" else r["W"] + r["S"]) for r in mine) * size[s])
        else:
            guesses.append(_prior(s, feats, params))
    return max(guesses)


def orchestrate(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    from llama_shapes import SHAPES, build_checkpoint

    from machine import machine_line

    print(machine_line(), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    shapes = [SHAPES[s] for s in args.shapes]
    csv_path = out / "memory_points.csv"
    rows: list[dict[str, Any]] = [] if args.fresh or not csv_path.is_file() else _read_csv(csv_path)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0",
           "PYTHONPATH": os.pathsep.join([str(HERE.parent), os.environ.get("PYTHONPATH", "")])}
    for shape in sorted(shapes, key=lambda s: s.params):
        ckpt = build_checkpoint(shape)
        for dtype in args.dtypes:
            work = Path(args.work) / f"{shape.name}-{dtype}"
            work.mkdir(parents=True, exist_ok=True)
            for impl in args.impl:
                for step in args.steps:
                    feats = features(shape, dtype, step)
                    rows = [r for r in rows if (r["shape"], r["dtype"], r["impl"], r["step"]) != (shape.name, dtype, impl, step)]
                    if impl == "lean" and step == "cov":  # C is built in the step, not read from an earlier run's cache
                        shutil.rmtree(work / "cov", ignore_errors=True)
                    if step == "alphaedit":  # so is P (session3 reads it from this step's cache)
                        shutil.rmtree(work / "ns", ignore_errors=True)
                        (work / "baseline_P.pt").unlink(missing_ok=True)
                    row: dict[str, Any] = {"shape": shape.name, "params": shape.params, "d_model": shape.d_model,
                                           "d_mlp": shape.d_mlp, "n_layers": shape.n_layers, "dtype": dtype,
                                           "impl": impl, "step": step, **feats}
                    guess = _guard(rows, impl, step, feats, shape.params)
                    row["predicted"] = guess
                    if guess > args.limit_gb * GB:
                        row.update(status="skipped", peak=float("nan"), note=f"predicted {guess / GB:.1f} GB > "
                                   f"limit {args.limit_gb:.0f} GB")
                        print(f"{shape.name} {dtype} {impl} {step}: {row['note']}", flush=True)
                        rows.append(row)
                        continue
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--step", step, "--impl", impl,
                           "--ckpt", str(ckpt), "--dtype", dtype, "--work", str(work), "--opt-steps", str(args.steps_opt),
                           "--cov-tokens", str(args.cov_tokens), "--gen-length", str(args.gen_length),
                           "--baseline-facts", str(args.baseline_facts)]
                    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
                    found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
                    if proc.returncode != 0 or not found:
                        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
                        why = "killed (SIGKILL: out of memory?)" if proc.returncode == -9 else tail[0][:200]
                        row.update(status="failed", peak=float("nan"), note=f"exit {proc.returncode}: {why}")
                    else:
                        res = json.loads(found[-1][len("RESULT "):])
                        if "fact_tokens" in res:
                            row.update(features(shape, dtype, step, res["fact_tokens"]))
                        row.update(status="measured", peak=float(res["peak"]), rss_before=float(res["rss_before"]),
                                   seconds=round(float(res["seconds"]), 1), note="")
                    rows.append(row)
                    print(f"{shape.name} {dtype} {impl} {step}: {row['status']} peak "
                          f"{row['peak'] / GB:.2f} GB (before {row.get('rss_before', 0) / GB:.2f} GB, "
                          f"{row.get('seconds', 0)} s) {row['note']}", flush=True)
                    _write_csv(csv_path, rows)
    _write_csv(csv_path, rows)
    fits = {}
    for impl in ("lean", "baseline"):
        for kind, steps in [(s, (s,)) for s in STEPS] + [("edit", ("edit16", "edit64"))]:
            mine = [r for r in rows if r["impl"] == impl and r["step"] in steps and r["status"] == "measured"]
            if mine:
                fits[f"{impl}/{kind}"] = fit(mine)
    meta = {"machine": machine_line(), "layers": list(LAYERS), "steps": args.steps_opt, "cov_tokens": args.cov_tokens,
            "gen_length": args.gen_length, "limit_gb": args.limit_gb, "measure": "peak RSS (VmHWM after "
            "/proc/self/clear_refs) of a fresh subprocess per step", "fits": fits}
    (out / "memory_fit.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(f"wrote {csv_path} and {out / 'memory_fit.json'}")
    for key, f in fits.items():
        print(f"fit {key}: " + ", ".join(f"{k}={v:.4g}" for k, v in f["coef"].items())
              + f"; {f['points']} points, max |rel error| {f['max_abs_rel_error']:.1%}")


def _read_csv(path: Path) -> list[dict[str, Any]]:
    """The rows of an earlier run (numbers as floats), kept unless this run measures them again."""
    rows = []
    with path.open() as fh:
        for r in csv.DictReader(fh):
            for k in ("params", "d_model", "d_mlp", "n_layers"):
                r[k] = int(r[k])
            for k in ("peak", "rss_before", "seconds", "W", "S", "F", "predicted"):
                r[k] = float(r[k]) if r.get(k) not in (None, "", "None") else float("nan")
            rows.append(r)
    return rows


def _write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    cols = ["shape", "params", "d_model", "d_mlp", "n_layers", "dtype", "impl", "step", "status", "peak", "rss_before",
            "seconds", "W", "S", "F", "predicted", "note"]
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the 0.5B point in bfloat16, 1 step, 2048 C tokens")
    parser.add_argument("--shapes", nargs="+", default=None, help="names in llama_shapes.SHAPES (default all)")
    parser.add_argument("--dtypes", nargs="+", default=None, choices=sorted(DTYPE_BYTES))
    parser.add_argument("--impl", nargs="+", default=["lean", "baseline"], choices=["lean", "baseline"])
    parser.add_argument("--steps", nargs="+", default=list(STEPS), choices=list(STEPS), help="which steps")
    parser.add_argument("--opt-steps", dest="steps_opt", type=int, default=None, help="target optimisation steps")
    parser.add_argument("--cov-tokens", type=int, default=None)
    parser.add_argument("--gen-length", type=int, default=None, help="generated sequence length in eval32")
    parser.add_argument("--baseline-facts", type=int, default=4,
                        help="facts whose targets the baseline optimises one by one (the rest reuse their δ)")
    parser.add_argument("--limit-gb", type=float, default=20.0, help="skip points predicted above this")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per step")
    parser.add_argument("--fresh", action="store_true", help="start a new points file (default: replace only the "
                        "points this run measures)")
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument("--work", default=None, help="scratch directory (default: under the checkpoints' cache)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--step", help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", help=argparse.SUPPRESS)
    parser.add_argument("--dtype", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.impl = args.impl[0] if isinstance(args.impl, list) else args.impl
        worker(args)
        return
    quick = args.quick
    args.shapes = args.shapes or (["llama-0.5b"] if quick else ["llama-0.5b", "llama-1.2b", "llama-2.5b"])
    args.dtypes = args.dtypes or (["bfloat16"] if quick else ["float32", "bfloat16"])
    args.steps_opt = args.steps_opt or (1 if quick else 2)
    args.cov_tokens = args.cov_tokens or (2048 if quick else 8192)
    args.gen_length = args.gen_length or (40 if quick else 100)
    if args.work is None:
        sys.path.insert(0, str(HERE))
        from llama_shapes import checkpoint_root

        args.work = str(checkpoint_root() / "work")
    orchestrate(args)


if __name__ == "__main__":
    main()
