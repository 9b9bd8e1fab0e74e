"""The critical-layer rule (MEMIT section 3, Fig. 3) and the stored ranges the presets read
(pmet_lens.analysis.layers)."""

from __future__ import annotations

import json

import pytest
import torch

from pmet_lens.analysis.averaged import TOKEN_CLASSES, AverageTrace
from pmet_lens.analysis.layers import critical_layers, default_critical_layers, write_critical_layers
from pmet_lens.core.presets import shipped_presets_dir


def _trace(none: torch.Tensor, mlp: torch.Tensor | None) -> AverageTrace:
    n = none.shape[0]
    severed = {"none": none, "attn": none.clone()} | ({"mlp": mlp} if mlp is not None else {})
    per_class = {"hidden": torch.zeros(len(TOKEN_CLASSES), n)}
    return AverageTrace(kinds=("hidden",), mean=per_class, ci=per_class,
                        count={"hidden": torch.ones(len(TOKEN_CLASSES), dtype=torch.long)},
                        severed_mean=severed, severed_ci={k: torch.zeros(n) for k in severed}, n_facts=2, n_seen=2)


def test_rule_picks_the_window_with_the_largest_gap():
    plain = torch.tensor([0.1, 0.2, 0.9, 0.9, 0.9, 0.2, 0.1, 0.0])
    severed = torch.tensor([0.1, 0.2, 0.1, 0.2, 0.3, 0.2, 0.1, 0.0])  # gap: 0 0 .8 .7 .6 0 0 0
    assert critical_layers(plain, severed, size=3) == ([2, 3, 4], 4)
    assert critical_layers(plain, severed, size=1) == ([2], 2)
    # the window sums the gap: two medium layers beat one large one
    gap = torch.tensor([0.0, 0.5, 0.0, 0.0, 0.3, 0.3])
    assert critical_layers(gap, torch.zeros(6), size=2) == ([4, 5], 5)


def test_ties_go_to_the_earliest_window():
    gap = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])
    assert critical_layers(gap, torch.zeros(5), size=1) == ([0], 0)
    assert critical_layers(torch.ones(5), torch.zeros(5), size=5) == ([0, 1, 2, 3, 4], 4)


def test_average_trace_input_uses_its_severed_curves():
    plain = torch.tensor([0.0, 0.1, 0.5, 0.6, 0.1, 0.0])
    severed = torch.tensor([0.0, 0.1, 0.1, 0.1, 0.1, 0.0])
    assert critical_layers(_trace(plain, severed), size=2) == critical_layers(plain, severed, size=2) == ([2, 3], 3)
    with pytest.raises(ValueError, match="no severed curves"):
        critical_layers(_trace(plain, None), size=2)


@pytest.mark.parametrize("size", [0, 7, True, 2.0])
def test_bad_size(size):
    with pytest.raises(ValueError, match="size must be an int in 1..6"):
        critical_layers(torch.zeros(6), torch.zeros(6), size=size)


def test_bad_curves():
    with pytest.raises(ValueError, match="MLP-severed curve"):
        critical_layers(torch.zeros(6))
    with pytest.raises(ValueError, match="equal length"):
        critical_layers(torch.zeros(6), torch.zeros(5))
    with pytest.raises(ValueError, match="1-D"):
        critical_layers(torch.zeros(2, 3), torch.zeros(2, 3))


def test_shipped_ranges_are_read_sorted():
    stored = json.loads((shipped_presets_dir() / "critical_layers.json").read_text())
    assert stored, "the package ships at least the default model's R"
    for name, entry in stored.items():
        assert default_critical_layers(name) == sorted(entry["layers"])
    assert default_critical_layers("SmolLM2-135M-Instruct") == [3, 4, 5, 6, 7]
    assert default_critical_layers("no-such-model") is None


def test_write_keeps_other_models(tmp_path):
    path = tmp_path / "critical_layers.json"  # write_critical_layers takes the preset directory
    write_critical_layers("model-a", [5, 3, 4], "test", path=tmp_path)
    write_critical_layers("model-b", [1], "test", path=tmp_path)
    data = json.loads(path.read_text())
    assert data["model-a"]["layers"] == [3, 4, 5] and data["model-b"]["layers"] == [1]
    assert data["model-a"]["source"].startswith("test, ")
