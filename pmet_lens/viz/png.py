"""Figures: interactive plotly (Jupyter, HTML) and static matplotlib PNGs, one module per analysis.

The PNGs are drawn on ``matplotlib.figure.Figure`` objects, not through ``pyplot``: no
backend is switched and no figure is registered, so saving a PNG from a notebook leaves the
user's inline plotting as it was.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

__all__ = ["png_figure", "save_png"]


def png_figure(nrows: int = 1, ncols: int = 1, **subplots: Any) -> tuple[Any, Any]:
    """A pyplot-free matplotlib figure and its axes (``Figure.subplots(nrows, ncols, **subplots)``;
    ``figsize`` goes to the figure)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=subplots.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **subplots)


def save_png(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Lay out ``fig`` and write it to ``path`` (parent folders made), returning the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    return path
