"""The package's public names: every name in ``pmet_lens.__all__`` (imported lazily) resolves to the object
its module defines, and every ``pmet_lens....`` name the README shows exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

import pmet_lens

README = Path(__file__).resolve().parents[1] / "README.md"


def test_every_lazy_public_name_resolves():
    from pmet_lens import _EXPORTS

    assert pmet_lens.__all__ == sorted(_EXPORTS) and len(pmet_lens.__all__) >= 30
    for name in pmet_lens.__all__:
        obj = getattr(pmet_lens, name)
        assert obj is getattr(importlib.import_module(_EXPORTS[name]), name), name
        assert name in dir(pmet_lens)
        if callable(obj):
            assert (obj.__doc__ or "").strip(), f"pmet_lens.{name} has no docstring"
    with pytest.raises(AttributeError, match="module 'pmet_lens' has no attribute 'no_such_name'"):
        pmet_lens.no_such_name


def _resolve(dotted: str):
    parts = dotted.split(".")
    obj = importlib.import_module(parts[0])
    for i, part in enumerate(parts[1:], start=1):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            obj = importlib.import_module(".".join(parts[: i + 1]))
    return obj


def test_the_names_in_the_readme_exist():
    names = sorted(set(re.findall(r"\bpmet_lens(?:\.[A-Za-z_]\w*)+", README.read_text(encoding="utf-8"))))
    assert len(names) >= 5
    for dotted in names:
        _resolve(dotted)  # raises on a name the package does not have
