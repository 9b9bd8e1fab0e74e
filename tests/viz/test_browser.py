"""Every HTML page pmet-lens writes renders in a real browser with no network.

Headless Chromium (``scripts/browser.py``: a fresh profile per page, every connection sent to a proxy
nobody listens on, no host name resolving, and its own network namespace where the system allows)
opens each page as a user would (``file://``), and the test checks that plotly drew every figure
(``main-svg`` elements inside each ``plotly-graph-div`` of the DOM after the scripts ran) and that the
page logged nothing to its console. The pages are the committed ones under ``figures/`` and the pages
that the analyses, the CLI and the dashboards write, made here on tiny inputs. Two controls show that
the set-up would catch a blank page: a page that loads plotly.js from the CDN, and a page whose
``plotly.min.js`` is missing, both fail.

Without Chromium (Debian: ``apt-get install -y chromium``) the tests skip, unless
``PMET_LENS_REQUIRE_BROWSER=1`` (set by ``.ci/run``), where they fail.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import plotly.graph_objects as go
import pytest
import torch

from conftest import load_analysis

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "figures"


def _browser_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("pmet_lens_browser", ROOT / "scripts" / "browser.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


browser = _browser_module()


@pytest.fixture(scope="module", autouse=True)
def chromium() -> str:
    found = browser.find_chromium()
    if found is None:
        reason = "Chromium is not installed (Debian: apt-get install -y chromium); the offline rendering checks need it"
        if os.environ.get("PMET_LENS_REQUIRE_BROWSER") == "1":
            pytest.fail(f"PMET_LENS_REQUIRE_BROWSER=1 but {reason}")
        pytest.skip(reason)
    return found


def assert_renders(page: Path, n_figures: int):
    """``page`` draws ``n_figures`` plotly figures, each with at least one main-svg, and has no error."""
    r = browser.render(page)
    assert len(r.figures) == n_figures, f"{page}: {len(r.figures)} plotly divs in the DOM, expected {n_figures}"
    assert r.drawn, f"{page}: figures without a drawing (main-svg per figure {r.figures}); errors: {r.errors}"
    assert r.errors == [], f"{page} had errors: {r.errors}"
    return r


def _copy(names: list[str], src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for name in names:
        (dst / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(src / name, dst / name)
    return dst


# ----------------------------------------------------------------------------- controls
def test_control_a_cdn_page_is_blank_offline(tmp_path):
    """What the set-up is for: plotly's CDN page draws nothing here, and says why in its console."""
    from plotly.offline import get_plotlyjs_version

    from pmet_lens.viz.html import PLOTLYJS_FILE, page_html

    page = tmp_path / "cdn.html"  # the page as plotly writes it for its CDN: plotly.js from cdn.plot.ly
    cdn = f"https://cdn.plot.ly/plotly-{get_plotlyjs_version()}.min.js"
    page.write_text(page_html([go.Figure(go.Scatter(x=[0, 1], y=[1, 2]))]).replace(f'src="{PLOTLYJS_FILE}"', f'src="{cdn}"'))
    r = browser.render(page)
    assert r.figures == [0] and not r.drawn
    assert any("failed to load https://cdn.plot.ly/" in e for e in r.errors), r.errors
    assert any("Plotly is not defined" in e for e in r.errors), r.errors
    assert any("Plotly is not defined" in m for m in r.console), r.console  # Chromium's log says it too


def test_control_a_page_served_on_this_machine_is_out_of_reach(tmp_path):
    """The network really is off, not only the internet: a page whose plotly.js comes from a web server on
    this machine's loopback draws nothing, and the same page draws its figure with the network left on."""
    import threading
    import urllib.request
    from functools import partial
    from http.server import HTTPServer, SimpleHTTPRequestHandler

    from plotly.offline import get_plotlyjs

    from pmet_lens.viz.html import PLOTLYJS_FILE, page_html

    (tmp_path / "served").mkdir()
    (tmp_path / "served" / PLOTLYJS_FILE).write_text(get_plotlyjs(), encoding="utf-8")
    handler = partial(SimpleHTTPRequestHandler, directory=str(tmp_path / "served"))
    server = HTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{PLOTLYJS_FILE}"
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.status == 200  # the server answers
        page = tmp_path / "local.html"
        page.write_text(page_html([go.Figure(go.Scatter(x=[0, 1], y=[1, 2]))]).replace(f'src="{PLOTLYJS_FILE}"', f'src="{url}"'))
        r = browser.render(page)
        online = browser.render(page, offline=False)
    finally:
        server.shutdown()
        server.server_close()
    assert r.figures == [0] and any(f"failed to load {url}" in e for e in r.errors), r.errors
    assert online.drawn and online.figures != [] and online.errors == [], (online.figures, online.errors)


def test_control_a_folder_page_without_its_bundle_is_blank(tmp_path):
    from pmet_lens.viz.html import PLOTLYJS_FILE, write_figure

    page = write_figure(go.Figure(go.Scatter(x=[0, 1], y=[1, 2])), tmp_path / "a.html")
    assert_renders(page, 1)
    (tmp_path / PLOTLYJS_FILE).unlink()
    r = browser.render(page)
    assert r.figures == [0] and any("plotly.min.js" in e for e in r.errors), r.errors


# ----------------------------------------------------------------------------- committed pages
COMMITTED = {"component_similarity.html": 1, "causal_trace_hidden.html": 1, "causal_trace_mlp.html": 1,
             "causal_trace_attn.html": 1, "causal_trace_severed.html": 1, "calibrate.html": 1,
             "edit_benchmark.html": 3, "edit_benchmark_256/edit_benchmark.html": 2,
             "edit_benchmark_fig5_sweep.html": 1, "sequential.html": 3}
