"""The critical layer range R: the rule that picks it from causal traces (MEMIT section 3,
Appendix A, Fig. 3) and the stored ranges that the editors' presets read.
"""

from __future__ import annotations

import json
from datetime import date
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from pmet_lens.core.paths import atomic_path

if TYPE_CHECKING:
    from pmet_lens.analysis.averaged import AverageTrace

__all__ = ["critical_layers", "critical_layers_path", "default_critical_layers", "write_critical_layers"]


def critical_layers_path() -> Path:
    """Path of ``pmet_lens/presets/critical_layers.json``."""
    return Path(str(resources.files("pmet_lens") / "presets" / "critical_layers.json"))


def default_critical_layers(model_name: str) -> list[int] | None:
    """The critical layers R (ascending) stored for ``model_name``, or None when there are none."""
    path = critical_layers_path()
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(model_name)
    if not entry or "layers" not in entry:
        return None
    return sorted(int(l) for l in entry["layers"])


def write_critical_layers(model_name: str, layers: list[int], source: str, path: Path | None = None) -> Path:
    """Store R for ``model_name`` (other models' entries are kept); ``source`` gets today's date appended."""
    path = path or critical_layers_path()
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[model_name] = {"layers": sorted(int(l) for l in layers), "source": f"{source}, {date.today().isoformat()}"}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path


def critical_layers(
    plain: "AverageTrace | Float[torch.Tensor, 'n_layers']",
    mlp_severed: Float[torch.Tensor, "n_layers"] | None = None,
    *,
    size: int = 5,
) -> tuple[list[int], int]:
    """The critical MLP range R and its last layer L = max(R) (MEMIT section 3, Appendix A, Fig. 3).

    Rule: gap(l) = mean indirect effect of restoring the last subject token's hidden state at
    layer l (plain) minus the same with that token's later MLP outputs severed. R is the run of
    ``size`` consecutive layers with the largest total gap, sum(gap[s : s + size]) (earliest run on
    ties); L = max(R). ``size`` defaults to 5, the size of the papers' ranges (GPT-NeoX {6..10};
    GPT-J {3..8} has 6).

    Args:
        plain: an :class:`AverageTrace` with severed curves, or the plain curve ``[n_layers]``.
        mlp_severed: the MLP-severed curve when ``plain`` is a tensor.
        size: number of layers in R.

    Returns:
        ``(R, L)`` with R sorted ascending.
    """
    from pmet_lens.analysis.averaged import AverageTrace

    if isinstance(plain, AverageTrace):
        if "mlp" not in plain.severed_mean:
            raise ValueError("the AverageTrace has no severed curves: run average_traces(..., severed=True)")
        base, severed = plain.severed_mean["none"], plain.severed_mean["mlp"]
    else:
        if mlp_severed is None:
            raise ValueError("pass the MLP-severed curve with a plain curve tensor")
        base, severed = plain, mlp_severed
    base, severed = torch.as_tensor(base).double(), torch.as_tensor(severed).double()
    if base.shape != severed.shape or base.ndim != 1:
        raise ValueError(f"curves must be 1-D of equal length, got {tuple(base.shape)} and {tuple(severed.shape)}")
    n = base.shape[0]
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= n:
        raise ValueError(f"size must be an int in 1..{n}, got {size!r}")
    gap = base - severed
    sums = torch.stack([gap[s : s + size].sum() for s in range(n - size + 1)])
    start = int(torch.argmax(sums))  # first maximum
    layers = list(range(start, start + size))
    return layers, max(layers)
