"""Edited models out of pmet-lens: a transformers checkpoint, a GGUF file, or a saved edit applied to
a transformers model directly.

Every conversion back to transformers' layout goes through :class:`pmet_lens.core.hf.HFLayout`,
which TransformerLens's own converter defines per architecture from the model's config: each
TransformerLens parameter is a strided view of one transformers parameter. Everything here streams
one tensor at a time: an export builds one transformers tensor, writes it and drops it; a saved
edit is checked against a transformers model by hashing its TransformerLens parameters one at a
time, read through those views, and added in place through them. Host memory stays about one copy
of the model (plus the layout probe: one block in float64, twice). This module sits above
:mod:`pmet_lens.editing` (it reads the edit file format and the weights hash).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import struct
from pathlib import Path
from typing import Any, Iterator

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.arch import buffer_state_key
from pmet_lens.core.hf import (
    HFLayout,
    gguf_source_of,
    hf_config_of,
    hf_layout,
    replace_dir,
)
from pmet_lens.core.models import require_hf_model, require_model

logger = logging.getLogger(__name__)

__all__ = ["apply_delta", "export_gguf", "export_hf", "hf_state_dict", "hf_tensors"]

_EDIT_FORMAT = "pmet-lens-edit/1"
_SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def _check_target(path: str | Path, overwrite: bool) -> Path:
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{str(path)!r} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    return path


def _scratch(path: Path) -> Path:
    """An empty scratch directory beside ``path`` (same filesystem, so the final rename is atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
    return tmp


def _model_dtype(model: HookedTransformer) -> torch.dtype:
    """The dtype of the model's weight matrices (the dtype an export writes)."""
    return next(p.dtype for name, p in model.named_parameters() if p.ndim > 1)


def _check_exportable(model: HookedTransformer, layout: HFLayout) -> dict[str, torch.Tensor]:
    """The model's parameters, after checking that what the transformers layout has no place for is
    zero (a parameter the converter does not produce, or one it fills with zeros)."""
    state = {name: p for name, p in model.state_dict().items() if not buffer_state_key(name)}
    arch = type(layout.hf_config).__name__
    for name, value in state.items():
        if (name not in layout.places or name in layout.zeros) and bool((value != 0).any()):
            raise ValueError(f"{name} is non-zero but has no place in the transformers model ({arch}: a bias this "
                             "architecture lacks?); it cannot be exported")
    return state


def hf_tensors(model: HookedTransformer, dtype: torch.dtype | None = None
               ) -> tuple[Any, HFLayout, Iterator[tuple[str, torch.Tensor]]]:
    """``(hf_config, layout, tensors)``: ``model``'s weights as they are now in its transformers
    layout, ``tensors`` yielding ``(name, tensor)`` one transformers parameter at a time (CPU,
    ``dtype``, default the model's), in the transformers model's order.

    Raises:
        ValueError: a model without a transformers config, or weights the architecture has no
            place for (see :meth:`pmet_lens.core.hf.HFLayout.hf_tensor`).
    """
    require_model(model, "pmet_lens.export.hf_tensors")
    config = hf_config_of(model)
    layout = hf_layout(config, model.cfg)
    state = _check_exportable(model, layout)
    out_dtype = dtype if dtype is not None else _model_dtype(model)

    def generate() -> Iterator[tuple[str, torch.Tensor]]:
        for hf_name in layout.hf_params:
            yield hf_name, layout.hf_tensor(hf_name, state, out_dtype)

    return config, layout, generate()


def hf_state_dict(model: HookedTransformer) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(hf_config, state)``: ``model``'s weights as they are now, in its transformers layout (all
    at once: a second copy of the model; :func:`hf_tensors` streams them)."""
    config, _, tensors = hf_tensors(model)
    return config, dict(tensors)


def _write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype,
                       tensors: Iterator[tuple[str, torch.Tensor]]) -> None:
    """Write a safetensors file (format "pt") tensor by tensor: the header from the known shapes
    first, then each tensor's bytes as it comes."""
    code = _SAFETENSORS_DTYPES[dtype]
    size = torch.empty(0, dtype=dtype).element_size()
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    start = 0
    for name, shape in shapes.items():
        n = int(torch.Size(shape).numel()) * size
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [start, start + n]}
        start += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for name, t in tensors:
            if tuple(t.shape) != tuple(shapes[name]) or t.dtype != dtype:
                raise RuntimeError(f"tensor {name} does not match the header written for it")
            fh.write(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())


