"""An interactive dashboard of one edit (plotly + circuitsvis), shown in Jupyter and written as an
HTML report (self-contained by default, :mod:`pmet_lens.viz.html`).

For a chosen fact and (optionally) its :class:`pmet_lens.editing.EditResult`:

* **probabilities**: P(o*) and P(o^c) before / after the edit on the edit prompt, the paraphrase
  prompts and the neighborhood prompts (the quantities behind Efficacy, Paraphrase and
  Neighborhood Success, MEMIT Appendix C; multi-token objects by mean token log-probability);
* **logit lens** at the subject's last token (the edit's lookup position): each layer's residual
  stream ``hook_resid_post`` projected through the final norm and unembedding, P of the first token
  of o* and of o^c per layer, before / after;
* **ΔW norms** per edited layer and weight (PMET Appendix A, Fig. 4), absolute and relative to ‖W‖;
* **attention from the last token**: per layer, the attention the last token pays to the subject's
  tokens (mean over heads) before / after, and circuitsvis attention patterns of the layer that
  attends most to the subject. PMET argues MHSA *extracts* rather than stores knowledge, so an FFN
  edit should leave these patterns nearly unchanged downstream of the edit's lookup;
* **session view** (:func:`session_dashboard`, for an :class:`~pmet_lens.editing.session.EditSession` or the
  tables of ``analyses/sequential_benchmark.py``): the per-batch curves (efficacy of the batch just
  edited and of batch 1, perplexity, weight norms) and, for a chosen batch, each of its edits'
  P(o*) − P(o^c) right after it was written and after every later batch;
* **batch view** (``batch=`` a per-record DataFrame of :func:`~pmet_lens.evaluation.counterfact.evaluate_counterfact`, or a
  dict of them by editor): the distributions of the per-record metrics.
"""

from __future__ import annotations

import html
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pandas as pd
import torch
from jaxtyping import Float
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import architecture
from pmet_lens.core.models import require_model
from pmet_lens.core.readout import final_logits
from pmet_lens.core.tokens import encode, subject_range, target_ids
from pmet_lens.data import Fact, as_facts
from pmet_lens.evaluation.scoring import score_continuations
from pmet_lens.viz.html import PlotlyJS, page_html, write_page

logger = logging.getLogger(__name__)

__all__ = ["Dashboard", "dashboard", "logit_lens", "last_token_attention", "session_dashboard"]

BATCH_COLUMNS = ("efficacy_success", "paraphrase_success", "neighborhood_success", "efficacy_magnitude",
                 "paraphrase_magnitude", "neighborhood_magnitude", "fluency", "consistency", "consistency_proxy")


@dataclass
class Dashboard:
    """The dashboard's parts.

    Attributes:
        title: heading of the report.
        figures: name -> plotly figure.
        attention: name -> circuitsvis rendering (``RenderedHTML``).
        tables: name -> DataFrame behind the figures.
    """

    title: str
    figures: dict[str, Any] = field(default_factory=dict)
    attention: dict[str, Any] = field(default_factory=dict)
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)

    def parts(self) -> list[Any]:
        """The page's parts in order: a heading and a figure per figure, then a heading and a circuitsvis
        rendering (its scripts inline) per attention pattern."""
        parts: list[Any] = [f"<h1>{html.escape(self.title)}</h1>"]
        for name, fig in self.figures.items():
            parts += [f"<h2>{html.escape(name)}</h2>", fig]
        for name, rendered in self.attention.items():
            parts += [f"<h2>{html.escape(name)}</h2>", _closed_container(rendered.local_src)]
        return parts

    def to_html(self, plotlyjs: PlotlyJS = "inline") -> str:
        """The report as one HTML page (:func:`pmet_lens.viz.html.page_html`). By default
        self-contained: plotly.js and the circuitsvis bundles inline, no network; ``plotlyjs="directory"``
        loads plotly.js from ``plotly.min.js`` beside the page instead."""
        return page_html(self.parts(), title=self.title, plotlyjs=plotlyjs)

    def write_html(self, path: str | Path, plotlyjs: PlotlyJS = "inline") -> Path:
        """Write the report to ``path`` (:func:`pmet_lens.viz.html.write_page`; ``plotlyjs`` as in
        :meth:`to_html`, ``"directory"`` also writing ``plotly.min.js`` beside it) and return it."""
        return write_page(path, self.parts(), title=self.title, plotlyjs=plotlyjs)

    def show(self) -> None:
        """Display every part in Jupyter (figures, then attention patterns)."""
        from IPython.display import HTML, display

        display(HTML(f"<h3>{html.escape(self.title)}</h3>"))
        for fig in self.figures.values():
            fig.show()
        for name, rendered in self.attention.items():
            display(HTML(f"<h4>{html.escape(name)}</h4>"))
            display(rendered)


