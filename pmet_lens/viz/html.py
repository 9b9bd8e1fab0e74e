"""Every HTML page pmet-lens writes (figures, reports, dashboards), with one policy for plotly.js.

A page never loads plotly.js from the network: pmet-lens runs offline, and a page that fetches
plotly.js from a CDN is blank on a machine without internet. Where the library comes from is the
``plotlyjs`` argument of :func:`write_page`:

* ``"directory"`` (the default, for pages in a folder of figures): the page loads
  ``plotly.min.js`` from its own folder (a relative ``<script src>``), and :func:`write_page` writes
  that one file beside it (again when it is not the installed plotly's). A folder of pages holds one
  copy of plotly.js (about 4.8 MB) whatever the number of pages; copy or move the folder as a whole.
* ``"inline"``: plotly.js is inside the page, which then works alone anywhere, offline (a
  dashboard mailed to a colleague). Dashboards (:mod:`pmet_lens.viz.dashboard`) default to it.

A page is a title and a sequence of parts: plotly figures and HTML fragments (headings, tables,
circuitsvis renderings), in order. A page that is a single figure fills the browser window, as
plotly's own full pages do; other pages stack their parts at the figures' own heights.
"""

from __future__ import annotations

import html
import logging
from pathlib import Path
from typing import Any, Literal, Sequence, Union

__all__ = ["PLOTLYJS_FILE", "PlotlyJS", "page_html", "write_figure", "write_page"]

logger = logging.getLogger(__name__)

PlotlyJS = Literal["directory", "inline"]
"""Where a page gets plotly.js from: ``"directory"`` (``plotly.min.js`` beside the page) or
``"inline"`` (inside the page)."""

PLOTLYJS_FILE = "plotly.min.js"
"""Name of the plotly.js bundle a ``"directory"`` page loads from its folder."""

Part = Union[str, Any]
"""A part of a page: a plotly figure, or an HTML fragment (inserted as it is)."""

_PLOTLY_CONFIG = "<script type=\"text/javascript\">window.PlotlyConfig = {MathJaxConfig: 'local'};</script>"


def _check(plotlyjs: str) -> None:
    if plotlyjs not in ("directory", "inline"):
        raise ValueError(f"plotlyjs must be 'directory' (plotly.min.js beside the page) or 'inline' (inside it), "
                         f"got {plotlyjs!r}")


def _is_figure(part: Part) -> bool:
    return hasattr(part, "to_plotly_json") and hasattr(part, "to_html")


def page_html(parts: Sequence[Part], *, title: str = "", plotlyjs: PlotlyJS = "directory") -> str:
    """The HTML of a page of ``parts`` (figures and HTML fragments, in order) under ``title``.

    With ``plotlyjs="directory"`` the page expects ``plotly.min.js`` in its folder
    (:func:`write_page` puts it there); with ``"inline"`` it carries plotly.js itself.
    """
    from plotly.offline import get_plotlyjs

    _check(plotlyjs)
    if isinstance(parts, str) or _is_figure(parts):
        raise TypeError("parts must be a sequence of figures and HTML fragments; wrap a single figure in a list")
    figures = [p for p in parts if _is_figure(p)]
    head = ["<meta charset=\"utf-8\" />", f"<title>{html.escape(title)}</title>"]
    if len(parts) == 1 and figures:
        head.append("<style>html, body {height: 100%;}</style>")  # the figure fills the window, as in plotly's pages
    if figures:
        head.append(_PLOTLY_CONFIG)
        if plotlyjs == "directory":
            head.append(f"<script charset=\"utf-8\" src=\"{PLOTLYJS_FILE}\"></script>")
        else:
            head.append(f"<script type=\"text/javascript\">{get_plotlyjs()}</script>")
    body = []
    for part in parts:
        if _is_figure(part):
            fig: Any = part
            body.append(fig.to_html(full_html=False, include_plotlyjs=False))
        elif isinstance(part, str):
            body.append(part)
        else:
            raise TypeError(f"a page part must be a plotly figure or an HTML string, got {type(part).__name__}")
    return ("<!doctype html>\n<html>\n<head>\n" + "\n".join(head) + "\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")


def write_page(
    path: str | Path, parts: Sequence[Part], *, title: str = "", plotlyjs: PlotlyJS = "directory"
) -> Path:
    """Write the page of ``parts`` (:func:`page_html`) to ``path`` (parent folders made) and return it.

    With ``plotlyjs="directory"``, ``plotly.min.js`` is written beside the page unless the one there
    already is the installed plotly's, so every page of the folder shares one copy.
    """
    from plotly.offline import get_plotlyjs

    _check(plotlyjs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = page_html(parts, title=title, plotlyjs=plotlyjs)
    if plotlyjs == "directory" and "plotly-graph-div" in text:
        bundle = path.parent / PLOTLYJS_FILE
        js = get_plotlyjs()
        if not bundle.is_file() or bundle.read_text(encoding="utf-8") != js:
            bundle.write_text(js, encoding="utf-8")
            logger.info("wrote %s (plotly.js for the pages of %s)", bundle, path.parent)
    path.write_text(text, encoding="utf-8")
    return path


def write_figure(fig: Any, path: str | Path, *, title: str | None = None, plotlyjs: PlotlyJS = "directory") -> Path:
    """Write one plotly figure as a page filling the window (:func:`write_page`); the page's title is
    ``title``, else the figure's own."""
    if title is None:
        layout_title = fig.layout.title.text if fig.layout.title is not None else None
        title = str(layout_title) if layout_title else Path(path).stem
    return write_page(path, [fig], title=title, plotlyjs=plotlyjs)