def export_hf(model: HookedTransformer, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as it is now (edited or not) as a transformers checkpoint directory.

    The directory holds ``config.json`` (the config the model was loaded from, ``_name_or_path``
    set to ``cfg.model_name``, ``dtype`` the model's), ``model.safetensors`` (in the model's dtype,
    written one tensor at a time) and the tokenizer, so that
    ``AutoModelForCausalLM.from_pretrained(path)`` gives the model's logits. It is written to a
    scratch directory beside ``path`` and renamed into place when complete.

    Raises:
        FileExistsError: ``path`` exists and not ``overwrite`` (checked before any work).
        ValueError: a model without a transformers config, or weights the architecture has no
            place for (see :meth:`pmet_lens.core.hf.HFLayout.hf_tensor`).
    """
    import copy

    require_model(model, "pmet_lens.export_hf")

    path = _check_target(path, overwrite)
    dtype = _model_dtype(model)
    config, layout, tensors = hf_tensors(model, dtype)
    if layout.computed:  # refused before anything is written
        next(tensors)
    tmp = _scratch(path)
    try:
        tmp.mkdir()
        out_config = copy.deepcopy(config)
        out_config.dtype = dtype
        if hasattr(out_config, "quantization_config"):
            del out_config.quantization_config
        out_config.save_pretrained(tmp)
        _write_safetensors(tmp / "model.safetensors", layout.hf_params, dtype, tensors)
        if model.tokenizer is not None:
            model.tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        data = json.loads(cfg_path.read_text())
        data["_name_or_path"] = str(model.cfg.model_name)
        cfg_path.write_text(json.dumps(data, indent=2) + "\n")
        replace_dir(tmp, path, overwrite)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    logger.info("exported %s to %s (%s)", model.cfg.model_name, path, dtype)
    return path


# --------------------------------------------------------------------------------------- GGUF
def _llama_permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (the inverse of transformers' GGUF ``reverse_permute``)."""
    rows = w.shape[0]
    w = w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])  # [heads, 2, d_head/2, ...]
    return w.swapaxes(1, 2).reshape(rows, *w.shape[3:])  # [rows, ...]


