"""User presets: written to the user's directory, read before the shipped ones; the package's
preset files are never written."""

from __future__ import annotations

import hashlib

import pytest

from pmet_lens.analysis.layers import default_critical_layers, write_critical_layers
from pmet_lens.core.presets import shipped_presets_dir, user_presets_dir, write_entry
from pmet_lens.editing.hparams import preset, preset_names


def _shipped_digest() -> str:
    return "".join(hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(shipped_presets_dir().glob("*.json")))


def test_user_presets_go_to_the_cache_and_win(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path))
    monkeypatch.delenv("PMET_LENS_PRESETS", raising=False)
    before = _shipped_digest()
    assert user_presets_dir() == tmp_path / "presets"
    path = write_critical_layers("my-model", [2, 1], "test")
    assert path == tmp_path / "presets" / "critical_layers.json"
    assert default_critical_layers("my-model") == [1, 2]
    assert preset("my-model", "memit").layers == (1, 2)         # class defaults with the user's R
    # a user entry for a shipped model is read before the shipped one
    write_critical_layers("SmolLM2-135M-Instruct", [0, 1, 2], "test")
    write_entry("editing.json", "SmolLM2-135M-Instruct", {"pmet": {"lam": 7.0}, "memit": {"lam": 8.0}})
    assert preset("SmolLM2-135M-Instruct", "pmet").layers == (0, 1, 2)
    assert preset("SmolLM2-135M-Instruct", "memit").lam == 8.0
    assert "SmolLM2-135M-Instruct" in preset_names()
    assert _shipped_digest() == before


def test_explicit_preset_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PMET_LENS_PRESETS", raising=False)
    other = tmp_path / "elsewhere"
    write_critical_layers("m2", [3], "test", other)
    assert default_critical_layers("m2") is None
    assert default_critical_layers("m2", other) == [3]
    assert preset("m2", "pmet", user_dir=other).layers == (3,)


def test_no_write_into_the_package():
    with pytest.raises(ValueError, match="read-only"):
        write_entry("editing.json", "x", {}, shipped_presets_dir())
    with pytest.raises(ValueError, match="unknown preset table"):
        write_entry("other.json", "x", {})


def test_shipped_presets_still_read(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path))
    monkeypatch.delenv("PMET_LENS_PRESETS", raising=False)
    assert preset("SmolLM2-135M-Instruct", "pmet").layers == (3, 4, 5, 6, 7)
    assert preset("EleutherAI/gpt-j-6B", "memit").lam == 15000.0


def test_presets_env_var_names_the_user_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PMET_LENS_PRESETS", str(tmp_path / "mine"))
    assert user_presets_dir() == tmp_path / "mine"
    path = write_critical_layers("my-model", [3, 2], "test")
    assert path == tmp_path / "mine" / "critical_layers.json"
    assert default_critical_layers("my-model") == [2, 3]
    assert not (tmp_path / "cache" / "presets").exists()
