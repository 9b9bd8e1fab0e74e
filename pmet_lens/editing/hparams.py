"""Typed hyper-parameters of the PMET and MEMIT editors, and their per-model presets.

PMET and MEMIT are one pipeline (:mod:`pmet_lens.editing.targets`, :mod:`pmet_lens.editing.update`); the two
dataclasses below only choose its settings (:func:`settings_for`). Symbols follow PMET "PMET
Method" (eqs. 9-11) and Appendix D, and MEMIT section 4 (eqs. 14-16) and Appendix B.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, ClassVar

from pmet_lens.analysis.layers import default_critical_layers
from pmet_lens.core.presets import find_entry, merged_table

logger = logging.getLogger(__name__)

__all__ = [
    "AlphaEditHyperParams",
    "EditHyperParams",
    "MEMITHyperParams",
    "PMETHyperParams",
    "SMOLLM2_LAYERS",
    "Settings",
    "critical_layers_for",
    "hparams_from_dict",
    "nullspace_values",
    "preset",
    "preset_names",
    "settings_for",
]

SMOLLM2_LAYERS: tuple[int, ...] = (3, 4, 5, 6, 7)
"""Default R of the dataclasses: the critical layers of the default model, SmolLM2-135M-Instruct,
found by causal tracing (``presets/critical_layers.json``). :func:`preset` reads R from that file."""


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
        kl_factor: μ, weight of the KL term KL(P_edited ‖ P_init) on "{s} is a" (PMET eq. 9, ``kl_factor``).
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
        nullspace: replace the update's λC term by AlphaEdit's null-space projection (AlphaEdit
            eq. 12, :mod:`pmet_lens.editing.nullspace`): ΔW solves (P(K1ᵀK1 + KpKp) + αI) ΔW = P K1ᵀR;
            λ is then unused. In an :class:`~pmet_lens.editing.session.EditSession`, KpKp sums the
            keys of the earlier batches; in a single :func:`~pmet_lens.editing.edit` it is zero.
        nullspace_threshold: τ, the absolute eigenvalue threshold of C = E[kkᵀ] below which an
            eigenvector spans the null space (official AlphaEdit: 2e-2 for GPT2-XL / GPT-J /
            Llama3-8B; it depends on the model's key scale, choose it per model).
        l2: α, the ridge weight of the projected solve (official "L2": 10).
    """

    method: ClassVar[str]
    """The method name ("pmet" or "memit") these hyper-parameters belong to."""

    layers: tuple[int, ...] = SMOLLM2_LAYERS
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
    nullspace: bool = False
    nullspace_threshold: float = 2e-2
    l2: float = 10.0

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
        if not isinstance(self.nullspace, bool):
            raise TypeError(f"nullspace must be True or False, got {self.nullspace!r}")
        tau = self.nullspace_threshold
        if not (isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau >= 0):
            raise ValueError(f"nullspace_threshold (τ) must be a finite number >= 0, got {tau!r}")
        if not (isinstance(self.l2, (int, float)) and not isinstance(self.l2, bool) and math.isfinite(self.l2)
                and self.l2 > 0):
            raise ValueError(f"l2 (α) must be a finite number > 0, got {self.l2!r}")
        if self.cov_dtype not in ("float32", "float64"):
            raise ValueError(f"cov_dtype must be 'float32' or 'float64', got {self.cov_dtype!r}")
        object.__setattr__(self, "prefix_starts", tuple(self.prefix_starts))
        if self.context_prefixes is not None:
            prefixes = tuple(self.context_prefixes)
            if any(not isinstance(p, str) or "{" in p or "}" in p for p in prefixes):
                raise ValueError("context_prefixes must be strings without braces")
            object.__setattr__(self, "context_prefixes", prefixes)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with the method name), inverse of :func:`hparams_from_dict`."""
        out = asdict(self)
        out["method"] = self.method
        return json.loads(json.dumps(out))

    def effective_settings(self) -> dict[str, Any]:
        """The JSON-ready settings an edit depends on: :meth:`to_dict` without τ and α when
        ``nullspace`` is off (the plain update ignores them). Two hyper-parameter sets with equal
        ``effective_settings()`` make the same edit of the same facts."""
        skip = frozenset() if self.nullspace else self.nullspace_fields
        return {k: v for k, v in self.to_dict().items() if k not in skip}

    def with_(self, **changes: Any) -> "EditHyperParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    #: Fields that only matter when ``nullspace`` is on (AlphaEdit eq. 12's τ and α).
    nullspace_fields: ClassVar[frozenset[str]] = frozenset({"nullspace_threshold", "l2"})

    #: Fields that only enter the weight update (λ, C, the spread, which weights are written), not
    #: the optimisation of the target vectors (PMET eq. 9, MEMIT eq. 16).
    update_only_fields: ClassVar[frozenset[str]] = frozenset(
        {"lam", "cov_tokens", "cov_seq_len", "cov_dtype", "nullspace"}) | nullspace_fields

    def target_settings(self) -> dict[str, Any]:
        """The JSON-ready settings the optimised targets depend on: :meth:`to_dict` without
        ``update_only_fields``. Two hyper-parameter sets with equal ``target_settings()`` give
        the same targets for the same facts, so saved targets may be reused across them."""
        return {k: v for k, v in self.to_dict().items() if k not in self.update_only_fields}


@dataclass(frozen=True)
class PMETHyperParams(EditHyperParams):
    """PMET (PMET eqs. 9-11; official code ``edit/pmet``), with the Table 3 ablation switches.

    Attributes:
        use_attn_delta: optimise δ_a on the MHSA output a^L besides δ_m on the FFN output m^L
            (False = PMET Table 3 "w/o δ_a").
        update_attn: also update the MHSA output weights W_O of each layer in R with keys from
            the per-head attention outputs (:meth:`~pmet_lens.core.arch.Architecture.attn_key_hook`) and
            target v^a = a^L + δ_a (Table 3 "+ W_O^MHSA"; needs δ_a).
        spread: "sqrt" divides the residual by √(L−l+1) (PMET eq. 11); "even" by (L−l+1)
            (Table 3 ablation, MEMIT's spread).
        kl_stop: once the target is the top prediction, φ ← 0.1·φ and the fact stops when the KL
            term is ≤ this (PMET Appendix D).
    """

    method: ClassVar[str] = "pmet"

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



@dataclass(frozen=True)
class MEMITHyperParams(EditHyperParams):
    """MEMIT (MEMIT eqs. 14-16, Algorithm 1): one δ on the residual stream h^L leaving block L, target z = h^L + δ,
    residual spread 1/(L−l+1).

    Attributes:
        spread: "even" (MEMIT, 1/(L−l+1)) or "sqrt".
    """

    method: ClassVar[str] = "memit"

    steps: int = 25
    lr: float = 0.5
    spread: str = "even"

    update_only_fields: ClassVar[frozenset[str]] = EditHyperParams.update_only_fields | {"spread"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.spread not in ("sqrt", "even"):
            raise ValueError(f"spread must be 'sqrt' or 'even', got {self.spread!r}")



@dataclass(frozen=True)
class Settings:
    """What distinguishes PMET from MEMIT in the shared pipeline.

    Attributes:
        delta_sites: where δ's are added at layer L ("attn_out", "mlp_out", "resid_post"; hook names
            from :meth:`pmet_lens.core.arch.Architecture.delta_hook`).
        kept_sites: sites whose target (initial output + δ) is used by the weight update;
            "mlp_out" targets (PMET's v^m) and "resid_post" targets (MEMIT's z) feed W_out,
            "attn_out" targets (PMET's v^a) feed W_O (PMET Table 3 ablation).
        spread: "sqrt" (PMET eq. 11) or "even" (MEMIT eq. 15 / Table 3 ablation).
        kl_stop: PMET's second stopping rule threshold, ``None`` for MEMIT.
    """

    delta_sites: tuple[str, ...]
    kept_sites: tuple[str, ...]
    spread: str
    kl_stop: float | None


def settings_for(hparams: EditHyperParams) -> Settings:
    """Pipeline settings of a method's hyper-parameters (ablation switches included)."""
    if isinstance(hparams, PMETHyperParams):
        sites = ("attn_out", "mlp_out") if hparams.use_attn_delta else ("mlp_out",)
        kept = ("mlp_out", "attn_out") if hparams.update_attn else ("mlp_out",)
        return Settings(sites, kept, hparams.spread, hparams.kl_stop)
    return Settings(("resid_post",), ("resid_post",), getattr(hparams, "spread", "even"), None)


@dataclass(frozen=True)
class AlphaEditHyperParams(MEMITHyperParams):
    """AlphaEdit (Fang et al., ICLR 2025, eq. 12): MEMIT's target z on the residual stream h^L and
    its spread 1/(L−l+1), with the null-space projected update (``nullspace`` is always True; see
    :class:`EditHyperParams` for τ = ``nullspace_threshold`` and α = ``l2``). λ is unused.
    """

    method: ClassVar[str] = "alphaedit"

    nullspace: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.nullspace:
            raise ValueError("AlphaEditHyperParams needs nullspace=True (use MEMITHyperParams for MEMIT's update)")


METHODS: dict[str, type[EditHyperParams]] = {
    "pmet": PMETHyperParams, "memit": MEMITHyperParams, "alphaedit": AlphaEditHyperParams}
"""Method name -> its hyper-parameter class."""


def hparams_from_dict(data: dict[str, Any]) -> EditHyperParams:
    """Rebuild hyper-parameters from :meth:`EditHyperParams.to_dict` output."""
    data = dict(data)
    method = data.pop("method", "pmet")
    cls = METHODS[method]
    names = {f.name for f in fields(cls)}
    kwargs: dict[str, Any] = {k: (tuple(v) if isinstance(v, list) else v) for k, v in data.items() if k in names}
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
    * ``alphaedit``: MEMIT's preset (targets and spread) with τ and α from the model's ``nullspace``
      block of ``presets/editing.json`` (see :func:`nullspace_values`: its ``memit`` entry or, without
      one, its plain values, since AlphaEdit uses MEMIT's targets); without one, AlphaEdit's official τ = 2e-2, α = 10. Every
      method's hyper-parameters carry their own τ and α from that block, so
      ``preset(name, "pmet").with_(nullspace=True)`` is PMET with the projection at the τ and α chosen
      with PMET's targets.
    * any other model whose R is stored in ``presets/critical_layers.json``: the class defaults
      with that R (and a warning: λ and the optimisation settings were not tuned for it).

    Raises:
        ValueError: unknown ``method``, or a model with neither a preset nor stored critical
            layers (the message says how to find R or pass it).
    """
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    cls = METHODS[method]
    found = find_entry("editing.json", model_name, user_dir)
    stored = "memit" if method == "alphaedit" else method
    key = found[0] if found is not None and stored in found[1] else None
    values: dict[str, Any] = {}
    if found is not None and key is not None:
        values = _tuplify(found[1][stored])
        values.update(nullspace_values(found[1].get("nullspace", {}), stored))  # τ, α (used when nullspace=True)
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


_STORED = ("memit", "pmet")
"""The methods whose preset entries :func:`preset` reads (``alphaedit`` reads ``memit``'s)."""


def nullspace_values(block: dict[str, Any], method: str) -> dict[str, Any]:
    """τ (``nullspace_threshold``) and α (``l2``) for ``method``'s targets from a preset's ``nullspace`` block.

    The block holds plain values that apply to every method and, optionally, one entry per target
    method (``"memit"``, ``"pmet"``) whose values take precedence, because the threshold and the ridge
    weight that win on the tune split depend on the targets being projected
    (``analyses/tune_nullspace.py --method``)::

        {"nullspace_threshold": 0.02, "l2": 1.0, "pmet": {"l2": 10.0}}

    Args:
        block: the ``nullspace`` block (``{}`` when the preset has none).
        method: ``"memit"`` or ``"pmet"`` (``alphaedit`` reads ``"memit"``'s values).

    Raises:
        ValueError: an entry that is neither a known hyper-parameter nor a method's sub-block.
    """
    allowed = EditHyperParams.nullspace_fields
    values: dict[str, Any] = {}
    for k, v in block.items():
        if k.startswith("_") or (isinstance(v, dict) and k in _STORED):
            continue
        if k not in allowed or isinstance(v, dict):
            raise ValueError(f"unknown key {k!r} in the preset's nullspace block (allowed: {sorted(allowed)} "
                             f"or a per-method block {sorted(_STORED)})")
        values[k] = v
    sub = block.get(method, {})
    bad = sorted(set(sub) - allowed - {k for k in sub if k.startswith("_")})
    if bad:
        raise ValueError(f"unknown key(s) {bad} in the preset's nullspace.{method} block (allowed: {sorted(allowed)})")
    values.update({k: v for k, v in sub.items() if not k.startswith("_")})
    return values


def _tuplify(values: dict[str, Any]) -> dict[str, Any]:
    return {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items() if not k.startswith("_")}
