"""Open pmet-lens's HTML pages in headless Chromium with no network, as a user on an offline machine would.

``render(page)`` loads a page (``file://``) and returns the DOM after the page's scripts ran
(``--dump-dom``), the page's errors (uncaught exceptions, files that failed to load, ``console.error``;
recorded by a small hook added to a copy of the page) and its console (``--enable-logging=stderr``).
Plotly draws each figure as ``<svg class="main-svg">`` elements inside its ``plotly-graph-div``, so a
page whose plotly.js did not load has the divs and no ``main-svg``, and an error ``Plotly is not
defined``. ``screenshot(page, png)`` takes a picture of it (``--screenshot``).

The network is off in two ways at once: every connection, to this machine's loopback too, goes to a
proxy that does not exist (``--proxy-server=127.0.0.1:9``, ``--proxy-bypass-list=<-loopback>``) and no
host name resolves (``--host-resolver-rules``); where the
system allows it, Chromium also runs in a network namespace of its own with no interface but a down
loopback (``unshare -n``). Each call starts a fresh Chromium with an empty profile.

Debian's ``chromium`` package provides the browser (``apt-get install -y chromium``; ``.ci/run``
installs it for CI).

    python3 scripts/browser.py check figures/*.html figures/*/*.html
    python3 scripts/browser.py screenshot figures/component_similarity.html figures/component_similarity_html.png
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
"""Executables tried in turn (``$PMET_LENS_CHROMIUM`` first when set)."""

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--hide-scrollbars", "--mute-audio",
)
"""Flags of every Chromium run (headless, no first-run or background traffic)."""

OFFLINE_FLAGS = ("--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>", "--host-resolver-rules=MAP * ~NOTFOUND")
"""No network: every connection, loopback included, goes to a proxy nobody listens on; no host name resolves."""

_GRAPH_DIV = re.compile(r"<div\b[^>]*\bclass=\"[^\"]*\bplotly-graph-div\b")
_MAIN_SVG = re.compile(r"<svg\b[^>]*\bclass=\"[^\"]*\bmain-svg\b")
_CONSOLE = re.compile(r":CONSOLE[:(]\d+\)?\] (?P<message>\"(?:.*)\"), source: (?P<source>\S*)")


def find_chromium() -> str | None:
    """The Chromium executable, or ``None`` when none is installed."""
    for name in (os.environ.get("PMET_LENS_CHROMIUM"), *BROWSERS):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


@lru_cache(maxsize=1)
def network_namespace() -> bool:
    """Whether ``unshare -n`` can start a process without network here (root or user namespaces)."""
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "-n", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _run(args: list[str], timeout: float, offline: bool = True) -> subprocess.CompletedProcess[str]:
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("Chromium is not installed (Debian: apt-get install -y chromium)")
    with tempfile.TemporaryDirectory(prefix="pmet_lens_chromium_") as profile:
        cmd = [chromium, *FLAGS, *(OFFLINE_FLAGS if offline else ()), f"--user-data-dir={profile}", *args]
        if offline and network_namespace():
            cmd = ["unshare", "-n", *cmd]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


ERROR_HOOK = """<script>(function () {
  var errors = [], root = document.documentElement;
  function keep(message) { errors.push(String(message)); root.setAttribute("data-page-errors", JSON.stringify(errors)); }
  root.setAttribute("data-page-errors", "[]");
  window.addEventListener("error", function (e) {
    var t = e.target;
    keep(t && t !== window && (t.src || t.href) ? "failed to load " + (t.src || t.href) : (e.message || "error"));
  }, true);
  window.addEventListener("unhandledrejection", function (e) {
    keep("unhandled rejection: " + (e.reason && e.reason.message ? e.reason.message : e.reason));
  });
  var error = console.error;
  console.error = function () {
    keep("console.error: " + Array.prototype.join.call(arguments, " "));
    return error.apply(console, arguments);
  };
})();</script>"""
"""Put first in the page's ``<head>``: records uncaught exceptions, resources that fail to load,
unhandled promise rejections and ``console.error`` calls in the ``data-page-errors`` attribute of
``<html>`` (a JSON list), which ``--dump-dom`` then shows. (Chromium's log gives console messages
without their level, so warnings could not be told from errors there.)"""

_ERRORS_ATTR = re.compile(r"<html\b[^>]*\bdata-page-errors=\"([^\"]*)\"")
_LOCAL_SRC = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["']([^"':]+)["']""", re.I)


@dataclass(frozen=True)
class Render:
    """What Chromium made of a page.

    Attributes:
        page: the page.
        dom: the DOM after its scripts ran (serialised HTML).
        errors: uncaught exceptions, resources that failed to load, unhandled rejections and
            ``console.error`` calls of the page (:data:`ERROR_HOOK`), in order.
        console: every message the page logged to its console, whatever its level (``"message"
            (source)``; Chromium's own pages, ``chrome://``, left out).
        figures: per ``plotly-graph-div`` of the DOM, in order, the ``main-svg`` elements plotly drew in it.
    """

    page: Path
    dom: str
    errors: list[str]
    console: list[str]
    figures: list[int]

    @property
    def drawn(self) -> bool:
        """Every figure of the page has at least one ``main-svg``."""
        return all(n > 0 for n in self.figures)


