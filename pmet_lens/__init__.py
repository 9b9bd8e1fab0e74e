"""pmet-lens: PMET / MEMIT model editing, causal tracing and MHSA-vs-FFN analyses on
TransformerLens hooks.

Public names are imported lazily (PEP 562), so ``import pmet_lens`` stays fast and each
sub-module loads only what it needs.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models and architecture
    "load_model": "pmet_lens.core.models",
    "DEFAULT_MODEL": "pmet_lens.core.models",
    "architecture": "pmet_lens.core.arch",
    "Architecture": "pmet_lens.core.arch",
    # data
    "Fact": "pmet_lens.data",
    "KnownFact": "pmet_lens.data",
    "ZsreRecord": "pmet_lens.data",
    "DataError": "pmet_lens.data",
    "load_known_facts": "pmet_lens.data",
    "load_counterfact": "pmet_lens.data",
    "load_zsre": "pmet_lens.data",
    # PMET Fig. 2
    "component_similarity": "pmet_lens.analysis.similarity",
    # causal tracing
    "trace": "pmet_lens.analysis.tracing",
    "TraceResult": "pmet_lens.analysis.tracing",
    "average_traces": "pmet_lens.analysis.averaged",
    "critical_layers": "pmet_lens.analysis.layers",
    # editing
    "edit": "pmet_lens.editing",
    "EditResult": "pmet_lens.editing",
    "PMETHyperParams": "pmet_lens.editing",
    "MEMITHyperParams": "pmet_lens.editing",
    "AlphaEditHyperParams": "pmet_lens.editing.hparams",
    "MENDHyperParams": "pmet_lens.editing.hparams",
    "EditSession": "pmet_lens.editing.session",
    # transformers checkpoints and GGUF out, saved edits onto transformers models
    "export_hf": "pmet_lens.export",
    "export_gguf": "pmet_lens.export",
    "apply_delta": "pmet_lens.export",
    # calibration: R, λ and the clamp of a model without a preset
    "calibrate": "pmet_lens.calibration",
    "CalibrationResult": "pmet_lens.calibration",
    # evaluation and dashboards
    "evaluate_counterfact": "pmet_lens.evaluation.counterfact",
    "evaluate_zsre": "pmet_lens.evaluation.zsre",
    "dashboard": "pmet_lens.viz.dashboard",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pmet_lens' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
