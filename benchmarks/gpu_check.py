"""The GPU check of issue 34: every stage on ``cuda`` in bfloat16 and float32, and with the blocks split
over two GPUs where there are two, with each stage's time and ``torch.cuda.max_memory_allocated``.

Stages, on the embedded default model (no network): PMET Fig. 2 on ``--fig2`` prompts (both
variants), one PMET edit of ``--edit`` CounterFact facts (then restored: checked bit for bit), a
3-batch AlphaEdit session of ``--batch`` facts per batch (then undone: checked bit for bit) and an
evaluation of ``--records`` CounterFact records (probability metrics) with the edit applied. The
covariances are built once per dtype in a scratch cache (their time is reported as its own stage).

    python benchmarks/gpu_check.py                      # on cuda: bf16 and fp32, n_devices=2 if 2 GPUs (< 5 min on one H100)
    python benchmarks/gpu_check.py --device cpu --quick # the same path on a CPU, small sizes (a smoke test)

Writes a JSON (``--out``, default ``benchmarks/results/gpu_check.json``) and prints a table. Exits with
status 2 and a message when ``--device cuda`` is asked for and there is no CUDA device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

from machine import machine_line  # benchmarks/machine.py (the script's folder is on sys.path)

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


class Stages:
    """Runs named stages, recording seconds and the device allocator's peak of each."""

    def __init__(self, device: str, dtype: str, n_devices: int) -> None:
        self.device, self.dtype, self.n_devices = device, dtype, n_devices
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        cuda = self.device.startswith("cuda")
        if cuda:
            torch.cuda.synchronize()
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
        start = time.perf_counter()
        info = fn()
        if cuda:
            torch.cuda.synchronize()
        row = {"dtype": self.dtype, "n_devices": self.n_devices, "stage": name,
               "seconds": round(time.perf_counter() - start, 3), **info}
        if cuda:
            row["max_memory_allocated_bytes"] = {f"cuda:{i}": torch.cuda.max_memory_allocated(i)
                                                 for i in range(torch.cuda.device_count())}
        self.rows.append(row)
        peak = ", ".join(f"{d} {b / 2**20:.0f} MiB" for d, b in row.get("max_memory_allocated_bytes", {}).items())
        print(f"{self.dtype:>5} n_devices={self.n_devices} {name:<22} {row['seconds']:8.2f} s  {peak}  "
              f"{ {k: v for k, v in info.items() if not isinstance(v, (list, dict))} }", flush=True)
        return info


def check_dtype(model, dtype: torch.dtype) -> None:
    bad = [n for n, p in model.named_parameters() if p.dtype != dtype]
    if bad:
        raise SystemExit(f"parameters not in {dtype}: {bad[:3]}")