def _closed_container(src: str) -> str:
    """circuitsvis's HTML with its container closed: it opens with ``<div id=... />``, which HTML reads as
    an open ``<div>``, so everything after it (the next heading and rendering) would sit inside the first
    rendering's container and be replaced when React draws into it."""
    return re.sub(r"^(\s*<div\b[^>]*?)\s*/>", r"\1></div>", src, count=1)


def logit_lens(
    model: HookedTransformer, text: str, position: int, token_ids: list[int]
) -> Float[torch.Tensor, "n_layers n_tokens"]:
    """P of each of ``token_ids`` read from ``hook_resid_post`` of every layer at ``position``
    (final norm + unembedding applied to the intermediate stream, nostalgebraist's logit lens)."""
    require_model(model, "pmet_lens.viz.dashboard.logit_lens")
    arch = architecture(model)
    names = [arch.resid_post_hook(l) for l in range(arch.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([encode(model, text)], device=model.cfg.device),
                                        names_filter=lambda n: n in names)
        resid = torch.stack([cache[n][0, position] for n in names])  # [n_layers, d]
        probs = final_logits(model, resid).float().softmax(-1)
    return probs[:, token_ids].cpu()


def last_token_attention(model: HookedTransformer, text: str) -> Float[torch.Tensor, "n_layers n_heads query key"]:
    """All attention patterns of ``text`` ([layer, head, query, key])."""
    require_model(model, "pmet_lens.viz.dashboard.last_token_attention")
    arch = architecture(model)
    names = [arch.attn_pattern_hook(l) for l in range(arch.n_layers)]
    with torch.no_grad():
        _, cache = model.run_with_cache(torch.tensor([encode(model, text)], device=model.cfg.device),
                                        names_filter=lambda n: n in names)
    return torch.stack([cache[n][0] for n in names]).float().cpu()


class _EditState:
    """Run code before / after the edit, whatever state ``edit_result`` is in (weights restored after)."""

    def __init__(self, model: HookedTransformer, edit_result: Any | None):
        self.model, self.result = model, edit_result

    def run(self, fn, after: bool):
        res = self.result
        if res is None:
            return fn()
        if res.applied:
            if after:
                return fn()
            res.restore()
            try:
                return fn()
            finally:
                res.apply()
        if not after:
            return fn()
        with self.model.hooks(fwd_hooks=res.as_hooks()):
            return fn()


def dashboard(
    model: HookedTransformer,
    fact: Fact | Mapping[str, Any],
    edit_result: Any | None = None,
    *,
    batch: pd.DataFrame | Mapping[str, pd.DataFrame] | None = None,
    html_path: str | Path | None = None,
    plotlyjs: PlotlyJS = "inline",
    show: bool = False,
) -> Dashboard:
    """Build the dashboard of ``fact`` before / after ``edit_result`` (see the module docstring).

    Args:
        model: the model (unedited, or with ``edit_result`` applied; either works).
        fact: the edited fact (a :class:`Fact` or CounterFact dict) with ``target_new``; its
            ``target_true``, paraphrase and neighborhood prompts are used when present.
        edit_result: the :class:`pmet_lens.editing.EditResult`; ``None`` shows the model alone.
        batch: per-record metrics of a batch (one DataFrame, or ``{editor: DataFrame}``).
        html_path: also write the HTML report here.
        plotlyjs: where the report gets plotly.js from (:mod:`pmet_lens.viz.html`): ``"inline"``, the
            default, makes one self-contained file (to open or mail anywhere, offline);
            ``"directory"`` shares ``plotly.min.js`` beside it with the other pages of its folder.
        show: display in Jupyter.
    """
    require_model(model, "pmet_lens.dashboard")
    import plotly.express as px
    import plotly.graph_objects as go

    fact = as_facts([fact])[0]
    if fact.target_new is None:
        raise ValueError(f"{fact.where}: the dashboard needs target_new")
    state = _EditState(model, edit_result)
    phases = ["before", "after"] if edit_result is not None else ["model"]
    board = Dashboard(title=f"{fact.text} → {fact.target_new}" + (f" (was {fact.target_true})" if fact.target_true else ""))

    # -- probabilities on the evaluation prompts
    groups = [("edit", fact.text)] + [("paraphrase", p) for p in fact.paraphrase_prompts] + \
             [("neighborhood", p) for p in fact.neighborhood_prompts]
    objects = [("o* " + fact.target_new, fact.target_new)] + ([("o^c " + fact.target_true, fact.target_true)] if fact.target_true else [])
    rows = []
    for phase in phases:
        prompts = [p for _, p in groups for _ in objects]
        targets = [o for _ in groups for _, o in objects]
        probs = state.run(lambda: score_continuations(model, prompts, targets).prob, after=phase == "after").numpy()
        k = 0
        for i, (kind, prompt) in enumerate(groups):
            for label, _ in objects:
                rows.append({"phase": phase, "kind": kind, "prompt": f"{kind} {i}: {prompt[:60]}", "object": label, "p": float(probs[k])})
                k += 1
    probs_df = pd.DataFrame(rows)
    board.tables["probabilities"] = probs_df
    fig = px.bar(probs_df, x="prompt", y="p", color="object", barmode="group", facet_row="phase",
                 hover_data=["kind"], title="P(object | prompt) before / after the edit")
    fig.update_layout(height=350 * len(phases), xaxis_tickangle=-40)
    board.figures["Probabilities on edit, paraphrase and neighborhood prompts"] = fig

    # -- logit lens at the subject's last token
    text = fact.text
    start, end = subject_range(model, text, fact.subject)
    lookup = end - 1
    first_ids = [target_ids(model, o)[0] for _, o in objects]
    lens_rows = []
    for phase in phases:
        lens = state.run(lambda: logit_lens(model, text, lookup, first_ids), after=phase == "after")
        for (label, _), col in zip(objects, lens.T):
            for layer, p in enumerate(col.tolist()):
                lens_rows.append({"phase": phase, "object": label, "layer": layer, "p": p})
    lens_df = pd.DataFrame(lens_rows)
    board.tables["logit_lens"] = lens_df
    fig = px.line(lens_df, x="layer", y="p", color="object", line_dash="phase", markers=True,
                  title=f"Logit lens at the subject's last token ({model.to_str_tokens(text)[lookup]!r}): P(first token)")
    board.figures["Logit lens at the subject's last token"] = fig

    # -- ΔW norms
    if edit_result is not None:
        norms = pd.DataFrame(edit_result.delta_norms())
        board.tables["delta_norms"] = norms
        fig = px.bar(norms, x="layer", y="delta_norm", color="weight", barmode="group", hover_data=["relative"],
                     title="‖ΔW‖ (Frobenius) per edited layer")
        board.figures["Per-layer ΔW norms"] = fig

    # -- attention from the last token
    tokens = model.to_str_tokens(text)
    att_rows, patterns = [], {}
    for phase in phases:
        pat = state.run(lambda: last_token_attention(model, text), after=phase == "after")
        patterns[phase] = pat
        to_subject = pat[:, :, -1, start:end].sum(-1).mean(-1)  # [layer]
        for layer, v in enumerate(to_subject.tolist()):
            att_rows.append({"phase": phase, "layer": layer, "attention_to_subject": v})
    att_df = pd.DataFrame(att_rows)
    board.tables["attention_to_subject"] = att_df
    board.figures["Attention from the last token to the subject"] = px.line(
        att_df, x="layer", y="attention_to_subject", color="phase", markers=True,
        title="Attention mass from the last token to the subject tokens (mean over heads)")
    base = patterns[phases[0]]
    top_layer = int(base[:, :, -1, start:end].sum(-1).mean(-1).argmax())
    try:
        import circuitsvis as cv

        for phase in phases:
            board.attention[f"Attention patterns, layer {top_layer} ({phase})"] = cv.attention.attention_patterns(
                tokens=tokens, attention=patterns[phase][top_layer])
    except ImportError:  # pragma: no cover - circuitsvis is a declared dependency
        logger.warning("circuitsvis is not installed; attention patterns are shown as heat maps only")
    for phase in phases:
        fig = go.Figure(go.Heatmap(z=patterns[phase][:, :, -1].mean(1).numpy(), x=[f"{i}:{t}" for i, t in enumerate(tokens)],
                                   colorscale="Blues", colorbar={"title": "attn"}))
        fig.update_layout(title=f"Last-token attention per layer (mean over heads), {phase}", yaxis_title="layer")
        board.figures[f"Last-token attention heat map ({phase})"] = fig

    # -- batch view
    if batch is not None:
        frames = {"batch": batch} if isinstance(batch, pd.DataFrame) else dict(batch)
        long = []
        for editor, df in frames.items():
            for col in BATCH_COLUMNS:
                if col in df:
                    long += [{"editor": editor, "metric": col, "value": v} for v in df[col].dropna().tolist()]
        long_df = pd.DataFrame(long)
        board.tables["batch"] = long_df
        if not long_df.empty:
            fig = px.box(long_df, x="metric", y="value", color="editor", points="outliers",
                         title="Per-record metric distributions")
            board.figures["Batch: metric distributions"] = fig

    if html_path is not None:
        board.write_html(html_path, plotlyjs)
    if show:
        board.show()
    return board


def session_dashboard(
    curves: pd.DataFrame | Any,
    efficacy: pd.DataFrame | None = None,
    *,
    batch: int = 1,
    html_path: str | Path | None = None,
    plotlyjs: PlotlyJS = "inline",
    show: bool = False,
) -> Dashboard:
    """The session view: per-batch curves and the fate of batch ``batch``'s edits.

    Args:
        curves: the per-batch curves table (``method, batch, efficacy_batch, ...``), or an
            :class:`~pmet_lens.editing.session.EditSession` (its
            :meth:`~pmet_lens.editing.session.EditSession.curves`).
        efficacy: per request and evaluation point (:func:`pmet_lens.evaluation.sequential.batch_efficacy`
            rows, with ``method``), for the survival figure and the per-edit table.
        batch: the batch (1-based) whose edits are followed through the later batches.
        html_path: also write the HTML report here.
        plotlyjs: as in :func:`dashboard` (default ``"inline"``: one self-contained file).
        show: display in Jupyter.
    """
    import plotly.graph_objects as go

    from pmet_lens.viz.sequential import curves_figure, survival_figure

    if not isinstance(curves, pd.DataFrame):
        curves = pd.DataFrame(curves.curves()).assign(method=getattr(curves, "method", "session"))
    board = Dashboard(title=f"Sequential editing: {curves['batch'].max() if len(curves) else 0} batches")
    board.tables["curves"] = curves
    board.figures["per-batch curves"] = curves_figure(curves)
    if efficacy is not None and len(efficacy):
        if batch not in set(efficacy["batch"]):
            raise ValueError(f"batch {batch} is not in the efficacy table (batches: {sorted(set(efficacy['batch']))})")
        board.figures[f"batch {batch} after later batches"] = survival_figure(efficacy, batch)
        part = efficacy[efficacy["batch"] == batch].copy()
        part["margin"] = part["p_new"] - part["p_true"].fillna(0.0)
        key = ["method", "case_id"] if "method" in part else ["case_id"]
        table = part.pivot_table(index=key, columns="after", values="margin").reset_index()
        board.tables[f"batch {batch} edits"] = table
        fig = go.Figure()
        for method in dict.fromkeys(part["method"]) if "method" in part else [None]:
            rows = part if method is None else part[part["method"] == method]
            first, last = rows["after"].min(), rows["after"].max()
            a = rows[rows["after"] == first].set_index("case_id")["margin"]
            b = rows[rows["after"] == last].set_index("case_id")["margin"].reindex(a.index)
            fig.add_trace(go.Scatter(x=a.values, y=b.values, mode="markers", name=str(method or "session"),
                                     text=[str(c) for c in a.index]))
        fig.update_layout(title=f"Batch {batch}'s edits: P(o*) − P(o^c) right after (x) and after the last batch (y)",
                          xaxis_title="after its own batch", yaxis_title="after the last batch", template="plotly_white")
        board.figures[f"batch {batch} edits before / after"] = fig
    if html_path is not None:
        board.write_html(html_path, plotlyjs)
    if show:
        board.show()
    return board
