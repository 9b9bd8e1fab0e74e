"""Atomic file writes: every file the package writes (covariance and model caches, saved edits,
critical layers) is written beside its target and moved into place in one ``os.replace``, so a
reader never sees a half-written file and a failed write leaves nothing behind."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path"]


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (its folder is made) to write to; on a normal exit it
    replaces ``path``, and on an exception it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
