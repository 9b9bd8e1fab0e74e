"""Atomic file writes and cache-entry locks.

Every file the package writes (covariance and model caches, saved edits, critical layers) is written
beside its target and moved into place in one ``os.replace``, so a reader never sees a half-written
file and a failed write leaves nothing behind. A cache entry that several processes may build at once
(workers of a :class:`~pmet_lens.parallel.Workers` pool, two runs on one machine) is built under
:func:`file_lock`: the first process builds and writes it, the others wait and then read it."""

from __future__ import annotations

import os
import threading
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterable, Iterator

__all__ = ["atomic_path", "file_lock", "file_locks"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder is made) to write to; on a normal exit it
    replaces ``path``, and on an exception it is removed and ``path`` is left as it was. The
    temporary name is unique per process and thread, so concurrent writers never share one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}-{threading.get_ident()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def file_lock(path: str | Path) -> Iterator[None]:
    """Hold an exclusive advisory lock (``fcntl.flock``) on the lock file ``path`` (created, folder
    included) for the ``with`` block; a second process (or thread) asking for it waits until the
    first leaves. The lock is released when its holder exits or dies. Where ``fcntl`` does not exist
    (Windows), the block runs unlocked: writes stay atomic, a concurrent build may be repeated."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    with open(path, "a+b") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


@contextmanager
def file_locks(paths: Iterable[str | Path]) -> Iterator[None]:
    """:func:`file_lock` on several lock files, taken in sorted order (so two processes asking for
    overlapping sets cannot deadlock)."""
    with ExitStack() as stack:
        for p in sorted({str(p) for p in paths}):
            stack.enter_context(file_lock(p))
        yield
