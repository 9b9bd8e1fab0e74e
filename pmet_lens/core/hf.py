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
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pmet_lens.core.arch import buffer_state_key

logger = logging.getLogger(__name__)

__all__ = [
    "SUPPORTED_ARCHITECTURES",
    "HFLayout",
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
class HFLayout:
    """Where each TransformerLens parameter's entries live among a transformers model's parameters.

    Attributes:
        hf_config: the transformers config.
        hf_params: transformers parameter name -> ``(offset, shape)``: its entries are the flat
            positions ``offset .. offset + numel - 1`` of the concatenated parameters (each tied
            parameter once).
        index: TransformerLens parameter name -> int64 tensor of its shape: the flat position + 1
            of the transformers entry it is a copy of; 0 where the converter made a constant.
        computed: TransformerLens parameters the converter computes rather than copies (export of
            them is refused).
    """

    hf_config: Any
    hf_params: dict[str, tuple[int, tuple[int, ...]]]
    index: dict[str, torch.Tensor]
    computed: tuple[str, ...]

    @property
    def size(self) -> int:
        """Number of transformers entries."""
        return sum(int(torch.Size(shape).numel()) for _, shape in self.hf_params.values())

    def locate(self, tl_name: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
        """For a TransformerLens parameter: ``(hf_name, tl_flat, hf_flat)`` per transformers
        parameter its entries are copies of: the TL flat positions and the HF flat positions."""
        if tl_name not in self.index:
            raise KeyError(f"{tl_name!r} is not a parameter of this architecture's TransformerLens model")
        ids = self.index[tl_name].reshape(-1)  # [numel]
        out = []
        for hf_name, (offset, shape) in self.hf_params.items():
            n = int(torch.Size(shape).numel())
            mask = (ids > offset) & (ids <= offset + n)
            if mask.any():
                tl_flat = mask.nonzero().squeeze(1)
                out.append((hf_name, tl_flat, ids[tl_flat] - 1 - offset))
        return out

    def to_hf(self, tl_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """transformers parameters from TransformerLens ones (every entry checked to have a place).

        Raises:
            ValueError: a parameter the converter computes; an entry where the transformers layout
                has a constant but the model is not that constant (e.g. a bias an edit gave a
                model whose architecture has none); tied copies that disagree; a transformers
                entry no TransformerLens parameter fills.
        """
        if self.computed:
            raise ValueError(f"{_architecture_name(self.hf_config)}: TransformerLens computes {list(self.computed)[:4]} "
                             "from the checkpoint instead of copying it, so it cannot be written back exactly")
        flat = torch.zeros(self.size + 1, dtype=torch.float32)
        filled = torch.zeros(self.size + 1, dtype=torch.bool)
        for name, value in tl_state.items():  # parameters the converter does not produce
            if name not in self.index and not buffer_state_key(name) and bool((value != 0).any()):
                raise ValueError(f"{name} is non-zero but has no place in the transformers "
                                 f"{_architecture_name(self.hf_config)}; it cannot be exported")
        for name, ids in self.index.items():
            if name not in tl_state:
                raise ValueError(f"the model has no parameter {name!r} that its architecture needs")
            values = tl_state[name].detach().to("cpu", torch.float32).reshape(-1)  # [numel]
            ids = ids.reshape(-1)  # [numel]
            if values.shape != ids.shape:
                raise ValueError(f"{name} has {values.numel()} entries, its transformers layout {ids.numel()}")
            const = ids == 0
            if const.any() and bool((values[const] != 0).any()):
                raise ValueError(f"{name} has non-zero entries that the transformers {_architecture_name(self.hf_config)} "
                                 "has no parameter for (a bias this architecture lacks?); they cannot be exported")
            pos, vals = ids[~const], values[~const]
            again = filled[pos]
            if again.any() and not torch.equal(flat[pos[again]], vals[again]):
                raise ValueError(f"{name} disagrees with a parameter it is tied to in transformers (e.g. W_U and W_E "
                                 "of tied embeddings); export needs them equal")
            flat[pos] = vals
            filled[pos] = True
        out = {}
        for hf_name, (offset, shape) in self.hf_params.items():
            n = int(torch.Size(shape).numel())
            if not bool(filled[offset + 1: offset + 1 + n].all()):
                raise ValueError(f"no TransformerLens parameter fills the transformers parameter {hf_name!r}")
            out[hf_name] = flat[offset + 1: offset + 1 + n].view(shape).clone()  # [*shape]
        return out


def hf_layout(hf_config: Any, cfg: HookedTransformerConfig) -> HFLayout:
    """The :class:`HFLayout` of ``hf_config`` (the probe conversion described in the module docstring).

    Costs one transformers model of the config in float64 (8 bytes per parameter).
    """
    from transformers import AutoModelForCausalLM

    _check_supported(hf_config)
    probe = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float64)
    params: dict[str, tuple[int, tuple[int, ...]]] = {}
    offset = 0
    with torch.no_grad():
        for name, p in probe.named_parameters():  # a tied parameter is listed once
            params[name] = (offset, tuple(p.shape))
            p.copy_(torch.arange(offset + 1, offset + 1 + p.numel(), dtype=torch.float64).view_as(p))
            offset += p.numel()
    if offset >= 2 ** 53:
        raise ValueError("model too large for an exact float64 layout probe")
    probe_cfg = copy.deepcopy(cfg)
    probe_cfg.dtype = torch.float64
    converted = tl_state_dict(probe, probe_cfg)
    index, computed = {}, []
    for name, value in converted.items():
        if buffer_state_key(name):
            continue
        v = value.detach().to(torch.float64)
        ok = (v == v.round()) & (v >= 0) & (v <= offset)
        if not bool(ok.all()):
            computed.append(name)
        index[name] = v.round().clamp(0, offset).to(torch.int64)
    del probe, converted
    return HFLayout(hf_config=hf_config, hf_params=params, index=index, computed=tuple(computed))


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
