"""Default critical layer ranges R found by causal tracing (``presets/critical_layers.json``).

Written by ``analyses/causal_trace.py`` (see :func:`pmet_lens.tracing_summary.critical_layers`);
read by the editors' default hyper-parameters.
"""

from __future__ import annotations

import json
from datetime import date
from importlib import resources
from pathlib import Path

from pmet_lens.atomic import atomic_path

__all__ = ["critical_layers_path", "default_critical_layers", "write_critical_layers"]


def critical_layers_path() -> Path:
    """Path of ``pmet_lens/presets/critical_layers.json``."""
    return Path(str(resources.files("pmet_lens") / "presets" / "critical_layers.json"))


def default_critical_layers(model_name: str) -> list[int] | None:
    """The critical layers R (ascending) stored for ``model_name``, or None when there are none."""
    path = critical_layers_path()
    if not path.is_file():
        return None
    entry = json.loads(path.read_text()).get(model_name)
    if not entry or "layers" not in entry:
        return None
    return sorted(int(l) for l in entry["layers"])


def write_critical_layers(model_name: str, layers: list[int], source: str, path: Path | None = None) -> Path:
    """Store R for ``model_name`` (other models' entries are kept); ``source`` gets today's date appended."""
    path = path or critical_layers_path()
    data = json.loads(path.read_text()) if path.is_file() else {}
    data[model_name] = {"layers": sorted(int(l) for l in layers), "source": f"{source}, {date.today().isoformat()}"}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2) + "\n")
    return path
