"""Cached matrices: a file is used only when its key, format, shape, values and dtype check out."""

from __future__ import annotations

import logging

import torch

from pmet_lens.core.cachefile import read_matrix, write_matrix


def test_round_trip_keeps_the_matrix_and_metadata(tmp_path):
    m = torch.randn(3, 3, dtype=torch.float64)
    write_matrix(tmp_path, "k1", "P", 2, m, {"dim": "3"})
    got, meta = read_matrix(tmp_path, "k1", "P", 2, what="test")
    assert torch.equal(got, m) and meta["dim"] == "3" and meta["key"] == "k1"
    assert [p.name for p in tmp_path.iterdir()] == ["k1.safetensors"]  # no temporary file left


def test_bad_files_are_refused_with_a_warning(tmp_path, caplog):
    write_matrix(tmp_path, "k1", "P", 2, torch.eye(2))
    assert read_matrix(tmp_path, "missing", "P", 2, what="test") is None  # no file: silent
    with caplog.at_level(logging.WARNING):
        assert read_matrix(tmp_path, "k1", "P", 3, what="test") is None                       # other format
        assert read_matrix(tmp_path, "k1", "P", 2, what="test", dtype=torch.float64) is None  # other dtype
        (tmp_path / "k2.safetensors").write_bytes((tmp_path / "k1.safetensors").read_bytes())
        assert read_matrix(tmp_path, "k2", "P", 2, what="test") is None                       # other key
        write_matrix(tmp_path, "k3", "P", 2, torch.full((2, 2), float("nan")))
        assert read_matrix(tmp_path, "k3", "P", 2, what="test") is None                       # not finite
        write_matrix(tmp_path, "k4", "P", 2, torch.ones(2, 3))
        assert read_matrix(tmp_path, "k4", "P", 2, what="test") is None                       # not square
        (tmp_path / "k5.safetensors").write_bytes((tmp_path / "k1.safetensors").read_bytes()[:20])
        assert read_matrix(tmp_path, "k5", "P", 2, what="test") is None                       # truncated
    assert sum("rebuilding it" in r.getMessage() for r in caplog.records) == 6


def test_no_cache_dir_reads_and_writes_nothing(tmp_path):
    write_matrix(None, "k", "P", 1, torch.eye(2))
    assert read_matrix(None, "k", "P", 1, what="test") is None
