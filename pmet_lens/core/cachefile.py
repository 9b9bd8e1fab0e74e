"""One square matrix per ``.safetensors`` cache file, named by a key and checked on every read.

The covariance cache (:class:`~pmet_lens.editing.covariance.CovarianceStore`) and the null-space
cache (:class:`~pmet_lens.editing.nullspace.NullspaceStore`) store their matrices this way. A file
records its key and the store's format number in its metadata; a read returns ``None`` (and logs a
warning) for a file that is missing, truncated, corrupt, written for another key or format, or whose
matrix is not square and finite, so the caller rebuilds it and never uses a bad file. Writes are
atomic (:func:`~pmet_lens.core.paths.atomic_path`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from pmet_lens.core.paths import atomic_path

logger = logging.getLogger(__name__)

__all__ = ["read_matrix", "write_matrix"]


def read_matrix(cache_dir: Path | None, key: str, name: str, fmt: int, *, what: str,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, dict[str, str]] | None:
    """The matrix ``name`` of the cache file ``cache_dir / f"{key}.safetensors"`` and its metadata.

    Args:
        cache_dir: the cache directory (``None``: no disk cache, always ``None``).
        key: the file's key; the metadata must record the same.
        name: the tensor's name in the file.
        fmt: the store's format number; the metadata must record the same.
        what: what the file holds, for the warning (e.g. ``"covariance"``).
        dtype: the dtype the matrix must have (``None``: any).

    Returns:
        ``(matrix, metadata)``, or ``None`` when there is no usable file.
    """
    if cache_dir is None:
        return None
    path = cache_dir / f"{key}.safetensors"
    if not path.is_file():
        return None
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            mat = fh.get_tensor(name)
        if meta.get("key") != key or int(meta.get("format", -1)) != fmt:
            raise ValueError("metadata does not match the requested key")
        if mat.ndim != 2 or mat.shape[0] != mat.shape[1] or not torch.isfinite(mat).all():
            raise ValueError("matrix is not square and finite")
        if dtype is not None and mat.dtype != dtype:
            raise ValueError(f"matrix is {mat.dtype}, not {dtype}")
        return mat, dict(meta)
    except Exception as exc:  # truncated / corrupt / foreign file: rebuild, never use
        logger.warning("%s cache file %s is corrupt or does not match (%s); rebuilding it", what, path, exc)
        return None


def write_matrix(cache_dir: Path | None, key: str, name: str, fmt: int, matrix: torch.Tensor,
                 extra: dict[str, str] | None = None) -> None:
    """Write ``matrix`` as ``name`` into ``cache_dir / f"{key}.safetensors"`` atomically, with the key,
    the format number and ``extra`` in its metadata (nothing without a disk cache)."""
    if cache_dir is None:
        return
    from safetensors.torch import save_file

    meta = {"key": key, "format": str(fmt), **(extra or {})}
    with atomic_path(cache_dir / f"{key}.safetensors") as tmp:
        save_file({name: matrix.detach().cpu().contiguous()}, str(tmp), metadata=meta)
