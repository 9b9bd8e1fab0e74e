"""transformers checkpoints in and out: load a local checkpoint as a ``HookedTransformer``, and the
one TransformerLens <-> transformers weight layout that export and :func:`~pmet_lens.export.apply_delta`
read.

Loading reuses TransformerLens's own converters (``convert_hf_model_config`` for the config,
``get_pretrained_state_dict`` for the weights), fed with the checkpoint's ``config.json`` and
the transformers model; nothing depends on the model's name or its directory's name.

The way back (:class:`HFLayout`) is derived from the same converters, per architecture and from
the model's own HF config: every entry of a probe transformers model of that config is set to a
distinct integer (its index + 1, float64), the converter maps the probe to TransformerLens
parameters, and each TransformerLens entry then names the transformers entry it was copied from
(0: a constant the converter made, e.g. a zero bias that the architecture lacks). Transposes,
head splits, fused QKV layouts (GPT-2, GPT-NeoX), grouped K/V heads and tied embeddings are thus
inverted exactly, for every architecture whose converter only rearranges weights; an architecture
whose converter computes values (e.g. Gemma's norm offset) is refused for export with the names
of the parameters concerned.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pmet_lens.core.arch import block_prefix, buffer_state_key

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFLayout",
    "Placement",
    "attach_gguf_source",
    "attach_hf_config",
    "gguf_source_of",
    "hf_config_of",
    "hf_layout",
    "hooked_from_hf",
    "load_checkpoint",
    "tl_state_dict",
]

SUPPORTED_ARCHITECTURES: tuple[str, ...] = (
    "GPT2LMHeadModel",
    "GPTJForCausalLM",
    "GPTNeoForCausalLM",
    "GPTNeoXForCausalLM",
    "OPTForCausalLM",
    "BloomForCausalLM",
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "PhiForCausalLM",
    "Phi3ForCausalLM",
    "GemmaForCausalLM",
    "Gemma2ForCausalLM",
    "OlmoForCausalLM",
    "Olmo2ForCausalLM",
)
"""transformers architectures (``config.architectures[0]``) that TransformerLens 3.9 converts to a
``HookedTransformer`` with dense MLPs, which pmet-lens can trace and edit. Mixture-of-experts models
(Mixtral, OLMoE, GPT-OSS) have no single W_out per layer and are not listed."""

_HF_CONFIG_ATTR = "pmet_hf_config"


def attach_hf_config(model: HookedTransformer, hf_config: Any) -> HookedTransformer:
    """Keep the transformers config ``model`` was converted from on the model (for export)."""
    setattr(model, _HF_CONFIG_ATTR, copy.deepcopy(hf_config))
    return model


def hf_config_of(model: HookedTransformer) -> Any:
    """The transformers config ``model`` was loaded from (:func:`~pmet_lens.core.models.load_model` keeps it).

    Raises:
        ValueError: for a model built without one (e.g. ``HookedTransformer(cfg)``).
    """
    config = getattr(model, _HF_CONFIG_ATTR, None)
    if config is None:
        raise ValueError(
            f"model {model.cfg.model_name!r} carries no transformers config, so its transformers layout is "
            "unknown: load it with pmet_lens.load_model (a name, a checkpoint directory or a GGUF file)")
    return config


_GGUF_SOURCE_ATTR = "pmet_gguf_source"


def attach_gguf_source(model: HookedTransformer, path: str | Path) -> HookedTransformer:
    """Record the GGUF file ``model`` was loaded from (its metadata is copied by GGUF export)."""
    setattr(model, _GGUF_SOURCE_ATTR, str(Path(path).resolve()))
    return model


def gguf_source_of(model: HookedTransformer) -> Path:
    """The GGUF file ``model`` was loaded from.

    Raises:
        ValueError: for a model not loaded from a GGUF file.
    """
    source = getattr(model, _GGUF_SOURCE_ATTR, None)
    if source is None:
        raise ValueError(f"model {model.cfg.model_name!r} was not loaded from a GGUF file, so there is no GGUF "
                         "metadata (tokenizer, chat template) to write; export it with export_hf instead")
    return Path(source)


def _architecture_name(hf_config: Any) -> str:
    """``config.architectures[0]``, or, for a config that names none (e.g. one read from GGUF), the
    causal-LM class transformers maps its ``model_type`` to."""
    names = list(getattr(hf_config, "architectures", None) or [])
    if not names:
        from transformers.models.auto.modeling_auto import (
            MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        )

        mapped = MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(str(getattr(hf_config, "model_type", "")))
        names = [mapped] if isinstance(mapped, str) else []
    if not names:
        raise ValueError("the checkpoint's config.json names no architecture ('architectures' is missing or empty); "
                         f"pmet-lens loads these: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return str(names[0])


def _check_supported(hf_config: Any) -> str:
    name = _architecture_name(hf_config)
    if name not in SUPPORTED_ARCHITECTURES:
        raise ValueError(
            f"architecture {name!r} cannot be loaded: TransformerLens 3.9 converts no such model with dense MLPs "
            f"into a HookedTransformer. Supported architectures: {', '.join(SUPPORTED_ARCHITECTURES)}")
    return name


def _tl_config(hf_config: Any, dtype: torch.dtype, device: str | torch.device | None) -> HookedTransformerConfig:
    """TransformerLens's config for ``hf_config`` from its own converter.

    The converter is given a scratch directory holding only ``config.json``, named neutrally:
    TransformerLens picks some branches by substrings of the name ("llama", "gemma"), and a
    user's directory name must not steer the conversion. Legacy field names the converter reads
    and current transformers no longer writes are filled in from their current names
    (:data:`_LEGACY_FIELDS`).
    """
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config

    data = hf_config.to_dict()
    data["architectures"] = [_architecture_name(hf_config)]  # the converter dispatches on it
    for legacy, current in _LEGACY_FIELDS.items():
        if legacy not in data and current in data:
            data[legacy] = data[current]
    with tempfile.TemporaryDirectory(prefix="pmet_lens_cfg_") as scratch:
        neutral = Path(scratch) / "checkpoint"
        neutral.mkdir()
        (neutral / "config.json").write_text(json.dumps(data, default=str))
        cfg = get_pretrained_model_config(str(neutral), hf_cfg=data, dtype=dtype, device=device)
    return cfg


_LEGACY_FIELDS: dict[str, str] = {"n_ctx": "n_positions"}
"""Config fields TransformerLens 3.9's converter reads -> the field current transformers writes instead
(GPT-2's context length: ``n_ctx`` in old hub configs, ``n_positions`` now)."""


def tl_state_dict(hf_model: Any, cfg: HookedTransformerConfig) -> dict[str, torch.Tensor]:
    """TransformerLens parameters of ``hf_model`` by TransformerLens's converter for ``cfg``'s
    architecture (the ``requires_grad`` flags of ``hf_model`` are left as they were)."""
    from transformer_lens.loading_from_pretrained import get_pretrained_state_dict

    flags = [p.requires_grad for p in hf_model.parameters()]
    try:
        with tempfile.TemporaryDirectory(prefix="pmet_lens_cfg_") as scratch:
            neutral = Path(scratch) / "checkpoint"
            neutral.mkdir()
            (neutral / "config.json").write_text(hf_model.config.to_json_string())
            return get_pretrained_state_dict(str(neutral), cfg, hf_model, dtype=cfg.dtype)
    finally:
        for p, flag in zip(hf_model.parameters(), flags):
            p.requires_grad_(flag)


def hooked_from_hf(
    hf_model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    default_prepend_bos: bool | None = None,
) -> HookedTransformer:
    """An unprocessed ``HookedTransformer`` with ``hf_model``'s weights (no folding, no centring).

    Args:
        hf_model: a transformers causal LM of one of :data:`SUPPORTED_ARCHITECTURES`.
        tokenizer: its tokenizer (or None: the model then takes token ids only).
        model_name: the model's identity, stored as ``cfg.model_name`` (preset lookups use it).
        device: where to build the model.
        dtype: the dtype to build the model in.
        default_prepend_bos: default: whether the tokenizer itself adds a BOS token to a text (the
            model then sees the tokens transformers' own pipelines give it).
    """
    _check_supported(hf_model.config)
    cfg = _tl_config(hf_model.config, dtype, device)
    cfg.model_name = model_name
    cfg.tokenizer_name = None  # the tokenizer is passed in, never looked up by name
    if default_prepend_bos is None:
        default_prepend_bos = bool(tokenizer is not None and len(tokenizer.encode("")) > 0)
    cfg.default_prepend_bos = default_prepend_bos
    state_dict = tl_state_dict(hf_model, cfg)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    # TransformerLens's own loading path (load_and_process_state_dict) without its weight processing,
    # which with every processing flag off changes no value but casts a bfloat16 / float16 state dict
    # to float32 and back (three more copies of the model at once): fill the parameters the converter
    # leaves out (e.g. GPT-2's zero unembedding bias) as it does, then load one tensor at a time
    state = model.fill_missing_keys({k: v.to(dtype) for k, v in state_dict.items()})
    del state_dict
    for key in list(state):
        model.load_state_dict({key: state.pop(key)}, strict=False)
    model.to(device)
    return attach_hf_config(model, hf_model.config)


def checkpoint_name(path: Path) -> str:
    """Identity of a checkpoint directory: the name its ``config.json`` records in ``_name_or_path``
    (its last part, e.g. "HuggingFaceTB/SmolLM2-135M" -> "SmolLM2-135M"; export writes the model's
    name there) unless that is a filesystem path, else the directory's name."""
    try:
        recorded = str(json.loads((path / "config.json").read_text()).get("_name_or_path") or "")
    except (OSError, json.JSONDecodeError, AttributeError):
        recorded = ""
    if recorded and not recorded.startswith(("/", ".", "~")) and "\\" not in recorded:
        return recorded.rstrip("/").rsplit("/", 1)[-1]
    return path.resolve().name


def load_checkpoint(
    path: str | Path,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    default_prepend_bos: bool | None = None,
) -> HookedTransformer:
    """Load a local transformers checkpoint directory (``config.json``, weights, tokenizer).

    Raises:
        FileNotFoundError: the path does not exist, or the directory has no ``config.json``.
        ValueError: the architecture is not one of :data:`SUPPORTED_ARCHITECTURES` (the message
            names it and the supported ones).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {str(path)!r} does not exist (give a checkpoint directory with "
                                "config.json, a .gguf file, or a TransformerLens model name)")
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is a file but not a .gguf file; give a transformers checkpoint directory "
                         "(config.json + weights) or a GGUF file")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{str(path)!r} has no config.json, so it is not a transformers checkpoint; save one "
                                "with model.save_pretrained(dir) (or pmet_lens.export_hf)")
    hf_config = AutoConfig.from_pretrained(path)
    _check_supported(hf_config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise FileNotFoundError(f"{str(path)!r} has no usable tokenizer ({exc}); save it beside the weights with "
                                "tokenizer.save_pretrained(dir)") from exc
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    hf_model.eval()
    model = hooked_from_hf(hf_model, tokenizer, model_name=checkpoint_name(path), device=device,
                           dtype=dtype, default_prepend_bos=default_prepend_bos)
    del hf_model
    return model


# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Placement:
    """Where a TransformerLens parameter's entries lie in one transformers parameter: entry
    ``[i_0, i_1, ...]`` of the TransformerLens parameter is flat entry ``offset + Σ_k i_k·stride[k]``
    of the (row-major) transformers parameter ``hf_name``, i.e. a strided view of it."""

    hf_name: str
    offset: int
    stride: tuple[int, ...]


@dataclass(frozen=True)
class HFLayout:
    """Where each TransformerLens parameter's entries live among a transformers model's parameters,
    as strided views (:class:`Placement`): a few integers per parameter, nothing of the model's size.

    Attributes:
        hf_config: the transformers config.
        hf_params: transformers parameter name -> shape, in the transformers model's order (a tied
            parameter once).
        tl_params: TransformerLens parameter name -> shape, for every parameter the converter produces.
        model_params: every parameter of the ``HookedTransformer`` of this config -> shape, in its
            parameter order (those the converter does not produce get TransformerLens's defaults).
        places: TransformerLens parameter -> its :class:`Placement` (copied entries).
        zeros: TransformerLens parameters the converter fills with zeros (e.g. the zero biases of an
            architecture without them).
        computed: TransformerLens parameters the converter computes rather than copies (export of
            them is refused).
    """

    hf_config: Any
    hf_params: dict[str, tuple[int, ...]]
    tl_params: dict[str, tuple[int, ...]]
    model_params: dict[str, tuple[int, ...]]
    places: dict[str, Placement]
    zeros: tuple[str, ...]
    computed: tuple[str, ...]

    def view(self, tl_name: str, hf_tensor: torch.Tensor) -> torch.Tensor:
        """The entries of TransformerLens parameter ``tl_name`` as a strided view of the contiguous
        transformers tensor ``hf_tensor`` (the parameter it is placed in): reading it gives the
        TransformerLens values, writing it writes the transformers parameter."""
        place = self.places[tl_name]
        if not hf_tensor.is_contiguous():
            raise ValueError(f"the transformers parameter {place.hf_name} is not contiguous in memory")
        return hf_tensor.as_strided(self.tl_params[tl_name], place.stride, hf_tensor.storage_offset() + place.offset)

    def sources(self, hf_name: str) -> list[str]:
        """The TransformerLens parameters placed in ``hf_name`` (tied copies included), in order."""
        return [tl for tl, place in self.places.items() if place.hf_name == hf_name]

    def hf_tensor(self, hf_name: str, tl_state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        """One transformers parameter (a new CPU tensor of ``dtype``) from TransformerLens
        parameters ``tl_state`` (only those placed in it are read).

        Raises:
            ValueError: a parameter the converter computes; tied copies that disagree (e.g. W_U
                and W_E of tied embeddings after an edit of one of them).
        """
        if self.computed:
            raise ValueError(f"{_architecture_name(self.hf_config)}: TransformerLens computes {list(self.computed)[:4]} "
                             "from the checkpoint instead of copying it, so it cannot be written back exactly")
        out = torch.empty(self.hf_params[hf_name], dtype=dtype)
        seen: list[tuple[Placement, tuple[int, ...]]] = []
        for tl_name in self.sources(hf_name):
            if tl_name not in tl_state:
                raise ValueError(f"the model has no parameter {tl_name!r} that its architecture needs")
            value = tl_state[tl_name].detach()
            if tuple(value.shape) != self.tl_params[tl_name]:
                raise ValueError(f"{tl_name} has shape {tuple(value.shape)}, its transformers layout "
                                 f"{self.tl_params[tl_name]}")
            view = self.view(tl_name, out)
            key = (self.places[tl_name], self.tl_params[tl_name])
            value = value.to("cpu", dtype)
            if any(k == key for k in seen) or _same_entries(key, seen):
                if not torch.equal(view, value):
                    raise ValueError(f"{tl_name} disagrees with a parameter it is tied to in transformers (e.g. W_U "
                                     "and W_E of tied embeddings); export needs them equal")
            else:
                view.copy_(value)
            seen.append(key)
        return out


def _same_entries(key: tuple[Placement, tuple[int, ...]], seen: list[tuple[Placement, tuple[int, ...]]]) -> bool:
    """Whether the entries of ``key`` (a placement and shape) were already written by one in ``seen``
    (a tied copy: the same entries in another order, e.g. W_U = W_Eᵀ)."""
    return any(_entry_set(key) == _entry_set(other) for other in seen)


def _entry_set(key: tuple[Placement, tuple[int, ...]]) -> tuple[int, int, int]:
    """(first, last, count) of the flat entries a placement covers: equal for tied copies of one parameter."""
    place, shape = key
    n = int(torch.Size(shape).numel())
    last = place.offset + sum((d - 1) * st for d, st in zip(shape, place.stride))
    return place.offset, last, n


_PROBE_VOCAB = 1009
"""Vocabulary size of the layout probe (a prime no other dimension is expected to equal)."""


def _layer_template(name: str) -> tuple[list[str], int]:
    """A transformers parameter name of block 0 split into parts, and the index of its layer part
    (the one part that is the number 0)."""
    parts = name.split(".")
    zeros = [i for i, part in enumerate(parts) if part == "0"]
    if len(zeros) != 1:
        raise ValueError(f"cannot tell the layer index in the transformers parameter name {name!r}")
    return parts, zeros[0]


def _probe_config(hf_config: Any, n_layers: int) -> Any:
    """``hf_config`` with one block and a 1009-token vocabulary (and no token ids
    beyond it)."""
    probe = copy.deepcopy(hf_config)
    probe.num_hidden_layers = 1
    probe.vocab_size = _PROBE_VOCAB
    for key, value in probe.to_dict().items():
        if key.endswith("token_id") and isinstance(value, int) and value >= _PROBE_VOCAB:
            setattr(probe, key, None)
        elif "layer" in key and isinstance(value, (list, tuple)) and len(value) == n_layers:
            setattr(probe, key, type(value)(value[:1]))  # per-layer settings (e.g. layer_types)
    return probe


def hf_layout(hf_config: Any, cfg: HookedTransformerConfig) -> HFLayout:
    """The :class:`HFLayout` of ``hf_config``, from a probe conversion: a transformers model of the
    config with one block and a 1009-token vocabulary, each entry set to a distinct
    integer (its flat index + 1, float64), is converted by TransformerLens's converter; each
    converted entry names the transformers entry it is a copy of (0: a constant the converter
    made). Each TransformerLens parameter must be a strided view of one transformers parameter
    (transposes, head splits, fused QKV and grouped K/V layouts are); the placements of block 0
    hold for every block (same names with the layer number changed, checked against the full
    model's shapes), and those of the vocabulary-sized parameters for the full vocabulary (the
    vocabulary is their transformers parameter's first dimension, checked).

    Costs one block of the model in float64, twice (probe and converted copy); the full-size
    shapes come from models on the ``meta`` device.

    Raises:
        ValueError: an architecture whose converter does something else than copy entries as
            strided views of single parameters (named), or a layout that does not generalise.
    """
    from transformers import AutoModelForCausalLM

    _check_supported(hf_config)
    n_layers = int(cfg.n_layers)
    if cfg.d_vocab_out not in (-1, cfg.d_vocab):
        raise ValueError(f"vocabulary sizes in and out differ ({cfg.d_vocab}, {cfg.d_vocab_out}): no layout probe for this")
    skeleton_cfg = copy.deepcopy(cfg)
    skeleton_cfg.device = "cpu"
    skeleton_cfg.tokenizer_name = None  # shapes only: no tokenizer is looked up
    with torch.device("meta"):  # shapes only, no memory
        full_hf = {name: tuple(p.shape) for name, p in AutoModelForCausalLM.from_config(hf_config).named_parameters()}
        full_tl = {name: tuple(p.shape) for name, p in
                   HookedTransformer(skeleton_cfg, move_to_device=False).named_parameters()}
    probe = AutoModelForCausalLM.from_config(_probe_config(hf_config, n_layers), dtype=torch.float64)
    starts: dict[str, tuple[int, tuple[int, ...]]] = {}
    offset = 0
    with torch.no_grad():
        for name, p in probe.named_parameters():  # a tied parameter is listed once
            starts[name] = (offset, tuple(p.shape))
            p.copy_(torch.arange(offset + 1, offset + 1 + p.numel(), dtype=torch.float64).view_as(p))
            offset += p.numel()
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.n_layers, probe_cfg.d_vocab, probe_cfg.d_vocab_out = 1, _PROBE_VOCAB, _PROBE_VOCAB
    probe_cfg.dtype = torch.float64
    converted = tl_state_dict(probe, probe_cfg)
    del probe
    probe_places: dict[str, Placement] = {}
    zeros, computed = [], []
    covered: dict[str, torch.Tensor] = {name: torch.zeros(int(torch.Size(shape).numel()), dtype=torch.bool)
                                        for name, (_, shape) in starts.items()}
    for name, value in converted.items():
        if buffer_state_key(name):
            continue
        v = value.detach().to(torch.float64).reshape(-1)  # [numel]
        if not bool(((v == v.round()) & (v >= 0) & (v <= offset)).all()):
            computed.append(name)
            continue
        ids = v.round().to(torch.int64)
        if not bool(ids.any()):
            zeros.append(name)
            continue
        place = _fit_placement(name, ids.view(value.shape), starts)
        if place is None:
            computed.append(name)
            continue
        probe_places[name] = place
        hf_off = starts[place.hf_name][0]
        covered[place.hf_name][ids - 1 - hf_off] = True
    del converted
    unfilled = [name for name, mask in covered.items() if not bool(mask.all())]
    if unfilled and not computed:
        raise ValueError(f"no TransformerLens parameter fills the transformers parameter(s) {unfilled}")
    places: dict[str, Placement] = {}
    tl_params: dict[str, tuple[int, ...]] = {}
    probe_shapes = {name: (starts[p.hf_name][1]) for name, p in probe_places.items()}
    for name, place in probe_places.items():
        if name.startswith(block_prefix(0)):
            parts, at = _layer_template(place.hf_name)
            for layer in range(n_layers):
                tl_name = block_prefix(layer) + name[len(block_prefix(0)):]
                hf_name = ".".join(parts[:at] + [str(layer)] + parts[at + 1:])
                if full_hf.get(hf_name) != probe_shapes[name] or tl_name not in full_tl:
                    raise ValueError(f"the layout of {name} does not carry over to block {layer} ({hf_name})")
                places[tl_name] = Placement(hf_name, place.offset, place.stride)
                tl_params[tl_name] = full_tl[tl_name]
        else:
            _check_vocab_rows(name, place, probe_shapes[name], full_hf.get(place.hf_name), full_tl.get(name))
            places[name] = place
            tl_params[name] = full_tl[name]
    for name in zeros + computed:
        names = [block_prefix(l) + name[len(block_prefix(0)):] for l in range(n_layers)] \
            if name.startswith(block_prefix(0)) else [name]
        for n in names:
            tl_params[n] = full_tl[n]
    expand = lambda names: tuple(  # noqa: E731
        n for name in names for n in ([block_prefix(l) + name[len(block_prefix(0)):] for l in range(n_layers)]
                                      if name.startswith(block_prefix(0)) else [name]))
    return HFLayout(hf_config=hf_config, hf_params=full_hf, tl_params=tl_params, model_params=full_tl, places=places,
                    zeros=expand(zeros), computed=expand(computed))


def _fit_placement(name: str, ids: torch.Tensor, starts: dict[str, tuple[int, tuple[int, ...]]]) -> Placement | None:
    """The :class:`Placement` whose strided view gives the probe ids ``ids`` (flat index + 1 of
    the transformers entry of each entry), or None when they are not one."""
    first = int(ids.reshape(-1)[0])
    hf_name = next((n for n, (off, shape) in starts.items() if off < first <= off + int(torch.Size(shape).numel())), None)
    if hf_name is None:
        return None
    local = ids - 1 - starts[hf_name][0]  # flat positions in the transformers parameter
    if int(local.min()) < 0 or int(local.max()) >= int(torch.Size(starts[hf_name][1]).numel()):
        return None  # entries of several transformers parameters
    origin = int(local.reshape(-1)[0])
    stride = []
    for k, size in enumerate(local.shape):
        if size > 1:
            unit = [0] * local.ndim
            unit[k] = 1
            stride.append(int(local[tuple(unit)]) - origin)
        else:
            stride.append(0)
    grid = torch.tensor(origin)
    for k, size in enumerate(local.shape):
        shape = [1] * local.ndim
        shape[k] = size
        grid = grid + torch.arange(size).view(shape) * stride[k]  # broadcast to local's shape
    if not torch.equal(grid.expand_as(local), local):
        return None
    return Placement(hf_name, origin, tuple(stride))


def _check_vocab_rows(name: str, place: Placement, probe_hf: tuple[int, ...], full_hf: tuple[int, ...] | None,
                      full_tl: tuple[int, ...] | None) -> None:
    """A placement found at the probe's vocabulary holds at the full one: where the transformers
    parameter differs from the probe's, it differs only in its first dimension (the vocabulary's
    rows) and the TransformerLens parameter is a transposition of all of it (a bijection at full size)."""
    if full_hf is None or full_tl is None:
        raise ValueError(f"the layout of {name} ({place.hf_name}) has no counterpart in the full model")
    if tuple(full_hf) == tuple(probe_hf):
        return
    ok = len(full_hf) == len(probe_hf) and tuple(full_hf[1:]) == tuple(probe_hf[1:]) and place.offset == 0
    if ok:  # the TL dims sorted by stride must nest: stride_(i+1) = stride_i · size_i, covering every entry
        pairs = sorted((st, d) for st, d in zip(place.stride, full_tl) if d > 1)
        expected = 1
        for st, d in pairs:
            ok = ok and st == expected
            expected *= d
        ok = ok and expected == int(torch.Size(full_hf).numel())
    if not ok:
        raise ValueError(f"the layout of {name} ({place.hf_name}) does not carry over to the full vocabulary")


def replace_dir(tmp: Path, path: Path, overwrite: bool) -> None:
    """Move the finished directory ``tmp`` to ``path`` (an existing ``path`` is replaced only with
    ``overwrite``; it is removed only once ``tmp`` is complete)."""
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True to replace it")
        old = path.with_name(f"{path.name}.old-{tmp.name}")
        path.rename(old)
        try:
            tmp.rename(path)
        except BaseException:
            old.rename(path)
            raise
        if old.is_dir():
            shutil.rmtree(old)
        else:
            old.unlink()
    else:
        tmp.rename(path)
