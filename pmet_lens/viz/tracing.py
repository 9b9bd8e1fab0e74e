"""Causal-tracing figures (ROME Fig. 1/2, MEMIT Fig. 3 and 8): interactive plotly heat maps and
line plots, and matplotlib PNG versions (plotly's kaleido needs Chrome, unavailable here)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go

from pmet_lens.analysis.averaged import TOKEN_CLASSES, AverageTrace
from pmet_lens.analysis.tracing import TraceResult
from pmet_lens.viz.png import png_figure, save_png

__all__ = ["trace_heatmap", "average_heatmap", "severed_plot", "save_average_png", "save_severed_png", "save_trace_png"]

_SCALES = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_NAMES = {"hidden": "single restored layer", "mlp": "MLP window", "attn": "Attn window"}


def trace_heatmap(result: TraceResult) -> go.Figure:
    """Heat map of one prompt's trace: token x layer, colour = P(target); hover shows the token,
    layer, probability and indirect effect. Subject tokens are marked with ``*``."""
    s0, s1 = result.subject_range
    labels = [f"{i}: {tok!r}{' *' if s0 <= i < s1 else ''}" for i, tok in enumerate(result.tokens)]
    z = result.scores.numpy()
    effect = result.effect.numpy()
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(result.n_layers)), y=labels, colorscale=_SCALES[result.kind], zmin=result.low_score,
        customdata=effect, colorbar={"title": f"P({result.target.strip()})"},
        hovertemplate="token %{y}<br>layer %{x}<br>P=%{z:.4f}<br>effect=%{customdata:.4f}<extra></extra>",
    ))
    what = _NAMES[result.kind] + (f" ({result.sever} severed)" if result.sever else "")
    fig.update_layout(
        title=f"Causal trace, {what}: P({result.target.strip()!r}) clean {result.high_score:.3f}, corrupted {result.low_score:.3f}",
        xaxis_title="layer" + (f" (centre of {result.window}-layer window)" if result.kind != "hidden" else ""),
        yaxis={"autorange": "reversed"}, height=150 + 28 * len(labels),
    )
    return fig


def average_heatmap(avg: AverageTrace, kind: str) -> go.Figure:
    """Token class x layer heat map of the mean indirect effect (ROME Fig. 2); hover adds the CI and count."""
    z = avg.mean[kind].numpy()
    ci = avg.ci[kind].numpy()
    count = np.repeat(avg.count[kind].numpy()[:, None], z.shape[1], axis=1)
    fig = go.Figure(go.Heatmap(
        z=z, x=list(range(z.shape[1])), y=list(TOKEN_CLASSES), colorscale=_SCALES[kind], zmin=0,
        customdata=np.stack([ci, count], axis=-1), colorbar={"title": "AIE"},
        hovertemplate="%{y}<br>layer %{x}<br>effect %{z:.4f} ± %{customdata[0]:.4f}<br>n=%{customdata[1]}<extra></extra>",
    ))
    fig.update_layout(
        title=f"Average indirect effect, {_NAMES[kind]} ({avg.n_facts} known facts, {avg.samples} samples)",
        xaxis_title="layer", yaxis={"autorange": "reversed"}, height=380,
    )
    return fig


def severed_plot(avg: AverageTrace, critical: list[int] | None = None) -> go.Figure:
    """MEMIT Fig. 3: effect of restoring the last subject token's hidden state per layer, plain
    vs MLP severed vs attention severed, with 95% CI bands; ``critical`` shades R."""
    colours = {"none": "rebeccapurple", "mlp": "green", "attn": "firebrick"}
    names = {"none": "effect of single state", "mlp": "with MLP severed", "attn": "with Attn severed"}
    fig = go.Figure()
    for key, mean in avg.severed_mean.items():
        m, h = mean.numpy(), avg.severed_ci[key].numpy()
        x = list(range(len(m)))
        fig.add_trace(go.Scatter(x=x, y=m, name=names[key], line={"color": colours[key]},
                                 error_y={"type": "data", "array": h, "visible": True},
                                 hovertemplate="layer %{x}<br>effect %{y:.4f}<extra>" + names[key] + "</extra>"))
    if critical:
        fig.add_vrect(x0=min(critical) - 0.5, x1=max(critical) + 0.5, fillcolor="grey", opacity=0.15,
                      annotation_text=f"R = {min(critical)}..{max(critical)}")
    fig.update_layout(title=f"Last subject token, severed paths (MEMIT Fig. 3; {avg.n_facts} facts)",
                      xaxis_title="layer of restored hidden state", yaxis_title="average indirect effect")
    return fig


def save_average_png(avg: AverageTrace, kind: str, path: str | Path) -> Path:
    """PNG of :func:`average_heatmap` (matplotlib)."""
    cmaps = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
    fig, ax = png_figure(figsize=(9, 3))
    im = ax.imshow(avg.mean[kind].numpy(), aspect="auto", cmap=cmaps[kind], vmin=0)
    ax.set_yticks(range(len(TOKEN_CLASSES)), TOKEN_CLASSES)
    ax.set_xlabel("layer")
    ax.set_title(f"Average indirect effect, {_NAMES[kind]} ({avg.n_facts} facts)")
    fig.colorbar(im, ax=ax)
    return save_png(fig, path)


def save_severed_png(avg: AverageTrace, path: str | Path, critical: list[int] | None = None) -> Path:
    """PNG of :func:`severed_plot` (matplotlib)."""
    colours = {"none": "rebeccapurple", "mlp": "green", "attn": "firebrick"}
    names = {"none": "single state", "mlp": "MLP severed", "attn": "Attn severed"}
    fig, ax = png_figure(figsize=(8, 3.5))
    for key, mean in avg.severed_mean.items():
        m, h = mean.numpy(), avg.severed_ci[key].numpy()
        x = np.arange(len(m))
        ax.plot(x, m, color=colours[key], label=names[key])
        ax.fill_between(x, m - h, m + h, color=colours[key], alpha=0.15)
    if critical:
        ax.axvspan(min(critical) - 0.5, max(critical) + 0.5, color="grey", alpha=0.2, label="R")
    ax.set_xlabel("layer of restored hidden state (last subject token)")
    ax.set_ylabel("average indirect effect")
    ax.legend()
    ax.set_title(f"Severed paths (MEMIT Fig. 3), {avg.n_facts} facts")
    return save_png(fig, path)


def save_trace_png(result: TraceResult, path: str | Path) -> Path:
    """PNG of :func:`trace_heatmap` (matplotlib)."""
    fig, ax = png_figure(figsize=(8, 0.5 + 0.3 * len(result.tokens)))
    im = ax.imshow(result.scores.numpy(), aspect="auto", cmap=_SCALES[result.kind], vmin=result.low_score)
    ax.set_yticks(range(len(result.tokens)), [repr(t) for t in result.tokens])
    ax.set_xlabel("layer")
    ax.set_title(f"{_NAMES[result.kind]}: P({result.target.strip()!r})")
    fig.colorbar(im, ax=ax)
    return save_png(fig, path)
