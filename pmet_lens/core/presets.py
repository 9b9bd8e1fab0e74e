"""Preset tables: the read-only ones shipped in the package and the user's own.

Two tables exist, each a JSON object keyed by model name (``cfg.model_name``):
``critical_layers.json`` (the critical layer range R of each model) and ``editing.json`` (the
editors' hyper-parameters per method). The shipped copies live in ``pmet_lens/presets/`` and are
never written. What a user's run computes (R of a model they traced, tuned or calibrated
hyper-parameters) goes to the user preset directory, ``$PMET_LENS_PRESETS`` if set, else
``default_cache_dir() / "presets"`` (under ``$PMET_LENS_CACHE``), or to a directory they name;
lookups read the user's entry of a model before the shipped one.
"""

from __future__ import annotations

import json
import logging
import os
from datetime import date
from importlib import resources
from pathlib import Path
from typing import Any

from pmet_lens.core.paths import atomic_path

logger = logging.getLogger(__name__)

__all__ = [
    "TABLES",
    "find_entry",
    "merged_table",
    "shipped_presets_dir",
    "user_presets_dir",
    "write_entry",
]

TABLES: tuple[str, ...] = ("critical_layers.json", "editing.json")
"""The preset tables (file names, equal in the shipped and the user directory)."""


def shipped_presets_dir() -> Path:
    """The package's read-only preset directory, ``pmet_lens/presets``."""
    return Path(str(resources.files("pmet_lens") / "presets"))


def user_presets_dir() -> Path:
    """The user's preset directory: ``$PMET_LENS_PRESETS`` if set, else ``default_cache_dir() / "presets"``
    (under ``$PMET_LENS_CACHE``)."""
    if os.environ.get("PMET_LENS_PRESETS"):
        return Path(os.environ["PMET_LENS_PRESETS"])
    from pmet_lens.core.models import default_cache_dir

    return default_cache_dir() / "presets"


def _check_table(table: str) -> str:
    if table not in TABLES:
        raise ValueError(f"unknown preset table {table!r}; the tables are {list(TABLES)}")
    return table


def _read(path: Path) -> dict[str, Any]:
    """A table file's entries; an unreadable user file is reported and ignored."""
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("preset file %s is unreadable (%s); ignoring it", path, exc)
        return {}
    if not isinstance(data, dict):
        logger.warning("preset file %s does not hold a JSON object; ignoring it", path)
        return {}
    return data


def merged_table(table: str, user_dir: str | Path | None = None) -> dict[str, Any]:
    """Entries of ``table`` by model name: the shipped ones, with each model the user has an entry
    for replaced by that entry (user first). ``user_dir`` defaults to :func:`user_presets_dir`."""
    _check_table(table)
    merged = dict(_read(shipped_presets_dir() / table))
    user = Path(user_dir) if user_dir is not None else user_presets_dir()
    merged.update(_read(user / table))
    return merged


def find_entry(table: str, model_name: str, user_dir: str | Path | None = None) -> tuple[str, Any] | None:
    """``(key, entry)`` of ``model_name`` in the merged ``table``, or None.

    The key matches exactly, else case-insensitively, else a hub-style ``org/name`` by its last
    part (TransformerLens's ``cfg.model_name`` drops the organisation). Keys starting with ``_``
    are comments.
    """
    entries = {k: v for k, v in merged_table(table, user_dir).items() if not k.startswith("_")}
    if model_name in entries:
        return model_name, entries[model_name]
    wanted = {model_name.lower(), model_name.rsplit("/", 1)[-1].lower()}
    key = next((k for k in entries if k.lower() in wanted), None)
    return None if key is None else (key, entries[key])


def write_entry(table: str, model_name: str, entry: dict[str, Any], user_dir: str | Path | None = None) -> Path:
    """Store ``entry`` for ``model_name`` in the USER copy of ``table`` (other models' entries are
    kept; the write is atomic). ``entry["source"]``, if present, gets today's date appended.

    Returns:
        the path of the table file written.
    """
    _check_table(table)
    directory = Path(user_dir) if user_dir is not None else user_presets_dir()
    path = directory / table
    if path.resolve().is_relative_to(shipped_presets_dir().resolve()):
        raise ValueError(f"{path} is the package's read-only preset directory; write user presets elsewhere")
    data = _read(path)
    entry = dict(entry)
    if "source" in entry:
        entry["source"] = f"{entry['source']}, {date.today().isoformat()}"
    data[model_name] = entry
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path
