"""Shards of a stage: how they are cut, run (here or on a pool), and logged for resuming.

:func:`run_shards` is the one entry point the stages use: ``fn(model, *shard, **common)`` for every
shard, in this process or on a :class:`~pmet_lens.parallel.Workers` pool, results in shard order.
A :class:`ShardLog` keeps every finished shard's result on disk as it completes, so a call that
was killed resumes with only its unfinished shards.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import pickle
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, ParamSpec, Sequence, TypeVar

import torch
from tqdm.auto import tqdm

from pmet_lens.core.models import require_model
from pmet_lens.core.paths import atomic_path

if TYPE_CHECKING:
    from pmet_lens.parallel.pool import Workers

logger = logging.getLogger(__name__)

__all__ = ["ShardError", "ShardLog", "auto_shard_size", "one_pool", "pool_of", "pool_size", "run_shards", "shard_ranges"]

_LOG_FORMAT = 1


class ShardError(RuntimeError):
    """A shard failed: its own code raised, or its worker died more often than the pool retries.

    Attributes:
        shard: the failed shard's index (0-based, in shard order).
        n_shards: the number of shards of the call.
        cause: the exception raised by the shard's code (or the last worker failure).
    """

    def __init__(self, shard: int, n_shards: int, what: str, cause: BaseException | str, detail: str = "") -> None:
        self.shard = shard
        self.n_shards = n_shards
        self.cause = cause
        text = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
        super().__init__(f"{what}: shard {shard} of {n_shards} failed{detail}: {text} (no partial result is returned)")


def shard_ranges(n_items: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive shards of ``size`` items covering ``n_items`` (the last may be shorter)."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise ValueError(f"shard size must be an int >= 1, got {size!r}")
    return [(a, min(a + size, n_items)) for a in range(0, n_items, size)]


def pool_size(workers: "int | Workers | None") -> int:
    """Number of workers ``workers`` stands for (1 for ``None``, the single process)."""
    if workers is None:
        return 1
    if isinstance(workers, bool):
        raise TypeError("workers must be None, an int (a local pool of that size) or a pmet_lens.parallel.Workers")
    if isinstance(workers, int):
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        return workers
    n = getattr(workers, "n", None)
    if not isinstance(n, int):
        raise TypeError(f"workers must be None, an int or a pmet_lens.parallel.Workers, got {type(workers).__name__}")
    return n


def auto_shard_size(n_items: int, workers: "int | Workers | None", *, multiple: int = 1, per_worker: int = 4,
                    at_most: int | None = None) -> int:
    """Items per shard: about ``per_worker`` shards per worker (so a slow shard does not leave the
    others idle at the end), rounded up to a multiple of ``multiple`` (a stage's batch size, so shards
    hold whole batches), at most ``at_most``."""
    size = max(1, math.ceil(n_items / (per_worker * pool_size(workers))))
    size = multiple * math.ceil(size / multiple)
    return max(1, min(size, at_most)) if at_most is not None else size


@contextmanager
def pool_of(workers: "int | Workers") -> Iterator["Workers"]:
    """The pool ``workers`` stands for: a given :class:`~pmet_lens.parallel.Workers` as it is (left
    open), or for an int a local pool of that size, closed on leaving the block."""
    from pmet_lens.parallel.pool import Workers

    if isinstance(workers, Workers):
        yield workers
        return
    n = pool_size(workers)
    with Workers(n) as pool:
        yield pool


P = ParamSpec("P")
R = TypeVar("R")


def one_pool(fn: Callable[P, R]) -> Callable[P, R]:
    """Decorator of a stage that runs several sharded steps: a call with ``workers=<int>`` (a keyword)
    starts one local pool of that size for the whole call, shared by its steps, and closes it after."""

    @functools.wraps(fn)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        workers = kwargs.get("workers")
        if workers is None or isinstance(workers, bool) or not isinstance(workers, int):
            return fn(*args, **kwargs)
        with pool_of(workers) as pool:
            kwargs["workers"] = pool
            return fn(*args, **kwargs)

    return wrapper


class ShardLog:
    """Finished shards of long calls, written to ``directory`` as each completes.

    A call that is given a log writes there a description of itself (a digest of the per-shard
    function, the shards, the shared arguments and the model's weights) and then one file per
    finished shard (written atomically). Given the same directory with ``resume=True``, the same
    call loads the finished shards and computes only the others; a log written by a different call
    (other items, settings or weights) is refused with an error, never mixed in. Without ``resume``
    an existing log is cleared first.

    Args:
        directory: where the log lives (made when needed).
        resume: take the finished shards of an earlier run of the same call.
    """

    def __init__(self, directory: str | Path, *, resume: bool = False) -> None:
        self.directory = Path(directory)
        self.resume = bool(resume)
        self._digest: str | None = None

    def __repr__(self) -> str:
        return f"ShardLog({str(self.directory)!r}, resume={self.resume})"

    def child(self, name: str) -> "ShardLog":
        """The log of one of several calls of a run, in the sub-directory ``name``."""
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"a shard log name must be a plain file name, got {name!r}")
        return ShardLog(self.directory / name, resume=self.resume)

    @property
    def _meta(self) -> Path:
        return self.directory / "shards.json"

    def bind(self, digest: str, n_shards: int, what: str) -> int:
        """Start (or resume) the log of the call described by ``digest``; returns how many shards
        are already finished.

        Raises:
            ValueError: with ``resume``, the directory holds the log of a different call.
        """
        meta = {"format": _LOG_FORMAT, "digest": digest, "n_shards": n_shards, "what": what}
        if self.resume and self._meta.is_file():
            found = json.loads(self._meta.read_text())
            if {k: found.get(k) for k in meta} != meta:
                raise ValueError(
                    f"--resume: the shard log in {self.directory} was written by a different call ({found.get('what')!r}, "
                    f"{found.get('n_shards')} shards, other items, settings or weights than this {what!r} with {n_shards} "
                    "shards); remove the directory or run without resuming")
        else:
            self.clear()
            self.directory.mkdir(parents=True, exist_ok=True)
            with atomic_path(self._meta) as tmp:
                tmp.write_text(json.dumps(meta, indent=1) + "\n")
        self._digest = digest
        done = sum(self.done(i) for i in range(n_shards))
        if done:
            logger.info("%s: resuming with %d of %d shards finished (%s)", what, done, n_shards, self.directory)
        return done

    def _path(self, i: int) -> Path:
        return self.directory / f"shard-{i:06d}.pt"

    def done(self, i: int) -> bool:
        """Whether shard ``i`` is finished."""
        return self._digest is not None and self._path(i).is_file()

    def load(self, i: int) -> Any:
        """The result of finished shard ``i``."""
        return torch.load(self._path(i), weights_only=False)

    def save(self, i: int, value: Any) -> None:
        """Record shard ``i``'s result (atomically)."""
        if self._digest is None:
            raise RuntimeError("ShardLog.save before bind")
        with atomic_path(self._path(i)) as tmp:
            torch.save(value, tmp)

    def clear(self) -> None:
        """Remove the log's files (the directory's shard files, its description and its children's)."""
        if not self.directory.is_dir():
            return
        for p in self.directory.iterdir():
            if p.is_file() and (p.name == "shards.json" or (p.name.startswith("shard-") and p.suffix == ".pt")):
                p.unlink()
            elif p.is_dir() and (p / "shards.json").is_file():
                shutil.rmtree(p)
        self._digest = None

    def remove(self) -> None:
        """Delete the log (e.g. once the run's outputs are written)."""
        self.clear()
        if self.directory.is_dir() and not any(self.directory.iterdir()):
            self.directory.rmdir()


def _call_digest(model: Any, fn: Callable[..., Any], shards: Sequence[tuple], common: Mapping[str, Any]) -> str:
    """sha256 of what decides a call's shard results: the function, the shards, the shared arguments
    and the model's weights."""
    from pmet_lens.parallel.pool import weights_digest

    h = hashlib.sha256()
    h.update(f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', repr(fn))}".encode())
    for part in (list(shards), dict(sorted(common.items()))):
        try:
            h.update(pickle.dumps(part, protocol=4))
        except Exception:  # an unpicklable argument: describe it by its text
            h.update(repr(part).encode())
    h.update(weights_digest(model).encode())
    return h.hexdigest()


def run_shards(
    model: Any,
    fn: Callable[..., Any],
    shards: Sequence[tuple],
    *,
    common: Mapping[str, Any] | None = None,
    workers: "int | Workers | None" = None,
    checkpoint: ShardLog | None = None,
    until: Callable[[list[Any]], bool] | None = None,
    desc: str = "shards",
    progress: bool = False,
) -> list[Any]:
    """``fn(model, *shard, **common)`` for every shard; the results in shard order.

    Args:
        model: the hooked model (the driver's; workers use a copy with the same current weights).
        fn: the per-shard function, module level (workers import it by name; a function of a script
            or notebook is sent by value).
        shards: each shard's positional arguments.
        common: keyword arguments shared by every shard (sent to the workers once per call).
        workers: ``None`` runs the shards here, one after another; an int or a
            :class:`~pmet_lens.parallel.Workers` runs them on a pool.
        checkpoint: a :class:`ShardLog` that records every finished shard and, when resuming,
            supplies those already finished.
        until: stop once ``until(results of shards 0..k)`` is true for the finished prefix; the
            results returned then end at that prefix or a little after it (shards already done).
        desc: what the shards are, for the progress bar and errors.
        progress: a progress bar over shards.

    Raises:
        ShardError: a shard failed (in this process its exception propagates unchanged).
    """
    require_model(model, "pmet_lens.parallel.run_shards")
    shards = [tuple(s) for s in shards]
    common = dict(common or {})
    if checkpoint is not None:
        checkpoint.bind(_call_digest(model, fn, shards, common), len(shards), desc)
    if workers is not None:
        with pool_of(workers) as pool:
            return pool.map(model, fn, shards, common=common, checkpoint=checkpoint, until=until, desc=desc,
                            progress=progress)
    results: list[Any] = []
    for i, shard in enumerate(tqdm(shards, desc=desc, disable=not progress or len(shards) < 2)):
        if checkpoint is not None and checkpoint.done(i):
            value = checkpoint.load(i)
        else:
            value = fn(model, *shard, **common)
            if checkpoint is not None:
                checkpoint.save(i, value)
        results.append(value)
        if until is not None and until(results):
            break
    return results
