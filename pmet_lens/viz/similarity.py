"""Figures for PMET Fig. 2 (MHSA vs FFN similarity): interactive plotly and a static PNG."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from pmet_lens.viz.png import png_figure, save_png

COLORS = {"mhsa": "#1f77b4", "ffn": "#d62728"}
LABELS = {"mhsa": "MHSA", "ffn": "FFN"}
METRIC_TITLES = {"cosine": "cosine similarity", "jaccard": "Jaccard similarity (top-k)"}
VARIANT_TITLES = {"paper": "paper variant (official code: normalised input, W_E projection)",
                  "logit_lens": "logit-lens variant (paper text: residual stream, ln_final + W_U)"}


def _rgba(hex_color: str, alpha: float) -> str:
    r, g, b = (int(hex_color[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def similarity_figure(df: pd.DataFrame, title: str | None = None) -> go.Figure:
    """PMET Fig. 2 as plotly: columns = (cosine, Jaccard), one row per variant, MHSA vs FFN
    per layer with the 95% confidence band. Hover shows layer, mean and interval."""
    variants = [v for v in ("paper", "logit_lens") if v in set(df["variant"])]
    if not variants:
        raise ValueError("the DataFrame holds no known variant; expected the output of component_similarity")
    fig = make_subplots(rows=len(variants), cols=2, shared_xaxes=True, vertical_spacing=0.12, horizontal_spacing=0.08,
                        subplot_titles=[f"{METRIC_TITLES[m]}: {v}" for v in variants for m in ("cosine", "jaccard")])
    for r, variant in enumerate(variants, start=1):
        for c, metric in enumerate(("cosine", "jaccard"), start=1):
            for component in ("mhsa", "ffn"):
                d = df[(df.variant == variant) & (df.metric == metric) & (df.component == component)].sort_values("layer")
                if d.empty:
                    continue
                color, group = COLORS[component], f"{component}"
                fig.add_trace(go.Scatter(x=list(d.layer) + list(d.layer[::-1]), y=list(d.ci_high) + list(d.ci_low[::-1]),
                                         fill="toself", fillcolor=_rgba(color, 0.2), line=dict(width=0), hoverinfo="skip",
                                         showlegend=False, legendgroup=group), row=r, col=c)
                fig.add_trace(go.Scatter(
                    x=d.layer, y=d["mean"], mode="lines+markers", line=dict(color=color), marker=dict(size=4),
                    name=LABELS[component], legendgroup=group, showlegend=(r == 1 and c == 1),
                    customdata=d[["ci_low", "ci_high", "n"]].to_numpy(),
                    hovertemplate=(f"{LABELS[component]} layer %{{x}}<br>{metric} %{{y:.3f}}"
                                   "<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<br>n = %{customdata[2]}<extra></extra>")),
                    row=r, col=c)
            fig.update_xaxes(title_text="layer" if r == len(variants) else None, row=r, col=c)
    n = int(df["n"].max())
    fig.update_layout(title=title or f"Similarity of the last token's state before and after MHSA / FFN (n = {n} prompts)",
                      height=380 * len(variants) + 80, width=1100, template="plotly_white", hovermode="closest")
    return fig


def similarity_png(df: pd.DataFrame, path: str | Path, title: str | None = None) -> Path:
    """Static PNG of the same figure (matplotlib), for the README."""
    variants = [v for v in ("paper", "logit_lens") if v in set(df["variant"])]
    fig, axes = png_figure(len(variants), 2, figsize=(12, 3.6 * len(variants)), squeeze=False, sharex=True)
    for r, variant in enumerate(variants):
        for c, metric in enumerate(("cosine", "jaccard")):
            ax = axes[r][c]
            for component in ("mhsa", "ffn"):
                d = df[(df.variant == variant) & (df.metric == metric) & (df.component == component)].sort_values("layer")
                ax.plot(d.layer, d["mean"], marker="o", ms=3, color=COLORS[component], label=LABELS[component])
                ax.fill_between(d.layer, d.ci_low, d.ci_high, color=COLORS[component], alpha=0.2, lw=0)
            ax.set_title(f"{METRIC_TITLES[metric]}: {variant}", fontsize=10)
            ax.grid(alpha=0.3)
            if r == len(variants) - 1:
                ax.set_xlabel("layer")
            if r == 0 and c == 0:
                ax.legend()
    n = int(df["n"].max())
    fig.suptitle(title or f"Last-token state before vs after MHSA / FFN (mean, 95% CI, n = {n})")
    return save_png(fig, path, dpi=110)
