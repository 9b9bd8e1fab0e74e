"""Host round trips in the hot loops (issue 34): the weights' identity check and the target loop's
host synchronisations, each beside its baseline measured in the same run.

1. Identity check, per call, on a Llama-shaped random model built in process from a
   ``HookedTransformerConfig`` (default: d_model 2560, 24 layers, d_mlp 8192, 20 heads of 128 with 4
   key/value heads, vocabulary 128,256, gated SiLU, RMS norm, rotary: 2.54 B parameters) in bfloat16
   with the fast path (about 5.1 GB). Baseline: the single blake2b pass over every parameter's bytes
   that every ``edit()`` and session batch made before (:func:`~pmet_lens.editing.identity.legacy_weights_hash`,
   the same reads and hashing as the old ``weights_hashes``). After: ``weights_hash`` with its
   per-parameter cache: the first call, a call on the unchanged model (what ``edit()`` pays), and a
   call after 5 ``W_out`` were written (what a session batch pays).
2. Target loop, on the default model with PMET's preset and ``--facts`` TUNE facts: the operations
   that wait for the device (``.item()``, ``.tolist()``, ``.cpu()``, ``bool()`` of a tensor,
   ``nonzero``, boolean-mask indexing, ...) counted with a ``TorchFunctionMode`` per loop step. Baseline:
   the loop of commit ``--baseline`` (``git show`` of ``pmet_lens/editing/targets.py``, loaded as a
   module); after: the current loop reading the host at every step (the CPU default) and every 5
   steps (the accelerator default). The targets of the three are compared.
3. Scoring, the same count for ``score_token_ids`` before (baseline commit) and after, on token ids
   made beforehand (``encode`` keeps them on the host).

    python benchmarks/bench_host_round_trips.py                 # all three (about 5 min alone, < 8 GB)
    python benchmarks/bench_host_round_trips.py --skip-identity --facts 2 --steps 4   # a smoke test
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

from machine import machine_line, median_seconds  # benchmarks/machine.py (the script's folder is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
BASELINE = "fcd50161e39e232c6ef052ba5745cbf860bdf0ba"  # main before issue 34's changes to the identity and the target loop

_SYNC_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "__index__", "nonzero",
                 "equal", "unique", "masked_select", "allclose"}


class SyncCounter(TorchFunctionMode):
    """Counts the calls that make the host wait for the device's result (on a GPU, a synchronisation):
    reading values (``item``, ``tolist``, ``bool(t)``, ``int(t)``, ``equal``), copies to the host
    (``.cpu()``; on a CPU run ``.to("cpu")`` cannot be told from a move to the model's device and is
    not counted), data-dependent shapes (``nonzero``, ``unique``, boolean-mask indexing and
    assignment)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.by_name: dict[str, int] = {}

    def _hit(self, name: str) -> None:
        self.count += 1
        self.by_name[name] = self.by_name.get(name, 0) + 1

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", str(func))
        if name in _SYNC_METHODS:
            self._hit(name)
        elif name in ("__getitem__", "__setitem__", "index_put_", "index_put") and len(args) > 1:
            index = args[1] if isinstance(args[1], tuple) else (args[1],)
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in index):
                self._hit(f"{name}[bool mask]")
        return func(*args, **kwargs)


def llama_shaped(args) -> torch.nn.Module:
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from pmet_lens.core.fastpath import install_fast_linear

    cfg = HookedTransformerConfig(
        d_model=args.d_model, d_head=128, n_heads=args.d_model // 128, n_key_value_heads=4, d_mlp=args.d_mlp,
        n_layers=args.layers, n_ctx=2048, d_vocab=args.vocab, act_fn="silu", normalization_type="RMS",
        positional_embedding_type="rotary", rotary_dim=128, gated_mlp=True, final_rms=True, dtype=torch.bfloat16,
        device="cpu", init_weights=False)
    model = HookedTransformer(cfg, move_to_device=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype).mul_(0.02))  # no float32 temporary
    return install_fast_linear(model)


def bench_identity(args) -> None:
    from pmet_lens.editing.identity import identity_cache, legacy_weights_hash, weights_hash, weights_hashes

    start = time.perf_counter()
    model = llama_shaped(args)
    n = sum(p.numel() for p in model.parameters())
    print(f"\n1. identity check: Llama-shaped random model, d_model {args.d_model}, {args.layers} layers, d_mlp "
          f"{args.d_mlp}, {args.d_model // 128} heads x 128 (4 KV heads), vocabulary {args.vocab}: {n / 1e9:.2f} B "
          "parameters, bfloat16, "
          f"fast path; built in {time.perf_counter() - start:.0f} s")

    layers = list(range(4, 9)) if args.layers >= 9 else list(range(args.layers))  # the W_out a batch writes
    before = median_seconds(lambda: legacy_weights_hash(model), args.repeat)
    first = median_seconds(lambda: weights_hashes(model, layers), 1)
    warm = median_seconds(lambda: weights_hashes(model, layers), max(5, args.repeat))
    cache = identity_cache(model)

    def after_edit():
        with torch.no_grad():
            for l in layers:
                model.blocks[l].mlp.W_out.add_(1e-3)
        t = time.perf_counter()
        weights_hash(model)
        return time.perf_counter() - t

    rehashed = cache.rehashed
    edited = statistics.median([after_edit() for _ in range(args.repeat)])
    per_edit = (cache.rehashed - rehashed) / args.repeat
    print("identity per call                          | seconds")
    print(f"before: full pass over the weights (every edit() and session batch) | {before:.3f}")
    print(f"after, first call (cold cache)                                   | {first:.3f}")
    print(f"after, unchanged model (edit(), session start)                   | {warm:.4f}   ({before / warm:.0f}x faster)")
    print(f"after, {len(layers)} W_out written (a session batch; {per_edit:.0f} parameters re-read) | {edited:.3f}   "
          f"({before / edited:.0f}x faster)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GB")


