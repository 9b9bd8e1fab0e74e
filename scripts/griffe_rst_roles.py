"""griffe extension (mkdocs.yml): docstrings' Sphinx roles become checked cross-references.

The docstrings name other objects as ``:func:`name```, ``:class:`name```, ``:meth:`Class.name```,
``:mod:`.module``` and so on. Each becomes the autorefs link ``[`name`][name]``, which mkdocstrings
resolves relative to the documented object (``scoped_crossrefs`` / ``relative_crossrefs``), so a role
that names nothing fails ``mkdocs build --strict``. ``~a.b.c`` shows as ``c``, as in Sphinx.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj):`(~?)([^`<>]+?)`")


def _link(match: re.Match[str]) -> str:
    short, target = match.group(1), match.group(2).strip()
    text = target.rsplit(".", 1)[-1] if short else target
    return f"[`{text}`][{target}]"


class SphinxRolesToCrossrefs(griffe.Extension):
    """Rewrites Sphinx roles in every docstring into mkdocstrings cross-references."""

    def on_object(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = _ROLE.sub(_link, obj.docstring.value)
