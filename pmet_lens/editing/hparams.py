"""Typed hyper-parameters of every editor, and their per-model presets.

:data:`METHODS` is the one registry: method name -> hyper-parameter class; each class names the
:class:`~pmet_lens.editing.editor.Editor` that runs it (:meth:`MethodHyperParams.editor`).

PMET, MEMIT, AlphaEdit, ROME, r-ROME and EMMET are one pipeline (:mod:`pmet_lens.editing.targets`,
:mod:`pmet_lens.editing.keys`, :mod:`pmet_lens.editing.update`); their dataclasses only choose its
settings (:func:`settings_for`) and its solve. FT-W and FT-L (:mod:`pmet_lens.editing.finetune`)
fine-tune one weight and share only the base class. Symbols follow PMET "PMET Method" (eqs. 9-11)
and Appendix D, MEMIT section 4 (eqs. 14-16) and Appendix B, ROME section 3 (eq. 2), r-ROME
(Gupta et al. 2024, arXiv 2403.07175) and EMMET (Gupta et al. 2024, arXiv 2403.14236).
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from pmet_lens.analysis.layers import default_critical_layers
from pmet_lens.core.presets import find_entry, merged_table

if TYPE_CHECKING:
    from pmet_lens.editing.editor import Editor

logger = logging.getLogger(__name__)

__all__ = [
    "AlphaEditHyperParams",
    "EMMETHyperParams",
    "EditHyperParams",
    "FTHyperParams",
    "FTLHyperParams",
    "MEMITHyperParams",
    "MENDHyperParams",
    "METHODS",
    "MethodHyperParams",
    "PMETHyperParams",
    "RROMEHyperParams",
    "ROMEHyperParams",
    "SMOLLM2_LAYERS",
    "SMOLLM2_MEND_LAYERS",
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


def _check_layers(layers: Any) -> tuple[int, ...]:
    """``layers`` as a tuple of ints, strictly ascending, non-negative, non-empty (else an error)."""
    layers = tuple(layers)
    if not layers:
        raise ValueError("layers must name at least one layer")
    if any(not isinstance(l, int) or isinstance(l, bool) for l in layers):
        raise TypeError(f"layers must be ints, got {layers!r}")
    if list(layers) != sorted(set(layers)):
        raise ValueError(f"layers must be strictly ascending without repeats, got {layers!r}")
    if min(layers) < 0:
        raise ValueError(f"layers must be >= 0, got {layers!r}")
    return layers


def _check_number(obj: Any, name: str, *, positive: bool) -> None:
    """Field ``name`` of ``obj`` must be a finite real number, > 0 (``positive``) or >= 0."""
    value = getattr(obj, name)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (value <= 0 if positive else value < 0):
        raise ValueError(f"{name} must be a finite number {'>' if positive else '>='} 0, got {value!r}")


def _check_count(obj: Any, name: str, minimum: int = 1) -> None:
    """Field ``name`` of ``obj`` must be an int >= ``minimum``."""
    value = getattr(obj, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


@dataclass(frozen=True)
class MethodHyperParams:
    """What every method's hyper-parameters share (validated in ``__post_init__``).

    Attributes:
        layers: the blocks whose weights the method writes (ascending).
    """

    method: ClassVar[str]
    """The method name (a key of :data:`METHODS`) these hyper-parameters belong to."""

    layers: tuple[int, ...] = SMOLLM2_LAYERS

    #: Fields that only enter the weight update, not the optimisation of target vectors.
    update_only_fields: ClassVar[frozenset[str]] = frozenset()

    #: The method whose target optimisation this one runs unchanged (``None``: its own), so that
    #: :meth:`target_settings` names that method and targets are reused across the two.
    targets_of_method: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", _check_layers(self.layers))

    def editor(self) -> "Editor":
        """The :class:`~pmet_lens.editing.editor.Editor` that runs this method. Each method's class
        defines it, importing the editor's module inside (the editors' modules import this one)."""
        raise NotImplementedError(f"{type(self).__name__} names no editor: define editor() on it")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (with the method name), inverse of :func:`hparams_from_dict`."""
        out = asdict(self)
        out["method"] = self.method
        return json.loads(json.dumps(out))

    def effective_settings(self) -> dict[str, Any]:
        """The JSON-ready settings an edit depends on. Two hyper-parameter sets with equal
        ``effective_settings()`` make the same edit of the same facts."""
        return self.to_dict()

    def with_(self, **changes: Any) -> "MethodHyperParams":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def target_settings(self) -> dict[str, Any]:
        """The JSON-ready settings the optimised targets depend on: :meth:`to_dict` without
        ``update_only_fields``, its ``method`` the one whose target optimisation this method runs
        (``targets_of_method``). Two hyper-parameter sets with equal ``target_settings()`` give
        the same targets for the same facts, so saved targets may be reused across them."""
        out = {k: v for k, v in self.to_dict().items() if k not in self.update_only_fields}
        out["method"] = self.targets_of_method or self.method
        return out


