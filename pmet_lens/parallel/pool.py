"""A pool of Ray workers, each holding one copy of the driver's model (:class:`Workers`)."""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
import uuid
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Literal, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from pmet_lens.core.models import require_model
from pmet_lens.parallel.shards import ShardError
from pmet_lens.parallel.worker import ModelHandle, ModelSpec, ModelWorker, tensor_stamp

if TYPE_CHECKING:
    from pmet_lens.parallel.shards import ShardLog

logger = logging.getLogger(__name__)

__all__ = ["Workers", "weights_digest"]

_INSTALL_HINT = "pip install 'pmet-lens[ray]'"
_MISSING = object()


def weights_digest(model: Any) -> str:
    """sha1 of the model's state dict (names, shapes, dtypes and values, layout-independent): two
    models with equal digests compute the same."""
    require_model(model, "pmet_lens.parallel.weights_digest")
    h = hashlib.sha1()
    for name, t in model.state_dict().items():
        t = t.detach()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        if t.numel():
            h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def _worker_pid(model: Any) -> int:
    """The process id of the worker holding ``model`` (runs on a worker)."""
    return os.getpid()


def _check_no_hooks(model: Any, what: str) -> None:
    """A loaded model without hooks attached: workers get the weights, not hooks (refuse such a model)."""
    hooked = [name for name, hp in require_model(model, what).hook_dict.items()
              if len(getattr(hp, "_forward_hooks", {})) or len(getattr(hp, "_backward_hooks", {}))]
    if hooked:
        raise ValueError(f"the model has hooks attached ({hooked[:3]}...), e.g. an edit previewed with model.hooks(...): "
                         "workers receive the weights, not hooks. Write the edit into the weights "
                         "(EditResult.apply / edit(apply=True)) or run without workers")


def _by_value_if_local(fn: Callable[..., Any]) -> None:
    """Let Ray send ``fn`` by value when its module is not an installed one (a script's or a test's
    function, which the workers could not import by name)."""
    import ray

    name = getattr(fn, "__module__", None) or ""
    module = sys.modules.get(name)
    if module is None or name == "__main__" or name.split(".")[0] == "pmet_lens":
        return
    path = str(getattr(module, "__file__", "") or "")
    if path and "site-packages" not in path and "dist-packages" not in path:
        ray.cloudpickle.register_pickle_by_value(module)


@dataclass
class _ModelState:
    """The driver-side record of one model sent to the pool."""

    ref: Any                       # weakref to the driver's model
    key: str
    spec: Any                      # object reference of its ModelSpec
    stamps: dict[str, tuple] = field(default_factory=dict)
    table: dict[str, Any] = field(default_factory=dict)   # name -> object reference of the current value
    version: int = 0
    table_ref: Any = None