def run_config(args, dtype_name: str, n_devices: int, cache: Path) -> list[dict[str, Any]]:
    from pmet_lens import load_model
    from pmet_lens.analysis.similarity import similarity_scores
    from pmet_lens.core.devices import split_blocks
    from pmet_lens.data import load_known_facts
    from pmet_lens.data.splits import split_facts
    from pmet_lens.editing import CovarianceStore, edit, engine, preset
    from pmet_lens.editing.nullspace import NullspaceStore
    from pmet_lens.editing.session import EditSession
    from pmet_lens.evaluation import evaluate_counterfact

    dtype = DTYPES[dtype_name]
    stages = Stages(args.device, dtype_name, n_devices)
    model = load_model(device=args.device, dtype=dtype)
    if n_devices > 1:
        split_blocks(model, n_devices)
    check_dtype(model, dtype)
    devices = sorted({str(p.device) for p in model.parameters()})
    name = str(model.cfg.model_name)
    hp_pmet = preset(name, "pmet")
    hp_alpha = preset(name, "alphaedit")
    if args.quick:
        hp_pmet = hp_pmet.with_(cov_tokens=2048, steps=min(hp_pmet.steps, 3))
        hp_alpha = hp_alpha.with_(cov_tokens=2048, steps=min(hp_alpha.steps, 3))
    store = CovarianceStore(cache / f"cov-{dtype_name}-{n_devices}", progress=False)
    facts = split_facts("report", limit=args.edit + 3 * args.batch)
    edit_facts, session_facts = facts[:args.edit], facts[args.edit:]
    prompts = [f.prompt for f in load_known_facts(limit=args.fig2)]

    def fig2() -> dict[str, Any]:
        scores = similarity_scores(model, prompts, k=50, variant="both", batch_size=64, progress=False)
        return {"prompts": len(prompts), "mean_cosine_ffn_paper": float(scores["paper"].cosine[..., 1].mean())}

    def covariances() -> dict[str, Any]:
        engine.covariances(model, hp_pmet, store)
        engine.covariances(model, hp_alpha, store)
        return {"cov_tokens": hp_pmet.cov_tokens}

    state: dict[str, Any] = {}

    def pmet_edit() -> dict[str, Any]:
        before = snapshot(model)
        result = edit(model, edit_facts, hparams=hp_pmet, cov_store=store, progress=False)
        state.update(before=before, result=result)
        steps = result.stats.get("steps", [])
        return {"facts": len(edit_facts), "mean_steps": sum(steps) / max(1, len(steps)),
                "delta_dtypes": sorted({str(d.dtype) for d in result.deltas.values()}),
                "edited_devices": sorted({str(result.site(n).param(model).device) for n in result.deltas})}

    def evaluation() -> dict[str, Any]:
        records = split_facts("report", limit=args.records)  # the edited facts come first
        _, summary = evaluate_counterfact(model, records, generation=False, batch_size=64, progress=False)
        return {k: round(float(summary[k]), 4) for k in ("efficacy", "paraphrase", "neighborhood", "score", "n_records")}

    def restore() -> dict[str, Any]:
        state["result"].restore()
        return {"restore_bit_exact": same(state["before"], snapshot(model))}

    def session() -> dict[str, Any]:
        before = snapshot(model)
        s = EditSession(model, hparams=hp_alpha, cov_store=store, nullspace_store=NullspaceStore(False), progress=False)
        after = []
        for b in range(3):
            s.edit(session_facts[b * args.batch:(b + 1) * args.batch])
            after.append(snapshot(model))
        s.undo()
        undo_one = same(after[1], snapshot(model))
        s.undo(to=0)
        return {"batches": 3, "facts_per_batch": args.batch, "undo_bit_exact": undo_one and same(before, snapshot(model))}

    stages.run("fig2", fig2)
    stages.run("covariances", covariances)
    stages.run("pmet_edit", pmet_edit)
    stages.run("evaluation_edited", evaluation)
    stages.run("restore", restore)
    stages.run("alphaedit_session", session)
    for row in stages.rows:
        row["devices"] = devices
    state.clear()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return stages.rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="small sizes (for a smoke test on a CPU)")
    parser.add_argument("--dtypes", default="bf16,fp32", help="comma-separated: bf16, fp32")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "gpu_check.json")
    parser.add_argument("--fig2", type=int, default=None, help="Fig. 2 prompts (default 200; --quick 4)")
    parser.add_argument("--edit", type=int, default=None, help="facts in the PMET edit (default 16; --quick 1)")
    parser.add_argument("--batch", type=int, default=None, help="facts per session batch (default 4; --quick 1)")
    parser.add_argument("--records", type=int, default=None, help="evaluated records (default 32; --quick 2)")
    args = parser.parse_args()
    small = {"fig2": 4, "edit": 1, "batch": 1, "records": 2}
    full = {"fig2": 200, "edit": 16, "batch": 4, "records": 32}
    for key in small:
        if getattr(args, key) is None:
            setattr(args, key, (small if args.quick else full)[key])
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device is available (torch.cuda.is_available() is False); run it on a machine "
              "with a GPU, or smoke-test the path on a CPU with --device cpu --quick", file=sys.stderr)
        sys.exit(2)
    print(machine_line())
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if args.device.startswith("cuda") else []
    if gpus:
        print(f"GPUs: {gpus}")
    configs = [(d, 1) for d in args.dtypes.split(",")]
    if args.device.startswith("cuda") and torch.cuda.device_count() >= 2:
        configs += [(d, 2) for d in args.dtypes.split(",")]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="pmet_gpu_check_") as scratch:
        for dtype_name, n_devices in configs:
            rows += run_config(args, dtype_name, n_devices, Path(scratch))
    failed = [r for r in rows if r.get("restore_bit_exact") is False or r.get("undo_bit_exact") is False]
    report = {"machine": machine_line(), "gpus": gpus, "device": args.device, "quick": args.quick,
              "sizes": {k: getattr(args, k) for k in small}, "rows": rows, "ok": not failed}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    if failed:
        print(f"gpu_check: undo/restore not bit-exact in {[(r['dtype'], r['n_devices'], r['stage']) for r in failed]}",
              file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