@dataclass(frozen=True)
class EditHyperParams(MethodHyperParams):
    """Settings of the target-and-solve pipeline shared by PMET, MEMIT, AlphaEdit, ROME, r-ROME and
    EMMET (validated in ``__post_init__``).

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
        prefix_starts: words the context prefixes are sampled from (official: 5 words); ``""`` starts
            from the model's BOS token alone (ROME samples after ``<|endoftext|>``).
        prefix_len: tokens per sampled context prefix (official: 10), or several lengths (ROME: 5
            and 10), each length one group of prefixes with ``prefixes_per_start`` per start word.
        prefixes_per_start: prefixes sampled per start word and length (official: 1; ROME: 10).
        context_prefixes: explicit context prefix texts (each followed by ". " and the prompt);
            ``None`` samples them from the model (seeded). The bare prompt is always included.
        key_average: how a key is averaged over the context templates: ``"groups"`` (MEMIT's and
            PMET's ``compute_ks``: the mean within each group, the bare prompt one group and each
            prefix length one, then the mean over the groups) or ``"uniform"`` (ROME's
            ``compute_u``: every template equally).
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
    prefix_len: int | tuple[int, ...] = 10
    prefixes_per_start: int = 1
    context_prefixes: tuple[str, ...] | None = None
    key_average: str = "groups"
    seed: int = 0
    batch_size: int = 8
    nullspace: bool = False
    nullspace_threshold: float = 2e-2
    l2: float = 10.0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("lam", "lr", "clamp_norm_factor"):
            _check_number(self, name, positive=True)
        for name in ("weight_decay", "kl_factor", "nll_factor", "loss_stop"):
            _check_number(self, name, positive=False)
        for name in ("steps", "cov_tokens", "cov_seq_len", "batch_size"):
            _check_count(self, name)
        _check_count(self, "prefixes_per_start", 0)
        lengths = tuple(self.prefix_len) if isinstance(self.prefix_len, (tuple, list)) else (self.prefix_len,)
        if not lengths or any(not isinstance(n, int) or isinstance(n, bool) or n < 1 for n in lengths):
            raise ValueError(f"prefix_len must be an int >= 1 or a tuple of them, got {self.prefix_len!r}")
        object.__setattr__(self, "prefix_len", lengths if len(lengths) > 1 else lengths[0])
        if self.key_average not in ("groups", "uniform"):
            raise ValueError(f"key_average must be 'groups' or 'uniform', got {self.key_average!r}")
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

    def editor(self) -> "Editor":
        """The target-and-solve pipeline (:data:`pmet_lens.editing.engine.LEAST_SQUARES`), whose solve
        :func:`pmet_lens.editing.engine.method_solve` picks from the hyper-parameters' class."""
        from pmet_lens.editing.engine import LEAST_SQUARES

        return LEAST_SQUARES

    @property
    def prefix_lengths(self) -> tuple[int, ...]:
        """``prefix_len`` as a tuple: one entry per group of sampled prefixes."""
        return self.prefix_len if isinstance(self.prefix_len, tuple) else (self.prefix_len,)

    def effective_settings(self) -> dict[str, Any]:
        """The JSON-ready settings an edit depends on: ``to_dict()`` without τ and α when
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
        {"lam", "cov_tokens", "cov_seq_len", "cov_dtype", "nullspace", "key_average"}) | nullspace_fields


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
    if isinstance(hparams, ROMEHyperParams):
        return Settings(("mlp_out",), ("mlp_out",), "even", None)  # one layer: the spread is 1
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
    targets_of_method: ClassVar[str | None] = "memit"

    nullspace: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.nullspace:
            raise ValueError("AlphaEditHyperParams needs nullspace=True (use MEMITHyperParams for MEMIT's update)")


SMOLLM2_ROME_LAYER: tuple[int, ...] = (4,)
"""Default layer of :class:`ROMEHyperParams`: the MLP layer of the default model with the strongest
indirect effect at the subject's last token in the causal trace (ROME's rule;
:func:`pmet_lens.analysis.layers.strongest_mlp_layer`). :func:`preset` reads it from
``presets/editing.json``."""


@dataclass(frozen=True)
class ROMEHyperParams(EditHyperParams):
    """ROME (Meng et al. 2022, arXiv 2202.05262, section 3 and eq. 2; official ``rome/compute_u.py``,
    ``compute_v.py``): a rank-one update of one layer's FFN output weight W_out, one fact at a time.

    In TransformerLens orientation (keys as rows, m = k W + b), for each fact, on the model the
    previous facts left (MEMIT's "sequential ROME"):

        ΔW = (C⁻¹ k̄ᵀ)(v* − k_s W − b) / (k_s C⁻¹ k̄ᵀ)

    with k̄ the key averaged uniformly over the context templates (``key_average="uniform"``: the
    bare prompt, 10 prefixes of 5 tokens and 10 of 10 sampled after the BOS token), k_s the bare
    prompt's key, C = E[kᵀk] (no λ) and v* = m_init + δ, δ optimised at ``hook_mlp_out`` of the layer
    (PMET's ``mlp_out`` site without δ_a). Then k_s (W + ΔW) + b = v* exactly, and a key k with
    k C⁻¹ k̄ᵀ = 0 keeps its output.

    What differs from MEMIT: one layer; δ on the FFN output, not the residual stream; a hard
    equality for the fact's key instead of MEMIT's least squares with λC; keys averaged uniformly
    over 21 templates instead of half bare / half prefixed; several facts are edited one after
    another, each with targets optimised on the model the previous ones left. λ (``lam``),
    ``spread`` and the null-space fields are unused.

    The fields keep their :class:`EditHyperParams` meaning; the defaults are the official GPT-J
    settings (MEMIT Appendix B.2 and the ROME code): 20 steps, lr 0.5, weight decay 0.5, KL factor
    μ 0.0625, clamp c = 4, early stop 0.05; the layer is the default model's from its causal trace
    (:data:`SMOLLM2_ROME_LAYER`; GPT-J's is 5).
    """

    method: ClassVar[str] = "rome"
    residual_key: ClassVar[str] = "bare"
    """Which key ROME's residual and denominator use: the bare prompt's k_s (ROME) or k̄ (r-ROME)."""

    layers: tuple[int, ...] = SMOLLM2_ROME_LAYER
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    kl_factor: float = 0.0625
    clamp_norm_factor: float = 4.0
    prefix_starts: tuple[str, ...] = ("",)
    prefix_len: int | tuple[int, ...] = (5, 10)
    prefixes_per_start: int = 10
    key_average: str = "uniform"

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.layers) != 1:
            raise ValueError(f"{self.method} edits one layer; got layers={self.layers!r}: pass layers=(l,)")
        if self.nullspace:
            raise ValueError(f"{self.method} has no null-space projected update: leave nullspace=False")

    def editor(self) -> "Editor":
        """The sequential rank-one editor (:data:`pmet_lens.editing.rome.ROME`)."""
        from pmet_lens.editing.rome import ROME

        return ROME


@dataclass(frozen=True)
class RROMEHyperParams(ROMEHyperParams):
    """r-ROME (Gupta et al. 2024, arXiv 2403.07175, section 4): ROME with the averaged key k̄ in the
    numerator, the denominator and the residual:

        ΔW = (C⁻¹ k̄ᵀ)(v* − mean_j(k_j W + b)) / (k̄ C⁻¹ k̄ᵀ)

    so k̄ (W + ΔW) + b = v* (the bare prompt's key maps to v* only approximately). ROME's k_s in two
    places inflates ‖ΔW‖ and makes long sequences of edits collapse; this removes that. Same fields and
    defaults as :class:`ROMEHyperParams` (what differs from MEMIT: see there).
    """

    method: ClassVar[str] = "r-rome"
    residual_key: ClassVar[str] = "mean"


@dataclass(frozen=True)
class EMMETHyperParams(MEMITHyperParams):
    """EMMET (Gupta et al. 2024, arXiv 2403.14236, eq. 9; official ``emmet/emmet_main.py``): MEMIT's
    targets z (``hook_resid_post`` of L), keys (½ bare + ½ prefixes) and residual spread, with the
    equality-constrained batch update instead of MEMIT's least squares:

        C ← α·C,   ΔW = C⁻¹ Kᵀ (K C⁻¹ Kᵀ + λ_E I)⁻¹ R

    (K [n, d_k] keys as rows, R [n, d_model] spread residuals; λ_E only for n > 1, as the official
    code). Every key maps to its residual up to the λ_E term (K ΔW = R − λ_E (K C⁻¹ Kᵀ + λ_E I)⁻¹ R).

    Attributes:
        lam: α, the covariance's scale before the solve (official ``mom2_update_weight``, the same name
            MEMIT's λ has; it matters only through α·λ_E).
        emmet_lambda: λ_E, the ridge added to K C⁻¹ Kᵀ for batches of more than one fact (official
            ``emmet_lambda``: 0.1).

    The other fields keep their :class:`MEMITHyperParams` meaning; the defaults are the official GPT-J
    settings (``hparams/EMMET/EleutherAI_gpt-j-6B.json``): one layer (GPT-J 5; here the default
    model's ROME layer), α 10000, 25 steps, lr 0.5, weight decay 0.5, KL factor 0.0625, clamp 0.75.
    """

    method: ClassVar[str] = "emmet"
    targets_of_method: ClassVar[str | None] = "memit"

    layers: tuple[int, ...] = SMOLLM2_ROME_LAYER
    lam: float = 10000.0
    kl_factor: float = 0.0625
    emmet_lambda: float = 0.1

    update_only_fields: ClassVar[frozenset[str]] = MEMITHyperParams.update_only_fields | {"emmet_lambda"}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self, "emmet_lambda", positive=False)
        if self.nullspace:
            raise ValueError("EMMET's equality-constrained solve does not take the null-space projection: "
                             "leave nullspace=False (or use method 'alphaedit')")


@dataclass(frozen=True)
class FTHyperParams(MethodHyperParams):
    """FT-W (MEMIT Appendix B.1): fine-tune the FFN output weight W_out of each layer in ``layers``
    (one layer in the papers) on the edit prompts' target NLL, with a soft weight decay on the change.

    Loss per step: the mean over the chunk's facts of the mean token NLL of o* after the bare prompt
    p(s) (teacher-forced), with Adam on ΔW and L2 weight decay on ΔW (the gradient gets wd·ΔW). One
    step is an epoch over the facts in chunks of ``batch_size``, one Adam step per chunk whose loss
    is ≥ ``loss_stop``; it stops when an epoch's mean loss is below ``loss_stop``. FT-L (ROME's
    constrained fine-tuning, :class:`FTLHyperParams`) clamps ΔW to [−ε, ε] after each Adam step.

    What differs from MEMIT: no targets, keys or covariance; the weight is moved by gradient
    descent on the NLL of all facts at once (a mass edit). What differs from the official
    ``baselines/ft``: the weight decay acts on the change ΔW (MEMIT's "soft weight decay
    regularizer" in place of ROME's hard L∞ bound), where the official passes it to
    ``torch.optim.Adam``, which decays the whole weight towards zero; only W_out is trained (the
    official GPT-J template names the whole block); the NLL is the teacher-forced mean over o*'s
    tokens (the official scores all of o*'s tokens at the prompt's last position).

    Attributes:
        layers: the blocks whose W_out is fine-tuned (GPT-J: 21).
        steps: at most this many epochs (official ``num_steps``: 25).
        lr: Adam learning rate (official: 5e-4).
        weight_decay: wd, the L2 weight decay on ΔW (MEMIT Fig. 9 tuned it at 10,000 edits: 5e-4
            on GPT-J).
        loss_stop: early stop when an epoch's mean loss is below this (official: 1e-2).
        batch_size: facts per Adam step (official: 64).
        norm_constraint: ε of FT-L, the L∞ bound |ΔW_ij| ≤ ε applied after each step; ``None``
            (FT-W) for none.
    """

    method: ClassVar[str] = "ft-w"

    layers: tuple[int, ...] = SMOLLM2_ROME_LAYER
    steps: int = 25
    lr: float = 5e-4
    weight_decay: float = 5e-4
    loss_stop: float = 1e-2
    batch_size: int = 64
    norm_constraint: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_count(self, "steps")
        _check_count(self, "batch_size")
        _check_number(self, "lr", positive=True)
        _check_number(self, "weight_decay", positive=False)
        _check_number(self, "loss_stop", positive=False)
        if self.norm_constraint is not None:
            _check_number(self, "norm_constraint", positive=True)

    def editor(self) -> "Editor":
        """The fine-tuning editor (:data:`pmet_lens.editing.finetune.FINETUNE`)."""
        from pmet_lens.editing.finetune import FINETUNE

        return FINETUNE


@dataclass(frozen=True)
class FTLHyperParams(FTHyperParams):
    """FT-L (ROME, arXiv 2202.05262, section 4 baselines; official ``hparams/FT/*_constr.json``): FT-W's
    loop with the L∞ constraint |ΔW_ij| ≤ ε = ``norm_constraint`` after every step and no weight decay
    by default (official GPT-J: ε 5e-5, weight decay 0). Fields as :class:`FTHyperParams`.
    """

    method: ClassVar[str] = "ft-l"

    weight_decay: float = 0.0
    norm_constraint: float | None = 5e-5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.norm_constraint is None:
            raise ValueError("ft-l needs norm_constraint (ε of the L∞ bound); use method 'ft-w' for none")


SMOLLM2_MEND_LAYERS: tuple[int, ...] = (27, 28, 29)
"""MEND's edited layers on the default model: its last 3 blocks (MEND edits the last 3 MLP layers)."""


@dataclass(frozen=True)
class MENDHyperParams(MethodHyperParams):
    """MEND (Mitchell et al. 2022, arXiv 2110.11309; official code ``eric-mitchell/mend``): a trained
    editor network g_ℓ per edited layer turns the rank-one factors (u_t, δ_t) of the fine-tuning
    gradient of W_out into (ũ_t, δ̃_t), and ΔW_ℓ = −α_ℓ Σ_t ũ_tᵀ δ̃_t (MEND §3, Alg. 2;
    :mod:`pmet_lens.editing.mend`). The network's shape and training settings are in its file
    (:class:`~pmet_lens.editing.mend_training.MENDTrainingParams`).

    What differs from MEMIT: no targets, keys or covariance; the edit is one forward and backward pass
    of the edit prompts p(s) ⊕ o* through a network trained beforehand for the model
    (``analyses/train_mend.py``), so it is fast but only as good as that training; several facts in
    one call sum their updates.

    Attributes:
        layers: the edited layers ℓ (their W_out); they must be the layers the network was trained
            for (:func:`preset` reads them from the network file; SmolLM2: its last 3 blocks).
        network: the trained g_ℓ and α_ℓ: a name, looked up for the model first in the user's cache
            (``default_cache_dir()/mend/<model>/<name>.safetensors``, written by
            ``analyses/train_mend.py``), then among the networks shipped with the package
            (SmolLM2: ``"counterfact"``, trained on CounterFact's tune split, and ``"zsre"``, on the
            zsRE training records); or the path of a network file (``.safetensors``).
        batch_size: facts per forward and backward pass for the gradient factors (u_t, δ_t); the
            edit is the same for any value, up to float rounding.
    """

    method: ClassVar[str] = "mend"

    layers: tuple[int, ...] = SMOLLM2_MEND_LAYERS
    network: str = "counterfact"
    batch_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.network, (str, Path)) or not str(self.network).strip():
            raise ValueError(f"network must be a network name (e.g. 'counterfact', 'zsre') or a file path, "
                             f"got {self.network!r}")
        object.__setattr__(self, "network", str(self.network))
        _check_count(self, "batch_size")

    def editor(self) -> "Editor":
        """MEND's editor (:data:`pmet_lens.editing.mend.MEND`)."""
        from pmet_lens.editing.mend import MEND

        return MEND


METHODS: dict[str, type[MethodHyperParams]] = {
    "pmet": PMETHyperParams, "memit": MEMITHyperParams, "alphaedit": AlphaEditHyperParams,
    "rome": ROMEHyperParams, "r-rome": RROMEHyperParams, "emmet": EMMETHyperParams,
    "ft-w": FTHyperParams, "ft-l": FTLHyperParams, "mend": MENDHyperParams}
"""Method name -> its hyper-parameter class: the one registry of methods (each class's
:meth:`~MethodHyperParams.editor` runs it)."""


def hparams_from_dict(data: dict[str, Any]) -> MethodHyperParams:
    """Rebuild hyper-parameters from :meth:`MethodHyperParams.to_dict` output."""
    data = dict(data)
    method = data.pop("method", "pmet")
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r} in saved hyper-parameters (known: {', '.join(METHODS)})")
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


def preset(model_name: str, method: str = "pmet", user_dir: str | Path | None = None) -> MethodHyperParams:
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
    * ``rome`` / ``r-rome`` (both read the ``rome`` entry), ``emmet``, ``ft-w`` and ``ft-l``: the
      model's entry of that name. SmolLM2's ROME / r-ROME / EMMET layer is its causal trace's
      (ROME's rule, :func:`pmet_lens.analysis.layers.strongest_mlp_layer`), the other settings the
      official ones; FT-W's layer and weight decay were chosen on the tune split. GPT-J's are the
      papers' (ROME and EMMET layer 5; FT-W layer 21, weight decay 5e-4; FT-L ε 5e-5).
    * ``mend``: the model's ``mend`` entry if it has one, with the layers of its trained network
      (``network`` "counterfact" unless the entry names another), read from the network file; without
      such a network a ``FileNotFoundError`` names the training command.
    * any other model whose R is stored in ``presets/critical_layers.json``: the class defaults
      with that R (and a warning: λ and the optimisation settings were not tuned for it). The
      one-layer methods (ROME, r-ROME, FT-W, FT-L) need an entry: their layer is not R.

    Raises:
        ValueError: unknown ``method``, or a model with neither a preset nor stored critical
            layers (the message says how to find R or pass it).
        FileNotFoundError: ``mend`` for a model without a trained network (the message gives the
            training command).
    """
    method = method.lower()
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    cls = METHODS[method]
    found = find_entry("editing.json", model_name, user_dir)
    stored = _PRESET_OF.get(method, method)
    key = found[0] if found is not None and stored in found[1] else None
    values: dict[str, Any] = {}
    if found is not None and key is not None:
        values = _tuplify(found[1][stored])
        if stored in _STORED:  # τ, α (used when nullspace=True)
            values.update(nullspace_values(found[1].get("nullspace", {}), stored))
    if issubclass(cls, MENDHyperParams):
        return _mend_preset(model_name, values)
    if "layers" not in values and issubclass(cls, (ROMEHyperParams, FTHyperParams)):
        raise ValueError(
            f"no {method} preset is known for model {model_name!r}: its layer is not the critical range R. Pass "
            f"hparams={cls.__name__}(layers=(l,), ...)" + (
                " with l the MLP layer of the strongest causal effect at the subject's last token "
                "(pmet_lens.analysis.layers.strongest_mlp_layer on a `pmet-lens trace --kind mlp --average N` run)"
                if issubclass(cls, ROMEHyperParams) else " with l chosen on held-out facts (analyses/tune_editing.py)"))
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


def _mend_preset(model_name: str, values: dict[str, Any]) -> "MENDHyperParams":
    """MEND's hyper-parameters for ``model_name``: the model's ``mend`` entry (if any) with the layers
    the trained network was trained for, read from its file.

    Raises:
        FileNotFoundError: no trained network of that name for the model (the message gives the
            training command).
    """
    from pmet_lens.editing.mend import network_for_name

    network = str(values.get("network", MENDHyperParams.network))
    if "layers" not in values:
        _, meta = network_for_name(model_name, network)
        values = {**values, "layers": tuple(meta["config"]["layers"])}
    return MENDHyperParams(**values)


_STORED = ("memit", "pmet")
"""The methods whose nullspace values :func:`preset` reads (``alphaedit`` reads ``memit``'s)."""

_PRESET_OF = {"alphaedit": "memit", "r-rome": "rome"}
"""Methods that read another method's preset entry: AlphaEdit uses MEMIT's targets, r-ROME ROME's settings."""


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