def export_gguf(model: HookedTransformer, path: str | Path, *, dtype: str = "f32", overwrite: bool = False) -> Path:
    """Write ``model`` as it is now as a GGUF file (``dtype`` "f32" or "f16"; norms stay f32).

    The metadata (tokenizer, chat template, hyper-parameters) and the tensor order are those of the
    GGUF file the model was loaded from (:func:`gguf_source_of`); the weights are the model's, in
    llama.cpp's layout (the GGUF ``llama`` architecture: Q and K rows permuted as llama.cpp
    does). The header is written first and each tensor is built and written one at a time.
    transformers' GGUF loader reads the file back.

    Raises:
        FileExistsError: ``path`` exists and not ``overwrite``.
        ValueError: ``dtype`` is not "f32"/"f16", a model not loaded from GGUF, or a GGUF
            architecture other than ``llama``.
    """
    require_model(model, "pmet_lens.export_gguf")
    import gguf
    import numpy as np

    if dtype not in ("f32", "f16"):
        raise ValueError(f"dtype must be 'f32' or 'f16', got {dtype!r}")
    path = _check_target(path, overwrite)
    source = gguf_source_of(model)
    reader = gguf.GGUFReader(str(source))
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    if arch != "llama":
        raise ValueError(f"GGUF export supports the 'llama' GGUF architecture; {source.name} is {arch!r}")
    config = hf_config_of(model)
    layout = hf_layout(config, model.cfg)
    state = _check_exportable(model, layout)
    n_blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    by_gguf: dict[str, str] = {}
    for hf_name in layout.hf_params:
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is not None:
            by_gguf[f"{mapped}.{suffix}"] = hf_name
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
    plan = []
    for tensor in reader.tensors:
        found = by_gguf.get(tensor.name)
        if found is None:
            raise ValueError(f"GGUF tensor {tensor.name!r} of {source.name} has no transformers counterpart")
        shape = layout.hf_params[found]
        np_dtype = np.dtype(np.float16 if dtype == "f16" and len(shape) > 1 else np.float32)
        plan.append((tensor.name, found, shape, np_dtype))

    def array(gguf_name: str, hf_name: str, np_dtype: Any) -> Any:
        w = layout.hf_tensor(hf_name, state, torch.float32)
        if gguf_name.endswith("attn_q.weight"):
            w = _llama_permute(w, n_head)
        elif gguf_name.endswith("attn_k.weight"):
            w = _llama_permute(w, n_kv)
        return w.numpy().astype(np_dtype)

    tmp = _scratch(path)
    try:
        writer = gguf.GGUFWriter(str(tmp), arch="llama")
        skip = {gguf.Keys.General.ARCHITECTURE, gguf.Keys.General.FILE_TYPE, gguf.Keys.General.QUANTIZATION_VERSION}
        for field in reader.fields.values():
            if field.name in skip or field.name.startswith("GGUF."):
                continue
            kind = field.types[0]
            sub = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(field.name, field.contents(), kind, sub_type=sub)
        writer.add_file_type(gguf.LlamaFileType.ALL_F32 if dtype == "f32" else gguf.LlamaFileType.MOSTLY_F16)
        for gguf_name, _, shape, np_dtype in plan:  # tensor infos first, the data follows one tensor at a time
            writer.add_tensor_info(gguf_name, shape, np_dtype, int(np.prod(shape)) * int(np_dtype.itemsize))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for gguf_name, hf_name, _, np_dtype in plan:
            writer.write_tensor_data(array(gguf_name, hf_name, np_dtype))
        writer.close()
        if path.exists():
            path.unlink()
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    logger.info("exported %s to %s (%s)", model.cfg.model_name, path, dtype)
    return path


# ----------------------------------------------------------------------------- saved edits
def _tl_tensors(hf_model: Any, layout: HFLayout, hf_params: dict[str, torch.Tensor]
                ) -> Iterator[tuple[str, torch.Tensor]]:
    """The TransformerLens parameters of ``hf_model``, one at a time in the ``HookedTransformer``'s
    order (strided views of its parameters; zeros where the converter makes zeros, TransformerLens's
    defaults for what it does not produce)."""
    dtype = next(iter(hf_params.values())).dtype
    for name, shape in layout.model_params.items():
        if name in layout.places:
            yield name, layout.view(name, hf_params[layout.places[name].hf_name].detach())
        elif name in layout.zeros or (name not in layout.tl_params and name.rsplit(".", 1)[-1].lstrip("_").startswith("b")):
            yield name, torch.zeros(shape, dtype=dtype)
        elif name not in layout.tl_params and name.rsplit(".", 1)[-1] == "w":
            yield name, torch.ones(shape, dtype=dtype)  # a norm scale the checkpoint lacks: TransformerLens's default
        else:
            raise ValueError(f"cannot read {name} from the transformers model without converting it")