def _baseline_module(rel: str, name: str):
    """The file ``rel`` at the baseline commit, imported as module ``name``."""
    text = subprocess.run(["git", "-C", str(ROOT), "show", f"{BASELINE}:{rel}"], check=True, capture_output=True,
                          text=True).stdout
    path = Path(tempfile.mkdtemp(prefix="pmet_baseline_")) / f"{name}.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def bench_target_loop(args) -> None:
    from pmet_lens import load_model
    from pmet_lens.data.splits import split_facts
    from pmet_lens.editing import preset
    from pmet_lens.editing.hparams import settings_for
    from pmet_lens.editing.prepared import prepare_requests
    from pmet_lens.editing.targets import _optimise_chunk

    old = _baseline_module("pmet_lens/editing/targets.py", "baseline_targets")
    model = load_model(device="cpu")
    hp = preset(str(model.cfg.model_name), "pmet").with_(context_prefixes=("The", "I think"), batch_size=args.facts)
    if args.steps is not None:
        hp = hp.with_(steps=args.steps)
    requests = prepare_requests(model, split_facts("tune", limit=args.facts), hp.context_prefixes)
    settings = settings_for(hp)
    print(f"\n2. target loop: default model, PMET preset ({hp.steps} steps at most), {args.facts} TUNE facts in one chunk")
    runs = {}
    for label, fn in (("before (baseline loop)", lambda: old._optimise_chunk(model, requests, hp, settings)),
                      ("after, host read every step (CPU default)", lambda: _optimise_chunk(model, requests, hp, settings,
                                                                                            check_every=1)),
                      ("after, host read every 5 steps (GPU default)", lambda: _optimise_chunk(
                          model, requests, hp, settings, check_every=5))):
        counter = SyncCounter()
        t = time.perf_counter()
        with counter:
            targets = fn()
        seconds = time.perf_counter() - t
        iterations = int(targets.steps.max())
        runs[label] = targets
        top = ", ".join(f"{k} {v}" for k, v in sorted(counter.by_name.items(), key=lambda kv: -kv[1])[:4])
        print(f"{label:<46} | {counter.count / iterations:5.1f} waits per step ({counter.count} in {iterations} steps; "
              f"{top}) | {seconds / iterations:.3f} s per step on this CPU")
    base = runs["before (baseline loop)"]
    for label, t in list(runs.items())[1:]:
        same_steps = torch.equal(t.steps, base.steps)
        diff = max(float((t.delta[s] - base.delta[s]).abs().max()) for s in t.delta)
        exact = all(torch.equal(t.delta[s], base.delta[s]) for s in t.delta)
        print(f"  {label}: steps equal to the baseline's: {same_steps}; δ bit-identical: {exact} (max |diff| {diff:.2e})")


def bench_scoring(args) -> None:
    from pmet_lens import load_model
    from pmet_lens.core.tokens import encode, target_ids
    from pmet_lens.data.splits import split_facts
    from pmet_lens.evaluation.scoring import score_token_ids

    old = _baseline_module("pmet_lens/evaluation/scoring.py", "baseline_scoring")
    model = load_model(device="cpu")
    facts = split_facts("tune", limit=args.records)
    prompts = [p for f in facts for p in [f.text] + list(f.paraphrase_prompts)]
    targets = [f.target_new for f in facts for _ in range(1 + len(f.paraphrase_prompts))]
    # token ids are made on the host (encode keeps them there), outside the count: the count is the scoring's
    prompt_ids = [encode(model, p) for p in prompts]
    target_token_ids = [target_ids(model, t) for t in targets]
    print(f"\n3. scoring: {len(prompts)} (prompt, target) pairs of {args.records} TUNE records, batches of 64")
    for label, fn in (("before", old.score_token_ids), ("after", score_token_ids)):
        counter = SyncCounter()
        with counter:
            fn(model, prompt_ids, target_token_ids)
        print(f"{label:<7} | {counter.count} waits ({', '.join(f'{k} {v}' for k, v in counter.by_name.items())})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--skip-identity", action="store_true")
    parser.add_argument("--d-model", type=int, default=2560)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--d-mlp", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--facts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=None, help="target steps (default the preset's; smoke tests)")
    parser.add_argument("--records", type=int, default=16)
    args = parser.parse_args()
    print(machine_line())
    print(f"baseline: commit {BASELINE[:8]}")
    if not args.skip_identity:
        bench_identity(args)
    bench_target_loop(args)
    bench_scoring(args)


if __name__ == "__main__":
    main()
