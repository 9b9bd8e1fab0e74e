"""mkdocs hooks (mkdocs.yml): fail the strict build on a relative link that points at no file.

mkdocs checks links only inside docs/; the documents also link the repository's figures/, scripts and
the README, so every relative link and image of every page (and of README.md and CHANGELOG.md, which
are not pages) is resolved against the checkout here, and a missing target is a warning, which
``mkdocs build --strict`` turns into a failed build.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

log = logging.getLogger("mkdocs.hooks.links")

ROOT = Path(__file__).resolve().parent.parent
EXTRA = ("README.md", "CHANGELOG.md")           # checked as well, though not pages of the site

_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")   # [text](target) / ![alt](target)
_FENCE = re.compile(r"^(```|~~~).*?^\1", re.M | re.S)
_CODE = re.compile(r"`[^`\n]*`")


def broken_links(markdown: str, page: Path) -> list[str]:
    """The relative link targets in ``markdown`` (a file at ``page``) that name no existing file or folder."""
    text = _CODE.sub("", _FENCE.sub("", markdown))
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I) or target.startswith("#"):
            continue                             # http:, mailto:, ... and anchors on the same page
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path and not (page.parent / path).exists():
            broken.append(target)
    return broken


def _report(markdown: str, page: Path) -> None:
    for target in broken_links(markdown, page):
        log.warning("%s: link to %r, which does not exist", page.relative_to(ROOT), target)


def on_pre_build(config: Any) -> None:
    for name in EXTRA:
        path = ROOT / name
        if path.exists():
            _report(path.read_text(encoding="utf-8"), path)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    _report(markdown, Path(page.file.abs_src_path))
    return markdown