"""Plotly figures per committed page, by path under figures/ or else by file name (the 769-case benchmark
page has Figs. 3, 4 and 5; the 256-case run's has no Fig. 5)."""


@pytest.mark.parametrize("page", sorted(str(p.relative_to(FIGURES)) for p in FIGURES.rglob("*.html")))
def test_committed_page_renders_offline(page):
    assert_renders(FIGURES / page, COMMITTED.get(Path(page).as_posix(), COMMITTED.get(Path(page).name)))


# ----------------------------------------------------------------------------- pages written here
@pytest.fixture(scope="module")
def tiny():
    from conftest import TINY_VARIANTS, make_tiny_model

    return make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])


def test_main_job_page(tiny, tmp_path):
    """analyses/component_similarity.py's page (the README's interactive figure), on a tiny model."""
    from pmet_lens import component_similarity, load_known_facts

    script = load_analysis("component_similarity")
    prompts = [f.prompt for f in load_known_facts(limit=3)]
    df = component_similarity(tiny, prompts, k=5, variant="both", progress=False)
    script.write_figures(tmp_path, df, {"model": "tiny", "n_prompts": 3, "k": 5})
    assert_renders(tmp_path / "component_similarity.html", 1)


def test_causal_trace_pages(tmp_path):
    """analyses/causal_trace.py's four pages, drawn by the script from its tables (--replot)."""
    names = ["causal_trace_classes.csv", "causal_trace_severed.csv", "causal_trace_summary.json"]
    out = _copy(names, FIGURES, tmp_path / "traces")
    load_analysis("causal_trace").main(["--replot", "--out", str(out)])
    for kind in ("hidden", "mlp", "attn", "severed"):
        assert_renders(out / f"causal_trace_{kind}.html", 1)


def test_cli_calibrate_page(tmp_path, monkeypatch, capsys):
    """`pmet-lens calibrate PATH --out DIR` on a tiny checkpoint, then `--replot` of the same folder."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from conftest import _tokenizer
    from pmet_lens.cli import main
    from pmet_lens.core.models import default_gguf_path

    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         architectures=["LlamaForCausalLM"])
    checkpoint = tmp_path / "tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(checkpoint)
    _tokenizer(str(default_gguf_path())).save_pretrained(checkpoint)
    out = tmp_path / "calib"
    assert main(["calibrate", str(checkpoint), "--any-facts", "--facts", "3", "--size", "2", "--samples", "2",
                 "--boot", "20", "--methods", "", "--no-write", "--out", str(out)]) == 0
    assert_renders(out / "calibrate.html", 1)
    (out / "calibrate.html").unlink()
    assert main(["calibrate", "--replot", "--out", str(out)]) == 0
    assert_renders(out / "calibrate.html", 1)
    assert "rebuilt" in capsys.readouterr().out


def test_edit_benchmark_page(tmp_path):
    """analyses/edit_benchmark.py's report (tables and Figs. 3-4), written by the script from a run's results."""
    names = ["edit_benchmark_summaries.json", "edit_benchmark_fig4_delta_norms.csv", "edit_benchmark_fig3_scaling.csv",
             "edit_benchmark_zsre_summaries.json"]
    out = _copy(names, FIGURES / "edit_benchmark_256", tmp_path / "bench")
    assert load_analysis("edit_benchmark").main(["--replot", "--out", str(out)]) == 0
    assert_renders(out / "edit_benchmark.html", 2)


def test_sequential_pages(tmp_path):
    """analyses/sequential_benchmark.py's session view (one plotly.js beside it), and the same view as
    session_dashboard writes it by default (one self-contained file)."""
    import pandas as pd

    from pmet_lens.viz.dashboard import session_dashboard

    names = ["sequential_summaries.json", "sessions/memit_cf_curves.json", "sessions/alphaedit_cf_curves.json"]
    out = _copy(names, FIGURES / "sequential", tmp_path / "seq")
    assert load_analysis("sequential_benchmark").main(["--replot", "--out", str(out)]) == 0
    assert_renders(out / "sequential.html", 3)
    curves = pd.read_csv(FIGURES / "sequential" / "sequential_curves.csv")
    eff = pd.read_csv(FIGURES / "sequential" / "sequential_efficacy.csv")
    board = session_dashboard(curves, eff, batch=1, html_path=tmp_path / "mail" / "session.html")
    assert [p.name for p in (tmp_path / "mail").iterdir()] == ["session.html"]
    assert_renders(tmp_path / "mail" / "session.html", len(board.figures))


def test_edit_dashboard_page(tiny, tmp_path):
    """pmet_lens.dashboard's self-contained report of an edit on a tiny model: every plotly figure drawn,
    and the circuitsvis attention patterns rendered (no network either)."""
    from pmet_lens import dashboard, load_counterfact
    from pmet_lens.editing import EditResult

    fact = load_counterfact(limit=1)[0]
    w = tiny.blocks[1].mlp.W_out
    delta = 3 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    result = EditResult(model=tiny, method="pmet", deltas={"blocks.1.mlp.W_out": delta}, targets={}, facts=[fact],
                        hparams={}, model_hash="test")
    board = dashboard(tiny, fact, result, html_path=tmp_path / "board.html")
    assert [p.name for p in tmp_path.iterdir()] == ["board.html"]
    dom = assert_renders(tmp_path / "board.html", len(board.figures)).dom
    drawn = [part.split("<h2>")[0] for part in dom.split('<div id="circuits-vis-')[1:]]
    assert len(drawn) == len(board.attention) == 2
    assert all("<canvas" in part and "Head selector" in part for part in drawn)  # circuitsvis drew its patterns