def _identity(hf_model: Any, meta: dict[str, str], layout: HFLayout, model_name: str) -> str:
    """The weights hash the edit file records (its scheme), of the ``HookedTransformer`` that
    ``hf_model`` converts to, streamed; a full conversion only where the converter computes values."""
    from pmet_lens.core.hf import hooked_from_hf
    from pmet_lens.editing.identity import HASH_SCHEME, hash_named_tensors, legacy_weights_hash

    params = dict(hf_model.named_parameters())
    if layout.computed:  # the converter computes some values: convert (a second copy of the model)
        dtype = next(iter(params.values())).dtype
        hooked = hooked_from_hf(hf_model, None, model_name=model_name, dtype=dtype)
        from pmet_lens.editing.identity import weights_hash

        return weights_hash(hooked) if meta.get("hash_scheme") == HASH_SCHEME else legacy_weights_hash(hooked)
    tensors = _tl_tensors(hf_model, layout, params)
    if meta.get("hash_scheme") == HASH_SCHEME:
        return hash_named_tensors(tensors)
    import hashlib

    digest = hashlib.blake2b(digest_size=16)  # the scheme of files that record none
    for name, t in tensors:
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def apply_delta(hf_model: Any, path: str | Path, *, check_identity: bool = True) -> Any:
    """Add a saved edit (:meth:`pmet_lens.editing.result.EditResult.save`) to a transformers model's weights, in place.

    Each ΔW is stored in TransformerLens's layout (``blocks.{l}.mlp.W_out`` [d_mlp, d_model],
    ``blocks.{l}.attn.W_O`` [n_heads, d_head, d_model]); it is added through the strided view of
    the transformers parameter it maps to (:class:`pmet_lens.core.hf.HFLayout`), with
    :func:`pmet_lens.editing.delta.add_delta`, so the transformers weights become exactly those of
    the edited ``HookedTransformer``, in any dtype. First the model is checked to be the one the edit
    was made for: the dtype the file records must be the dtype of the parameters it edits (a bf16
    edit needs the bf16 model), then the TransformerLens weights hash of ``hf_model``, computed one
    parameter at a time through the same views (no converted copy of the model), must equal the
    one the file records.

    Returns:
        ``hf_model`` (edited).

    Raises:
        TypeError: ``hf_model`` is not a transformers model (a HookedTransformer takes
            :meth:`pmet_lens.editing.result.EditResult.load` instead).
        ValueError: not an edit file; the model's dtype is not the edit's (both named); a different
            (or already edited) model; a delta whose shape does not fit. In every case the weights
            are left as they were.
    """
    from safetensors import SafetensorError, safe_open

    from pmet_lens.core.hf import _tl_config
    from pmet_lens.editing.delta import add_delta
    from pmet_lens.editing.result import check_dtype

    require_hf_model(hf_model, "pmet_lens.apply_delta")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"edit file {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as fh:
            meta = fh.metadata() or {}
            if meta.get("format") != _EDIT_FORMAT:
                raise ValueError(f"{path} is not a pmet-lens edit file (EditResult.save)")
            deltas = {k[len("delta/"):]: fh.get_tensor(k) for k in fh.keys() if k.startswith("delta/")}
    except SafetensorError as exc:
        raise ValueError(f"{path} is not a readable safetensors edit file ({exc})") from exc
    params = dict(hf_model.named_parameters())
    dtype = next(iter(params.values())).dtype
    cfg = _tl_config(hf_model.config, dtype, "cpu")
    layout = hf_layout(hf_model.config, cfg)
    for name, delta in deltas.items():
        if name not in layout.places:
            raise ValueError(f"{path}: {name!r} is not a parameter of this {type(hf_model).__name__}")
        if layout.tl_params[name] != tuple(delta.shape):
            raise ValueError(f"{path}: delta {name} has shape {tuple(delta.shape)}, this model's parameter "
                             f"{layout.tl_params[name]}")
    targets = {name: params[layout.places[name].hf_name] for name in deltas}
    check_dtype(path, meta.get("dtype"), targets, "load the transformers model in the dtype the edit was made in")
    if check_identity:
        current = _identity(hf_model, meta, layout, str(meta.get("model_name", "")))
        if current != meta.get("model_hash"):
            raise ValueError(
                f"{path} was made for a different model (weights hash {meta.get('model_hash')}, this model {current}; "
                f"it was saved from {meta.get('model_name')!r}). Load the unedited model it was made for, in the "
                f"dtype it was made in ({meta.get('dtype', 'float32')}), and apply each edit once")
    originals = {id(p): (p, p.detach().clone()) for p in targets.values()}
    try:
        for name, delta in deltas.items():
            add_delta(layout.view(name, targets[name].detach()), delta)
    except BaseException:
        with torch.no_grad():
            for param, orig in originals.values():
                param.copy_(orig)
        raise
    logger.info("applied %d delta(s) from %s", len(deltas), path)
    return hf_model
