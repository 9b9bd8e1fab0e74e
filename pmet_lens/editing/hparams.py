"""Typed hyper-parameters of the PMET and MEMIT editors, and their per-model presets.

PMET and MEMIT are one pipeline (:mod:`pmet_lens.editing.targets`, :mod:`.update`); the two
dataclasses below only choose its settings. Symbols follow DESIGN.md section 3, PMET "PMET
Method" (eqs. 9-11) and Appendix D, and MEMIT section 4 (eqs. 14-16) and Appendix B.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from pmet_lens.analysis.layers import default_critical_layers
from pmet_lens.core.presets import find_entry, merged_table

logger = logging.getLogger(__name__)

__all__ = [
    "EditHyperParams",
    "MEMITHyperParams",
    "PMETHyperParams",
    "PROVISIONAL_SMOLLM2_LAYERS",
    "critical_layers_for",
    "preset",
    "preset_names",
]

PROVISIONAL_SMOLLM2_LAYERS: tuple[int, ...] = (3, 4, 5, 6, 7)
"""Default R of the dataclasses: SmolLM2-135M-Instruct's critical range. It was first a provisional
guess (GPT-J's R = {3..8} of 28 layers scaled to a 5-layer run); causal tracing over 30 known facts
(``analyses/causal_trace.py``, ``figures/causal_trace_summary.json``) then chose the same {3..7}.
:func:`preset` always reads R from ``presets/critical_layers.json``."""


@dataclass(frozen=True)
class EditHyperParams:
    """Settings shared by PMET and MEMIT (validated in ``__post_init__``).

    Attributes:
        layers: the critical layers R (ascending); L = max(R) is where the targets are optimised.
        lam: λ, the covariance weight in Δ = R Kᵀ (λC + KKᵀ)⁻¹ (MEMIT eq. 14, PMET eq. 10;
            official name ``mom2_update_weight``).
        steps: number of optimisation steps of the target vectors (``v_num_grad_steps``).
        lr: Adam learning rate of the target vectors (``v_lr``).
        weight_decay: wd, weight of the norm penalty |δ|/|initial output|² (``v_weight_decay``).
        kl_factor: μ, weight of the KL term on "{s} is a" (PMET eq. 9, ``kl_factor``).
        nll_factor: φ, weight of the NLL term (PMET eq. 9; 1 initially).
        clamp_norm_factor: c, after each step |δ| ≤ c · |initial output| (``clamp_norm_factor``).
        loss_stop: early stop of a fact once its loss is below this (official code: 5e-2).
        cov_tokens: number of corpus tokens (key vectors) used to estimate C = E[k kᵀ]. The
            official ``mom2_n_samples`` counts *texts* instead (Wikipedia articles, each cut to the
            model's context and every token's key counted), so the papers' C saw up to
            ``mom2_n_samples × n_ctx`` tokens; the GPT-J / GPT-NeoX presets use that bound.
        cov_seq_len: tokens per corpus chunk fed to the model when estimating C.
        cov_dtype: dtype name C is accumulated/stored in ("float32" or "float64").
        prefix_starts: words the context prefixes are sampled from (official: 5 words).
        prefix_len: tokens per sampled context prefix (official: 10).
        prefixes_per_start: prefixes sampled per start word (official: 1).
        context_prefixes: explicit context prefix texts (each followed by ". " and the prompt);
            ``None`` samples them from the model (seeded). The bare prompt is always included.
        seed: seed of the prefix sampling generator.
        batch_size: facts optimised together in one forward/backward.
    """

    layers: tuple[int, ...] = PROVISIONAL_SMOLLM2_LAYERS
    lam: float = 600.0
    steps: int = 30
    lr: float = 0.2
    weight_decay: float = 0.5
    kl_factor: float = 1.0
    nll_factor: float = 1.0
    clamp_norm_factor: float = 0.75
    loss_stop: float = 5e-2
    cov_tokens: int = 100_000
    cov_seq_len: int = 256
    cov_dtype: str = "float32"
    prefix_starts: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    prefix_len: int = 10
    prefixes_per_start: int = 1
    context_prefixes: tuple[str, ...] | None = None
    seed: int = 0
    batch_size: int = 8

    def __post_init__(self) -> None:
        layers = tuple(self.layers)
        object.__setattr__(self, "layers", layers)
        if not layers:
            raise ValueError("layers (R) must name at least one layer")
        if any(not isinstance(l, int) or isinstance(l, bool) for l in layers):
            raise TypeError(f"layers must be ints, got {layers!r}")
        if list(layers) != sorted(set(layers)):
            raise ValueError(f"layers must be strictly ascending without repeats, got {layers!r}")
        if min(layers) < 0:
            raise ValueError(f"layers must be >= 0, got {layers!r}")
        for name in ("lam", "lr", "clamp_norm_factor"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("weight_decay", "kl_factor", "nll_factor", "loss_stop"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name in ("steps", "cov_tokens", "cov_seq_len", "prefix_len", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.prefixes_per_start, int) or self.prefixes_per_start < 0:
            raise ValueError(f"prefixes_per_start must be an int >= 0, got {self.prefixes_per_start!r}")
        if self.cov_dtype not in ("float32", "float64"):
            raise ValueError(f"cov_dtype must be 'float32' or 'float64', got {self.cov_dtype!r}")
        object.__setattr__(self, "prefix_starts", tuple(self.prefix_starts))
        if self.context_prefixes is not None:
            prefixes = tuple(self.context_prefixes)
            if any(not isinstance(p, str) or "{" in p or "}" in p for p in prefixes):
                raise ValueError("context_prefixes must be strings without braces")
            object.__setattr__(self, "context_prefixes", prefixes)

    @property
    def method(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with the method name), inverse of :func:`hparams_from_dict`."""
        out = asdict(self)
        out["method"] = self.method
        return json.loads(json.dumps(out))

    def with_(self, **changes: Any) -> "EditHyperParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    #: Fields that only enter the weight update (λ, C, the spread, which weights are written), not
    #: the optimisation of the target vectors (PMET eq. 9, MEMIT eq. 16).
    update_only_fields: ClassVar[frozenset[str]] = frozenset({"lam", "cov_tokens", "cov_seq_len", "cov_dtype"})

    def target_settings(self) -> dict[str, Any]:
        """The JSON-ready settings the optimised targets depend on: :meth:`to_dict` without
        :attr:`update_only_fields`. Two hyper-parameter sets with equal ``target_settings()`` give
        the same targets for the same facts, so saved targets may be reused across them."""
        return {k: v for k, v in self.to_dict().items() if k not in self.update_only_fields}


@dataclass(frozen=True)
class PMETHyperParams(EditHyperParams):
    """PMET (PMET eqs. 9-11; official code ``edit/pmet``), with the Table 3 ablation switches.

    Attributes:
        use_attn_delta: optimise δ_a on ``hook_attn_out`` of L besides δ_m on ``hook_mlp_out``
            (False = PMET Table 3 "w/o δ_a").
        update_attn: also update the MHSA output weights W_O of each layer in R with keys from
            ``attn.hook_z`` and target v^a = a^L + δ_a (Table 3 "+ W_O^MHSA"; needs δ_a).
        spread: "sqrt" divides the residual by √(L−l+1) (PMET eq. 11); "even" by (L−l+1)
            (Table 3 ablation, MEMIT's spread).
        kl_stop: once the target is the top prediction, φ ← 0.1·φ and the fact stops when the KL
            term is ≤ this (PMET Appendix D).
    """

    use_attn_delta: bool = True
    update_attn: bool = False
    spread: str = "sqrt"
    kl_stop: float = 0.01

    update_only_fields: ClassVar[frozenset[str]] = EditHyperParams.update_only_fields | {"update_attn", "spread"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spread not in ("sqrt", "even"):
            raise ValueError(f"spread must be 'sqrt' or 'even', got {self.spread!r}")
        if self.update_attn and not self.use_attn_delta:
            raise ValueError("update_attn=True needs use_attn_delta=True (W_O's target is a^L + δ_a)")
        if not (math.isfinite(self.kl_stop) and self.kl_stop >= 0):
            raise ValueError(f"kl_stop must be a finite number >= 0, got {self.kl_stop!r}")

    @property
    def method(self) -> str:
        return "pmet"


@dataclass(frozen=True)
class MEMITHyperParams(EditHyperParams):
    """MEMIT (MEMIT eqs. 14-16, Algorithm 1): one δ on ``hook_resid_post`` of L, target z = h^L + δ,
    residual spread 1/(L−l+1).

    Attributes:
        spread: "even" (MEMIT, 1/(L−l+1)) or "sqrt".
    """

    steps: int = 25
    lr: float = 0.5
    spread: str = "even"

    update_only_fields: ClassVar[frozenset[str]] = EditHyperParams.update_only_fields | {"spread"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spread not in ("sqrt", "even"):
            raise ValueError(f"spread must be 'sqrt' or 'even', got {self.spread!r}")

    @property
    def method(self) -> str:
        return "memit"


def hparams_from_dict(data: dict[str, Any]) -> EditHyperParams:
    """Rebuild hyper-parameters from :meth:`EditHyperParams.to_dict` output."""
    data = dict(data)
    method = data.pop("method", "pmet")
    cls = {"pmet": PMETHyperParams, "memit": MEMITHyperParams}[method]
    names = {f.name for f in fields(cls)}
    kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
    return cls(**kwargs)


def critical_layers_for(model_name: str, user_dir: str | Path | None = None) -> tuple[int, ...] | None:
    """Critical layers R stored for ``model_name`` (the user's ``critical_layers.json`` first, then
    the shipped one), or None.

    Thin wrapper over :func:`pmet_lens.analysis.layers.default_critical_layers`, the one reader of that table.
    """
    layers = default_critical_layers(model_name, user_dir)
    return None if layers is None else tuple(layers)


def preset_names(user_dir: str | Path | None = None) -> list[str]:
    """Model names that have an editing preset (the user's ``editing.json`` and the shipped one)."""
    return [k for k in merged_table("editing.json", user_dir) if not k.startswith("_")]


def preset(model_name: str, method: str = "pmet", user_dir: str | Path | None = None) -> EditHyperParams:
    """Hyper-parameters for ``model_name`` (exact names, no substring guessing).

    The user's presets (``user_presets_dir()``, or ``user_dir``: written by ``pmet_lens.calibrate``,
    ``analyses/tune_editing.py --write`` and ``analyses/causal_trace.py``) are read before the
    shipped ones (see :mod:`pmet_lens.core.presets`); the shipped ones are:

    * ``SmolLM2-135M-Instruct``: layers R from ``presets/critical_layers.json`` (written by
      ``analyses/causal_trace.py``); λ, steps, lr and clamp from ``presets/editing.json``, all
      chosen by ``analyses/tune_presets.sh`` (``analyses/tune_editing.py``) on the ``tune`` part
      of the CounterFact split, see :mod:`pmet_lens.data.splits`.
    * ``gpt-j-6B``: PMET Appendix D / MEMIT Appendix B: R = {3..8}; PMET λ 6000, 30 steps,
      lr 0.2, c = 3/4; MEMIT λ 15000, 25 steps, lr 0.5, c = 3/4.
    * ``gpt-neox-20b``: R = {6..10}; PMET λ 15000, 30 steps, lr 0.5, c = 4/5, 5k samples;
      MEMIT λ 20000, 20 steps, lr 0.5, c = 3/10, 50k samples.
    * any other model whose R is stored in ``presets/critical_layers.json``: the class defaults
      with that R (and a warning: λ and the optimisation settings were not tuned for it).

    Raises:
        ValueError: unknown ``method``, or a model with neither a preset nor stored critical
            layers (the message says how to find R or pass it).
    """
    method = method.lower()
    if method not in ("pmet", "memit"):
        raise ValueError(f"method must be 'pmet' or 'memit', got {method!r}")
    cls = PMETHyperParams if method == "pmet" else MEMITHyperParams
    found = find_entry("editing.json", model_name, user_dir)
    key = found[0] if found is not None and method in found[1] else None
    values = _tuplify(found[1][method]) if key is not None else {}
    if "layers" not in values:
        layers = critical_layers_for(key or model_name, user_dir)
        if layers is None:
            raise ValueError(
                f"no critical layers R are known for model {model_name!r} (presets: {', '.join(preset_names(user_dir))}). "
                f"Find them and λ with `pmet-lens calibrate {model_name}` (pmet_lens.calibrate, which writes a user "
                f"preset), or pass hparams={cls.__name__}(layers=(...), ...).")
        values["layers"] = layers
    if key is None:
        logger.warning("no tuned editing preset for %s: using %s defaults with R = %s from causal tracing",
                       model_name, cls.__name__, list(values["layers"]))
    return cls(**values)


def _tuplify(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if not k.startswith("_")}