class Workers:
    """A pool of ``n`` Ray workers, each holding one copy of the model it is given.

    Joins the Ray cluster at ``address`` (or ``$RAY_ADDRESS``; a process already connected to Ray
    keeps its connection), else starts a local one with ``n x threads_per_worker`` CPUs, without the
    dashboard. Each worker is a Ray actor reserving ``threads_per_worker`` CPUs (and
    ``gpus_per_worker`` GPUs) and setting torch's thread count to that share. A model reaches the
    workers through Ray's object store (config, tokenizer and every weight put once, then only
    the tensors that changed), so an unsaved or edited model works and a cluster needs no shared
    disk. ``with Workers(2) as pool:`` closes the pool (and a Ray it started) on leaving the block.

    Changes are detected per tensor by its storage and version counter, which every in-place
    operation on a parameter bumps (``W += ΔW``, ``copy_``, ``load_state_dict``); writes through
    ``param.data`` bypass the counter: call :meth:`refresh` after those.

    Args:
        n: number of workers.
        address: a Ray cluster to join (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); default
            ``$RAY_ADDRESS`` or a new local cluster.
        gpus_per_worker: GPUs reserved per worker (fractions share a GPU); > 0 puts the workers'
            models on ``cuda``.
        threads_per_worker: torch threads (and CPUs reserved) per worker; default the machine's
            (local) or the cluster's CPUs divided by ``n``.
        retries: times a shard is run again after its worker died (the worker is restarted).
        start_timeout: seconds to wait for the workers to start (a request the cluster cannot
            satisfy would otherwise wait forever).
        shard_timeout: seconds one shard may run before the call fails (``None``: no limit).
        poll: seconds between checks while shards run.

    Attributes:
        n: number of workers; threads_per_worker, gpus_per_worker: each one's share.
        pids: each worker's process id (a restarted worker has a new one).
        timings: seconds of the fixed costs: ``ray_start_s`` (joining or starting Ray),
            ``workers_start_s``, ``last_send_s`` / ``last_send_bytes`` (the last model sync).
        history: per finished shard, in completion order: ``shard``, ``worker``, ``first_pid`` (the
            worker it was first given to), ``pid`` (the one that computed it), ``attempts``, ``wall_s``
            (on the driver), ``sync_s`` and ``run_s`` (on the worker).

    Raises:
        ImportError: Ray is not installed (``pip install 'pmet-lens[ray]'``).
        ValueError: bad sizes, or a request the cluster cannot satisfy (too few CPUs or GPUs).
        TimeoutError: the workers did not start within ``start_timeout`` (resources held elsewhere).
    """

    def __init__(self, n: int, *, address: str | None = None, gpus_per_worker: float = 0,
                 threads_per_worker: int | None = None, retries: int = 2, start_timeout: float = 180.0,
                 shard_timeout: float | None = None, poll: float = 1.0) -> None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ValueError(f"n (workers) must be an int >= 1, got {n!r}")
        if threads_per_worker is not None and (isinstance(threads_per_worker, bool) or not isinstance(threads_per_worker, int)
                                               or threads_per_worker < 1):
            raise ValueError(f"threads_per_worker must be an int >= 1, got {threads_per_worker!r}")
        if not isinstance(gpus_per_worker, (int, float)) or isinstance(gpus_per_worker, bool) or gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker must be a number >= 0, got {gpus_per_worker!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"retries must be an int >= 0, got {retries!r}")
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # no token notice on a local cluster
        try:
            import ray
        except ImportError:
            raise ImportError(f"a worker pool needs Ray, an optional extra of pmet-lens: {_INSTALL_HINT}") from None

        self.n = n
        self.gpus_per_worker = float(gpus_per_worker)
        self.retries = retries
        self.start_timeout = float(start_timeout)
        self.shard_timeout = shard_timeout
        self.poll = float(poll)
        self.history: list[dict[str, Any]] = []
        self.timings: dict[str, float] = {}
        self._closed = False
        self._owns_ray = False
        self._models: dict[int, _ModelState] = {}
        address = address or os.environ.get("RAY_ADDRESS") or None
        start = time.perf_counter()
        if ray.is_initialized():
            self.address = "connected"
        elif address:
            ray.init(address=address, logging_level=logging.WARNING)
            self._owns_ray = True
            self.address = address
        else:
            threads = threads_per_worker or max(1, (os.cpu_count() or 1) // n)
            ray.init(num_cpus=n * threads, include_dashboard=False, logging_level=logging.WARNING)
            self._owns_ray = True
            self.address = "local"
        self.timings["ray_start_s"] = time.perf_counter() - start
        total = ray.cluster_resources()
        if threads_per_worker is None:
            threads_per_worker = max(1, int(total.get("CPU", 1)) // n)
        self.threads_per_worker = threads_per_worker
        try:
            self._check_resources(total, ray.available_resources())
            start = time.perf_counter()
            self._actor_cls = ray.remote(ModelWorker).options(
                num_cpus=threads_per_worker, num_gpus=self.gpus_per_worker, max_restarts=-1, max_task_retries=0)
            self._device = "cuda" if self.gpus_per_worker > 0 else "cpu"
            self._actors = [self._new_actor() for _ in range(n)]
            self.pids = self._await([a.ready.remote() for a in self._actors], "start")
            self.timings["workers_start_s"] = time.perf_counter() - start
        except BaseException:
            self.close()
            raise
        logger.info("worker pool: %d workers x %d threads (%s), pids %s", n, threads_per_worker, self.address, self.pids)

    # ------------------------------------------------------------------ set-up
    def _check_resources(self, total: Mapping[str, float], available: Mapping[str, float]) -> None:
        need = {"CPU": self.n * self.threads_per_worker, "GPU": self.n * self.gpus_per_worker}
        for kind, amount in need.items():
            if amount > total.get(kind, 0.0) + 1e-9:
                raise ValueError(
                    f"{self.n} workers need {amount:g} {kind}s ({self.threads_per_worker if kind == 'CPU' else self.gpus_per_worker:g} "
                    f"each) but the Ray cluster has {total.get(kind, 0.0):g}: use fewer workers, fewer "
                    f"{'threads_per_worker' if kind == 'CPU' else 'gpus_per_worker'}, or a larger cluster")
            if amount > available.get(kind, 0.0) + 1e-9:
                logger.warning("only %g of the %g %ss the workers need are free now; they start when others are released "
                               "(or fail after %.0f s)", available.get(kind, 0.0), amount, kind, self.start_timeout)

    def _new_actor(self) -> Any:
        return self._actor_cls.remote(self.threads_per_worker, self._device)

    def _await(self, refs: list[Any], what: str) -> list[Any]:
        import ray
        from ray.exceptions import GetTimeoutError

        try:
            return ray.get(refs, timeout=self.start_timeout)
        except GetTimeoutError:
            free = ray.available_resources()
            raise TimeoutError(
                f"the workers did not {what} within {self.start_timeout:.0f} s: they need {self.threads_per_worker} CPUs"
                f"{f' and {self.gpus_per_worker:g} GPUs' if self.gpus_per_worker else ''} each and the cluster has "
                f"{free.get('CPU', 0):g} CPUs / {free.get('GPU', 0):g} GPUs free; another pool or job may hold them") from None

    # ------------------------------------------------------------------ state
    @property
    def closed(self) -> bool:
        """Whether :meth:`close` was called."""
        return self._closed

    def __repr__(self) -> str:
        state = "closed" if self._closed else self.address
        return (f"Workers(n={self.n}, threads_per_worker={self.threads_per_worker}, "
                f"gpus_per_worker={self.gpus_per_worker:g}, {state})")

    def __enter__(self) -> "Workers":
        self._check_open()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError("this worker pool is closed (Workers.close() or the end of its `with` block): "
                               "create a new pmet_lens.parallel.Workers to run on workers again")

    def close(self) -> None:
        """Stop the workers, and the Ray cluster if this pool started or joined it; the pool cannot be
        used afterwards. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            import ray

            for actor in getattr(self, "_actors", []):
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # already gone
                    pass
            self._actors = []
            self._models.clear()
            if self._owns_ray and ray.is_initialized():
                ray.shutdown()
        except ImportError:  # pragma: no cover - Ray vanished
            pass

    # ------------------------------------------------------------------ model
    def _sync(self, model: Any) -> ModelHandle:
        """Put the model's current weights on the object store: everything the first time, then the
        tensors whose stamp changed since the last call."""
        import ray

        state = self._models.get(id(model))
        if state is None or state.ref() is not model:
            tok = getattr(model, "tokenizer", None)
            from pmet_lens.core.fastpath import is_fast

            names = tuple(model.state_dict(keep_vars=True))
            side: Literal["left", "right"] = "left" if getattr(tok, "padding_side", "right") == "left" else "right"
            spec = ModelSpec(cfg=model.cfg, tokenizer=tok, padding_side=side, fast=is_fast(model), names=names)
            state = _ModelState(ref=weakref.ref(model), key=uuid.uuid4().hex, spec=ray.put(spec))
            self._models = {k: v for k, v in self._models.items() if v.ref() is not None}
            self._models[id(model)] = state
        start = time.perf_counter()
        sent, size = 0, 0
        for name, t in model.state_dict(keep_vars=True).items():
            stamp = tensor_stamp(t)
            if state.stamps.get(name) != stamp:
                value = t.detach().to("cpu", copy=True).contiguous()
                state.table[name] = ray.put(value)
                state.stamps[name] = stamp
                sent += 1
                size += value.numel() * value.element_size()
        if sent or state.table_ref is None:
            state.version += 1
            state.table_ref = ray.put(dict(state.table))
            self.timings["last_send_s"] = time.perf_counter() - start
            self.timings["last_send_bytes"] = float(size)
            logger.info("sent %d tensors (%.1f MB) of the model to the workers (version %d)", sent, size / 2**20, state.version)
        return ModelHandle(key=state.key, version=state.version, spec=state.spec, table=state.table_ref)

    def refresh(self, model: Any) -> None:
        """Send every tensor of ``model`` again on the next call (after writes the pool cannot see,
        such as ``param.data = ...`` or ``param.data.add_(...)``)."""
        state = self._models.get(id(model))
        if state is not None:
            state.stamps.clear()

    def sync(self, model: Any) -> list[int]:
        """Bring every worker to ``model``'s current weights now (the first call otherwise does it);
        returns the workers' process ids."""
        return self.broadcast(model, _worker_pid)

    def broadcast(self, model: Any, fn: Callable[..., Any], *args: Any) -> list[Any]:
        """``fn(model, *args)`` once on every worker (each at ``model``'s current weights), in worker order."""
        import ray

        self._check_open()
        _check_no_hooks(model, "Workers.broadcast")
        _by_value_if_local(fn)
        handle = self._sync(model)
        refs = [a.run.remote(handle, fn, {}, tuple(args)) for a in self._actors]
        timeout = self.shard_timeout if self.shard_timeout is not None else max(self.start_timeout, 600.0)
        out = []
        for ref in refs:
            value, info = ray.get(ref, timeout=timeout)
            out.append(value)
        return out

    # ------------------------------------------------------------------ shards
    def map(
        self,
        model: Any,
        fn: Callable[..., Any],
        shards: Sequence[tuple],
        *,
        common: Mapping[str, Any] | None = None,
        checkpoint: "ShardLog | None" = None,
        until: Callable[[list[Any]], bool] | None = None,
        desc: str = "shards",
        progress: bool = False,
    ) -> list[Any]:
        """``fn(model, *shard, **common)`` for every shard on the workers; the results in shard order.

        Each worker runs one shard at a time; a shard whose worker died runs again (on the restarted
        worker or another one) up to ``retries`` times. Finished shards are recorded in ``checkpoint``
        as they complete, and taken from it when it resumes. See
        :func:`pmet_lens.parallel.run_shards` (the entry point the stages use) for ``until``.

        Raises:
            ShardError: a shard's code raised (its exception is the cause), its worker died more
                than ``retries`` times, or it ran longer than ``shard_timeout``.
            ValueError: the model has hooks attached (workers would not see them).
        """
        import ray
        from ray.exceptions import (
            ObjectLostError,
            OutOfMemoryError,
            RayActorError,
            RayTaskError,
            WorkerCrashedError,
        )

        self._check_open()
        _check_no_hooks(model, "Workers.map")
        _by_value_if_local(fn)
        shards = [tuple(s) for s in shards]
        n = len(shards)
        results: list[Any] = [_MISSING] * n
        todo: deque[int] = deque()
        for i in range(n):
            if checkpoint is not None and checkpoint.done(i):
                results[i] = checkpoint.load(i)
            else:
                todo.append(i)
        limit = n

        def prefix(k: int = 0) -> int:  # the finished shards 0..k-1 (at least k of them known finished)
            while k < limit and results[k] is not _MISSING:
                k += 1
            return k

        checked = 0
        # with `until`, run at most two shards per worker ahead of the finished prefix: a slow shard
        # must not let the other workers run far past the point where the call may stop
        ahead = 2 * len(self._actors) if until is not None else n
        if until is not None:
            k = prefix()
            if k and until(results[:k]):
                return results[:k]
            checked = k
        if not todo:
            return results
        handle = self._sync(model)
        common_ref = ray.put(dict(common or {}))
        idle = list(range(len(self._actors)))
        inflight: dict[Any, tuple[int, int, float]] = {}  # ref -> (shard, actor, submitted)
        attempts = [0] * n
        first_pid: dict[int, int] = {}  # shard -> the worker it was first given to
        bar = tqdm(total=n, initial=n - len(todo), desc=desc, disable=not progress)
        get_timeout = max(self.start_timeout, 600.0)
        try:
            while todo or inflight:
                while todo and idle and todo[0] < checked + ahead:
                    i = todo.popleft()
                    if i >= limit:
                        continue
                    a = idle.pop(0)
                    ref = self._actors[a].run.remote(handle, fn, common_ref, shards[i])
                    inflight[ref] = (i, a, time.monotonic())
                    first_pid.setdefault(i, self.pids[a])
                if not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1, timeout=self.poll)
                if not ready:
                    now = time.monotonic()
                    for i, a, t0 in inflight.values():
                        if self.shard_timeout is not None and now - t0 > self.shard_timeout:
                            raise ShardError(i, n, desc, f"no result within shard_timeout={self.shard_timeout:g} s",
                                             f" on worker {self.pids[a]}")
                    continue
                ref = ready[0]
                i, a, t0 = inflight.pop(ref)
                try:
                    value, info = ray.get(ref, timeout=get_timeout)
                except RayTaskError as exc:  # the shard's own code raised: running it again would raise again
                    cause = exc.cause if isinstance(getattr(exc, "cause", None), BaseException) else exc
                    raise ShardError(i, n, desc, cause, f" on worker {self.pids[a]}") from cause
                except (RayActorError, WorkerCrashedError, ObjectLostError, OutOfMemoryError) as exc:
                    attempts[i] += 1
                    if attempts[i] > self.retries:
                        raise ShardError(i, n, desc, exc, f": its worker died {attempts[i]} times") from exc
                    logger.warning("%s: shard %d lost its worker (pid %s: %s); running it again (attempt %d of %d)",
                                   desc, i, self.pids[a], type(exc).__name__, attempts[i] + 1, self.retries + 1)
                    self._revive(a)
                    todo.appendleft(i)
                    idle.append(a)
                    continue
                idle.append(a)
                self.history.append({"shard": i, "worker": a, "first_pid": first_pid[i], "pid": info["pid"],
                                     "attempts": attempts[i] + 1, "wall_s": time.monotonic() - t0,
                                     "sync_s": info["sync_s"], "run_s": info["run_s"]})
                self.pids[a] = info["pid"]
                results[i] = value
                if checkpoint is not None:
                    checkpoint.save(i, value)
                bar.update(1)
                k = prefix(checked)
                if k > checked:
                    checked = k
                    if until is not None and until(results[:k]):
                        limit = k
                        break
        finally:
            bar.close()
        missing = [i for i in range(limit) if results[i] is _MISSING]
        if missing:  # a scheduling fault, never a partial table
            raise RuntimeError(f"{desc}: shards {missing[:5]} have no result")
        return results[:limit]

    def _revive(self, a: int) -> None:
        """Wait for worker ``a``'s restart, or replace it when it cannot come back."""
        from ray.exceptions import RayActorError

        try:
            self.pids[a] = self._await([self._actors[a].ready.remote()], "restart")[0]
        except RayActorError:
            self._actors[a] = self._new_actor()
            self.pids[a] = self._await([self._actors[a].ready.remote()], "start")[0]
