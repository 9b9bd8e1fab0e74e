"""pmet_lens.viz.html: one policy for plotly.js in every page (no CDN; one bundle per folder, or inline),
and the repository keeps to it. Rendering in a real browser is checked in test_browser.py."""

from __future__ import annotations

import re
from pathlib import Path

import plotly.graph_objects as go
import pytest
from plotly.offline import get_plotlyjs

from pmet_lens.viz.html import PLOTLYJS_FILE, page_html, write_figure, write_page

ROOT = Path(__file__).resolve().parents[2]
EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\bsrc=\"(?:https?:)?//", re.I)
BUNDLE_HEADER = "* plotly" ".js v"  # the bundle's first comment, in two pieces so a grep of the repository finds only bundles


def _fig(y=(1.0, 2.0)) -> go.Figure:
    return go.Figure(go.Scatter(x=[0, 1], y=list(y)), layout={"title": "a figure"})


def test_directory_pages_share_one_bundle_beside_them(tmp_path):
    first = write_figure(_fig(), tmp_path / "figs" / "a.html")
    second = write_page(tmp_path / "figs" / "b.html", ["<h2>two</h2>", _fig(), _fig((3.0, 4.0))], title="b")
    assert sorted(p.name for p in (tmp_path / "figs").iterdir()) == ["a.html", "b.html", PLOTLYJS_FILE]
    assert (tmp_path / "figs" / PLOTLYJS_FILE).read_text(encoding="utf-8") == get_plotlyjs()
    for page in (first, second):
        text = page.read_text(encoding="utf-8")
        assert f'<script charset="utf-8" src="{PLOTLYJS_FILE}"></script>' in text
        assert not EXTERNAL_SCRIPT.search(text) and BUNDLE_HEADER not in text and len(text) < 50_000
    text = second.read_text(encoding="utf-8")
    assert text.count('class="plotly-graph-div"') == 2 and text.index("<h2>two</h2>") < text.index("plotly-graph-div")
    assert "<title>a figure</title>" in first.read_text(encoding="utf-8")  # the figure's title names the page


def test_a_stale_bundle_is_replaced_and_a_current_one_kept(tmp_path):
    bundle = tmp_path / PLOTLYJS_FILE
    bundle.write_text("/* an older plotly bundle */", encoding="utf-8")
    write_figure(_fig(), tmp_path / "a.html")
    assert bundle.read_text(encoding="utf-8") == get_plotlyjs()
    before = bundle.stat().st_mtime_ns
    write_figure(_fig(), tmp_path / "b.html")
    assert bundle.stat().st_mtime_ns == before


def test_inline_page_carries_plotly_and_nothing_beside_it(tmp_path):
    page = write_page(tmp_path / "mail.html", [_fig(), "<p>note</p>"], title="mail me", plotlyjs="inline")
    assert [p.name for p in tmp_path.iterdir()] == ["mail.html"]
    text = page.read_text(encoding="utf-8")
    assert BUNDLE_HEADER in text and not re.search(r"<script[^>]*\bsrc=", text)
    assert not EXTERNAL_SCRIPT.search(text) and text.index("plotly-graph-div") < text.index("<p>note</p>")


def test_a_page_without_figures_needs_no_plotly(tmp_path):
    page = write_page(tmp_path / "t.html", ["<table><tr><td>1</td></tr></table>"], title="t")
    assert [p.name for p in tmp_path.iterdir()] == ["t.html"] and "<script" not in page.read_text(encoding="utf-8")


def test_bad_arguments_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="plotlyjs must be 'directory'.*or 'inline'.*got 'cdn'"):
        write_figure(_fig(), tmp_path / "a.html", plotlyjs="cdn")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="wrap a single figure in a list"):
        write_page(tmp_path / "a.html", _fig())  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="plotly figure or an HTML string, got int"):
        page_html([_fig(), 3])
    assert not (tmp_path / "a.html").exists()


def test_only_viz_html_chooses_where_plotly_comes_from():
    """No script, CLI command, module or test writes a page past the policy: plotly's keyword for where
    plotly.js comes from appears in pmet_lens/viz/html.py only (spelt here in two pieces, so that a grep of
    the repository finds that module alone)."""
    keyword = "include_" "plotlyjs"
    sources = [p for folder in ("pmet_lens", "analyses", "benchmarks", "scripts", "notebooks", "tests")
               for p in (ROOT / folder).rglob("*.py")]
    assert len(sources) > 50
    users = sorted(str(p.relative_to(ROOT)) for p in sources if keyword in p.read_text(encoding="utf-8"))
    assert users == ["pmet_lens/viz/html.py"]


def test_committed_folders_hold_at_most_one_plotly_bundle():
    """Each folder of committed pages loads plotly.js from the one plotly.min.js beside them; no page
    carries its own copy or fetches one from the network."""
    pages = sorted((ROOT / "figures").rglob("*.html"))
    assert len(pages) >= 11
    for folder in sorted({p.parent for p in pages}):
        copies = [p.name for p in folder.iterdir()
                  if p.suffix in (".html", ".js") and BUNDLE_HEADER in p.read_text(encoding="utf-8")]
        assert copies == [PLOTLYJS_FILE], (folder, copies)
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert f'src="{PLOTLYJS_FILE}"' in text and not EXTERNAL_SCRIPT.search(text), page
