"""The worker side of a :class:`~pmet_lens.parallel.Workers` pool: a Ray actor holding one model.

:class:`ModelWorker` is a plain class; the pool makes it a Ray actor (``ray.remote``), so this
module imports Ray only inside the methods that run on a worker. The model is built from a
:class:`ModelSpec` (config, tokenizer, padding side, memory layout) and its weights, both fetched from
Ray's object store through the :class:`ModelHandle` every call carries; the worker fetches only the
tensors whose object differs from the one it holds, so after the first call it receives just the
parameters the driver changed. A shard that changes the worker's own weights (an edit it applies and
restores) leaves those parameters marked, and they are fetched again before the next call, so the
worker's weights are always the driver's.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

__all__ = ["ModelHandle", "ModelSpec", "ModelWorker", "build_model", "tensor_stamp"]


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs besides the weights to build the driver's model.

    Attributes:
        cfg: the driver model's ``HookedTransformerConfig`` (the device is set per worker).
        tokenizer: its tokenizer (``None`` for a model without one).
        padding_side: the tokenizer's padding side on the driver ("left" or "right").
        fast: whether :func:`pmet_lens.core.fastpath.install_fast_linear` was in effect.
        names: the state-dict entries sent, in order.
    """

    cfg: Any
    tokenizer: Any
    padding_side: Literal["left", "right"]
    fast: bool
    names: tuple[str, ...]


@dataclass(frozen=True)
class ModelHandle:
    """A model version on the object store: ``spec`` is a reference to a :class:`ModelSpec`, ``table`` a
    reference to ``{state-dict name: reference to that tensor's current value}``; ``key`` names the
    driver model and ``version`` counts its synced states."""

    key: str
    version: int
    spec: Any
    table: Any


def tensor_stamp(t: torch.Tensor) -> tuple:
    """What tells that a tensor changed in place or was replaced: its storage address, its version
    counter (bumped by every in-place operation on it), shape, dtype and device."""
    return (t.data_ptr(), t._version, tuple(t.shape), str(t.dtype), str(t.device))


def build_model(spec: ModelSpec, device: str) -> Any:
    """An empty (uninitialised) copy of the driver's model on ``device``, ready for its weights."""
    from transformer_lens import HookedTransformer

    from pmet_lens.core.fastpath import install_fast_linear

    cfg = copy.deepcopy(spec.cfg)
    cfg.device = device
    cfg.n_devices = 1
    cfg.init_weights = False  # every tensor is overwritten by the driver's values
    model = HookedTransformer(cfg, tokenizer=spec.tokenizer, move_to_device=True, default_padding_side=spec.padding_side)
    model.eval()
    if spec.fast:
        install_fast_linear(model)
    missing = sorted(set(spec.names) - set(model.state_dict(keep_vars=True)))
    if missing:
        raise RuntimeError(f"the worker's model has no entries {missing[:5]}... of the driver's state dict")
    return model


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside it (dicts, lists, tuples, dataclasses) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return type(value)((k, _to_cpu(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_to_cpu(v) for v in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: _to_cpu(getattr(value, f.name)) for f in dataclasses.fields(value) if f.init}
        return dataclasses.replace(value, **changes)
    return value


class ModelWorker:
    """One worker of a pool: holds a model, brings it to the handle's version and runs shards on it.

    Args:
        threads: torch intra-op threads (the worker's CPU share).
        device: where the model lives ("cpu", or "cuda" for a worker with a GPU).
    """

    def __init__(self, threads: int, device: str) -> None:
        torch.set_num_threads(int(threads))
        self.device = device
        self.model: Any = None
        self.key: str | None = None
        self.version = -1
        self.refs: dict[str, str] = {}     # name -> hex id of the object its current value came from
        self.table: dict[str, Any] = {}    # name -> object reference of the current version
        self.stamps: dict[str, tuple] = {}
        self.dirty: set[str] = set()

    def ready(self) -> int:
        """The worker's process id (answers once the actor runs)."""
        return os.getpid()

    def _sync(self, handle: ModelHandle) -> float:
        import ray

        start = time.perf_counter()
        if self.model is None or self.key != handle.key:
            self.model = build_model(ray.get(handle.spec), self.device)
            self.key, self.version, self.refs, self.table = handle.key, -1, {}, {}
        if self.version != handle.version:
            self.table = ray.get(handle.table)
        state = self.model.state_dict(keep_vars=True)
        need = [n for n, ref in self.table.items() if self.refs.get(n) != ref.hex() or n in self.dirty]
        if need:
            values = ray.get([self.table[n] for n in need])
            with torch.no_grad():
                for name, value in zip(need, values):
                    state[name].copy_(value)
                    self.refs[name] = self.table[name].hex()
        self.version = handle.version
        self.dirty.clear()
        self.stamps = {n: tensor_stamp(t) for n, t in state.items()}
        return time.perf_counter() - start

    def run(self, handle: ModelHandle, fn: Callable[..., Any], common: dict[str, Any], args: tuple) -> tuple[Any, dict]:
        """``fn(model, *args, **common)`` on the model at the handle's version; returns the value (its
        tensors on the CPU) and timings."""
        sync_s = self._sync(handle)
        start = time.perf_counter()
        try:
            value = fn(self.model, *args, **common)
        finally:
            state = self.model.state_dict(keep_vars=True)
            self.dirty = {n for n, t in state.items() if n in self.refs and tensor_stamp(t) != self.stamps.get(n)}
        run_s = time.perf_counter() - start
        if self.device != "cpu":
            value = _to_cpu(value)
        return value, {"pid": os.getpid(), "sync_s": sync_s, "run_s": run_s}
