"""atomic_path: the target changes in one step or not at all, and no temporary file is left."""

from __future__ import annotations

import pytest

from pmet_lens.core.paths import atomic_path


def test_atomic_path_replaces_or_leaves_alone(tmp_path):
    target = tmp_path / "sub" / "data.json"
    with atomic_path(target) as tmp:  # the folder is made
        assert tmp.parent == target.parent and not target.exists()
        tmp.write_text("first")
    assert target.read_text() == "first"
    with pytest.raises(OSError, match="disk full"):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise OSError("disk full")
    assert target.read_text() == "first"
    assert sorted(p.name for p in target.parent.iterdir()) == ["data.json"]
