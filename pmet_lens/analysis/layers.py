"""The critical layer range R: the rule that picks it from causal traces (MEMIT section 3,
Appendix A, Fig. 3) and the stored ranges that the editors' presets read; and ROME's single edited
layer (ROME section 2: the MLP layer with the strongest effect at the subject's last token).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float

from pmet_lens.core.presets import find_entry, user_presets_dir, write_entry

if TYPE_CHECKING:
    import pandas as pd

    from pmet_lens.analysis.averaged import AverageTrace

__all__ = ["critical_layers", "critical_layers_path", "default_critical_layers", "strongest_mlp_layer",
           "write_critical_layers"]


def critical_layers_path(user_dir: str | Path | None = None) -> Path:
    """Path of the USER critical-layers table (``user_presets_dir()/critical_layers.json``, or in
    ``user_dir``), where :func:`write_critical_layers` stores R. The shipped table is read-only."""
    return (Path(user_dir) if user_dir is not None else user_presets_dir()) / "critical_layers.json"


def default_critical_layers(model_name: str, user_dir: str | Path | None = None) -> list[int] | None:
    """The critical layers R (ascending) stored for ``model_name`` (the user's entry first, then the
    shipped one; see :mod:`pmet_lens.core.presets`), or None when there are none."""
    found = find_entry("critical_layers.json", model_name, user_dir)
    if found is None or not isinstance(found[1], dict) or "layers" not in found[1]:
        return None
    return sorted(int(l) for l in found[1]["layers"])


def write_critical_layers(model_name: str, layers: list[int], source: str, path: str | Path | None = None,
                          **extra: object) -> Path:
    """Store R for ``model_name`` in the user's preset directory (``path``: another directory), other
    models' entries kept; ``source`` gets today's date appended; ``extra`` fields (e.g. the
    confidence band) are stored beside it. Returns the file written."""
    entry: dict[str, object] = {"layers": sorted(int(l) for l in layers), "source": source, **extra}
    return write_entry("critical_layers.json", model_name, entry, path)


def critical_layers(
    plain: "AverageTrace | Float[torch.Tensor, ' n_layers']",
    mlp_severed: Float[torch.Tensor, " n_layers"] | None = None,
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


def strongest_mlp_layer(trace: "AverageTrace | pd.DataFrame") -> int:
    """ROME's edited layer: the layer l whose MLP restoration at the subject's last token has the largest
    mean indirect effect (ROME section 2 and Fig. 1; GPT-J's is 5, GPT2-XL's 17).

    The effect is the averaged MLP trace (a window of MLP outputs centred on l restored in the
    corrupted run, DESIGN section 2) of the token class "last subject token"; the earliest layer wins
    ties.

    Args:
        trace: an :class:`AverageTrace` with the ``"mlp"`` kind, or its
            :meth:`~pmet_lens.analysis.averaged.AverageTrace.class_frame` (e.g. read back from
            ``causal_trace_classes.csv``: columns ``kind``, ``token_class``, ``layer``, ``mean``).

    Raises:
        ValueError: no MLP trace of the last subject token in ``trace``.
    """
    import pandas as pd

    from pmet_lens.analysis.averaged import AverageTrace

    frame = trace.class_frame() if isinstance(trace, AverageTrace) else pd.DataFrame(trace)
    missing = {"kind", "token_class", "layer", "mean"} - set(frame.columns)
    if missing:
        raise ValueError(f"the trace table lacks the column(s) {sorted(missing)} (expected AverageTrace.class_frame())")
    rows = frame[(frame["kind"] == "mlp") & (frame["token_class"] == "last subject token")].sort_values("layer")
    if rows.empty:
        raise ValueError("no MLP trace of the last subject token: trace with kind 'mlp' (average_traces(kinds=...))")
    effect = torch.tensor(rows["mean"].to_numpy(dtype="float64"))
    return int(rows["layer"].iloc[int(torch.argmax(effect))])  # first maximum
