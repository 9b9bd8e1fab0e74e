"""Figure of a calibration: the last subject token's curves and the bootstrap band on R.

It takes the calibration's tables (:meth:`pmet_lens.calibration.CalibrationResult.curves` and
``wins``, or the ``calibrate_curves.csv`` / ``calibrate_wins.csv`` that ``pmet-lens calibrate --out``
writes), so it depends on nothing above :mod:`pmet_lens.viz`.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots

__all__ = ["calibration_figure"]


def calibration_figure(curves: pd.DataFrame, wins: pd.DataFrame, layers: Sequence[int], *, n_facts: int,
                       model_name: str) -> go.Figure:
    """Left: mean indirect effect of restoring the last subject token's hidden state per layer,
    plain and MLP-severed (MEMIT Fig. 3), and their gap with its 95% band, R shaded. Right: the
    share of bootstrap resamples each candidate run of layers wins.

    Args:
        curves: per layer ``layer, plain, mlp_severed, gap, gap_ci95``.
        wins: per candidate run ``layers`` (a list of layers), ``share``, ``is_R``.
        layers: R.
        n_facts: the number of facts the curves average.
        model_name: the calibrated model's name, for the title.
    """
    r = list(layers)
    if not r:
        raise ValueError("layers (R) must not be empty")
    fig = make_subplots(rows=1, cols=2, column_widths=[0.65, 0.35],
                        subplot_titles=(f"last subject token ({n_facts} facts)", "bootstrap wins"))
    for col, colour, label in (("plain", "rebeccapurple", "plain"), ("mlp_severed", "green", "MLP severed")):
        fig.add_trace(go.Scatter(x=curves["layer"], y=curves[col], name=label, line={"color": colour}), row=1, col=1)
    fig.add_trace(go.Scatter(x=curves["layer"], y=curves["gap"], name="gap (plain - severed)",
                             line={"color": "black", "dash": "dot"},
                             error_y={"type": "data", "array": curves["gap_ci95"], "visible": True}), row=1, col=1)
    fig.add_vrect(x0=min(r) - 0.5, x1=max(r) + 0.5, fillcolor="grey", opacity=0.15, row=1, col=1,
                  annotation_text=f"R = {min(r)}..{max(r)}")
    labels = [f"{min(x)}..{max(x)}" for x in wins["layers"]]
    fig.add_trace(go.Bar(x=labels, y=wins["share"], name="share of resamples",
                         marker_color=["grey" if not is_r else "black" for is_r in wins["is_R"]]), row=1, col=2)
    fig.update_xaxes(title_text="layer", row=1, col=1)
    fig.update_xaxes(title_text="run of layers", row=1, col=2)
    fig.update_yaxes(title_text="average indirect effect", row=1, col=1)
    fig.update_yaxes(title_text="share", range=[0, 1], row=1, col=2)
    fig.update_layout(title=f"Calibration of {model_name}: R = {r}")
    return fig
