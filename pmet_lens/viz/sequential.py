"""Figures of sequential editing: per-batch curves and the survival of one batch's edits.

Inputs are the tables of :mod:`pmet_lens.evaluation.sequential`: ``curves`` (one row per method
and batch: ``method, batch, efficacy_batch, efficacy_first, perplexity, delta_norm, ...``) and
``efficacy`` (one row per request and evaluation point: ``method, after, batch, success, ...``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from pmet_lens.viz.png import png_figure, save_png

__all__ = ["CURVE_PANELS", "curves_figure", "curves_png", "survival_figure"]

CURVE_PANELS: tuple[tuple[str, str], ...] = (
    ("efficacy_batch", "Efficacy of the batch just edited"),
    ("efficacy_first", "Efficacy of batch 1"),
    ("perplexity", "WikiText-2 perplexity"),
    ("delta_norm", "‖ΔW‖ of the batch (mean over layers)"),
    ("weight_change_norm", "‖ΣΔW‖ so far (mean over layers)"),
    ("weight_norm", "‖W + ΣΔW‖ (mean over layers)"),
)


def _methods(curves: pd.DataFrame) -> list[str]:
    return list(dict.fromkeys(curves["method"])) if "method" in curves else ["session"]


def curves_figure(curves: pd.DataFrame, title: str = "Sequential editing") -> go.Figure:
    """Plotly subplots, one per ``CURVE_PANELS`` column present, one line per method."""
    panels = [(c, t) for c, t in CURVE_PANELS if c in curves]
    fig = make_subplots(rows=(len(panels) + 1) // 2, cols=2, subplot_titles=[t for _, t in panels])
    for m_i, method in enumerate(_methods(curves)):
        part = curves[curves["method"] == method] if "method" in curves else curves
        for i, (col, _) in enumerate(panels):
            fig.add_trace(go.Scatter(x=part["batch"], y=part[col], mode="lines+markers", name=method,
                                     legendgroup=method, showlegend=i == 0,
                                     line={"color": _COLORS[m_i % len(_COLORS)]}),
                          row=i // 2 + 1, col=i % 2 + 1)
    fig.update_xaxes(title_text="batches edited")
    fig.update_layout(title=title, height=300 * ((len(panels) + 1) // 2), template="plotly_white")
    return fig


def curves_png(curves: pd.DataFrame, path: str | Path, title: str = "Sequential editing") -> Path:
    """The same panels as :func:`curves_figure` as a static PNG."""
    panels = [(c, t) for c, t in CURVE_PANELS if c in curves]
    rows = (len(panels) + 1) // 2
    fig, axes = png_figure(rows, 2, figsize=(10, 3 * rows), squeeze=False)
    for m_i, method in enumerate(_methods(curves)):
        part = curves[curves["method"] == method] if "method" in curves else curves
        for i, (col, label) in enumerate(panels):
            ax = axes[i // 2][i % 2]
            ax.plot(part["batch"], part[col], marker="o", label=method, color=_COLORS[m_i % len(_COLORS)])
            ax.set_title(label, fontsize=9)
            ax.set_xlabel("batches edited", fontsize=8)
    for j in range(len(panels), rows * 2):
        axes[j // 2][j % 2].axis("off")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(title)
    return save_png(fig, path)


def survival_figure(efficacy: pd.DataFrame, batch: int = 1, title: str | None = None) -> go.Figure:
    """Efficacy of batch ``batch``'s edits after each batch written since (one line per method):
    does batch 1 survive batch 8?"""
    part = efficacy[efficacy["batch"] == batch]
    fig = go.Figure()
    for m_i, method in enumerate(_methods(part)):
        rows = part[part["method"] == method] if "method" in part else part
        mean = rows.groupby("after")["success"].mean()
        fig.add_trace(go.Scatter(x=mean.index, y=mean.values, mode="lines+markers", name=method,
                                 line={"color": _COLORS[m_i % len(_COLORS)]}))
    fig.update_layout(title=title or f"Efficacy of batch {batch}'s edits after later batches",
                      xaxis_title="batches edited", yaxis_title="efficacy success", yaxis_range=[0, 1.05],
                      template="plotly_white")
    return fig


_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b")