def figures_in(dom: str) -> list[int]:
    """Per ``plotly-graph-div`` of ``dom``, in order, the number of ``main-svg`` elements in it (the text
    from one graph div to the next holds only the first one's drawing)."""
    starts = [m.start() for m in _GRAPH_DIV.finditer(dom)]
    ends = starts[1:] + [len(dom)]
    return [len(_MAIN_SVG.findall(dom, s, e)) for s, e in zip(starts, ends)]


def _instrumented_copy(page: Path, folder: Path) -> Path:
    """``page`` with :data:`ERROR_HOOK` as its first script, written in ``folder`` beside copies of the
    local files it loads (``plotly.min.js`` for a page of a folder of figures), so it loads what it
    loads where it is."""
    text = page.read_text(encoding="utf-8")
    for ref in dict.fromkeys(_LOCAL_SRC.findall(text)):
        source = page.parent / ref
        if source.is_file():
            (folder / ref).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, folder / ref)
    head = re.search(r"<head\b[^>]*>", text, re.I)
    text = text[:head.end()] + ERROR_HOOK + text[head.end():] if head else ERROR_HOOK + text
    copy = folder / page.name
    copy.write_text(text, encoding="utf-8")
    return copy


def render(page: str | Path, *, timeout: float = 120, budget_ms: int = 10000, offline: bool = True) -> Render:
    """Open ``page`` in a fresh headless Chromium with no network; return its DOM, errors, console and figures.

    The page opened is a copy of ``page`` with :data:`ERROR_HOOK` added, in a temporary folder beside
    copies of the local files it loads. ``budget_ms`` of virtual time lets timers and promises run
    before the DOM is taken (virtual time runs as fast as the page lets it, so a drawn page returns at once).
    ``offline=False`` leaves the network as the machine has it (for the controls that show the difference).
    """
    page = Path(page).resolve()
    if not page.is_file():
        raise FileNotFoundError(f"no page at {page}")
    with tempfile.TemporaryDirectory(prefix="pmet_lens_page_") as folder:
        copy = _instrumented_copy(page, Path(folder))
        proc = _run(["--enable-logging=stderr", "--v=0", f"--virtual-time-budget={budget_ms}", "--dump-dom",
                     copy.as_uri()], timeout, offline)
    if proc.returncode != 0 or "<html" not in proc.stdout:
        raise RuntimeError(f"Chromium failed on {page} (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    hooked = _ERRORS_ATTR.search(proc.stdout)
    if hooked is None:
        raise RuntimeError(f"the error hook did not run in {page}; its DOM begins {proc.stdout[:300]!r}")
    console = [f"{m['message']} ({m['source']})" for m in _CONSOLE.finditer(proc.stderr)
               if not m["source"].startswith(("chrome://", "devtools://"))]
    return Render(page=page, dom=proc.stdout, errors=json.loads(html.unescape(hooked.group(1))), console=console,
                  figures=figures_in(proc.stdout))


def screenshot(page: str | Path, png: str | Path, *, width: int = 1200, height: int = 900, timeout: float = 120,
               budget_ms: int = 10000) -> Path:
    """A ``width`` x ``height`` PNG of ``page`` as headless Chromium draws it with no network."""
    page, png = Path(page).resolve(), Path(png).resolve()
    png.parent.mkdir(parents=True, exist_ok=True)
    proc = _run([f"--window-size={width},{height}", f"--virtual-time-budget={budget_ms}", f"--screenshot={png}",
                 page.as_uri()], timeout)
    if proc.returncode != 0 or not png.is_file():
        raise RuntimeError(f"Chromium made no screenshot of {page} (exit status {proc.returncode}):\n{proc.stderr[-3000:]}")
    return png


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="render pages; fail when a figure is not drawn or a page has an error")
    check.add_argument("pages", nargs="+", type=Path)
    shot = sub.add_parser("screenshot", help="a PNG of a page")
    shot.add_argument("page", type=Path)
    shot.add_argument("png", type=Path)
    shot.add_argument("--size", default="1200,900", help="window WIDTH,HEIGHT in pixels (default 1200,900)")
    args = parser.parse_args(argv)
    if args.command == "screenshot":
        width, height = (int(x) for x in args.size.split(","))
        print(screenshot(args.page, args.png, width=width, height=height))
        return 0
    bad = 0
    for page in args.pages:
        r = render(page)
        ok = bool(r.figures) and r.drawn and not r.errors
        bad += not ok
        print(f"{'ok  ' if ok else 'FAIL'} {page}: {len(r.figures)} figure(s), main-svg per figure {r.figures}"
              + (f"; errors: {r.errors}" if r.errors else "") + f"; {len(r.console)} console message(s)")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
