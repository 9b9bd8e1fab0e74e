"""Edited models out of pmet-lens: a transformers checkpoint, a GGUF file, or a saved edit applied to
a transformers model directly.

Every conversion back to transformers' layout goes through :class:`pmet_lens.core.hf.HFLayout`,
which TransformerLens's own converter defines per architecture from the model's config. This
module sits above :mod:`pmet_lens.editing` (it reads the edit file format and the weights hash).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from transformer_lens import HookedTransformer

from pmet_lens.core.hf import (
    gguf_source_of,
    hf_config_of,
    hf_layout,
    hooked_from_hf,
    replace_dir,
)
from pmet_lens.core.models import require_hf_model, require_model

logger = logging.getLogger(__name__)

__all__ = ["apply_delta", "export_gguf", "export_hf", "hf_state_dict"]

_EDIT_FORMAT = "pmet-lens-edit/1"


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


def hf_state_dict(model: HookedTransformer) -> tuple[Any, dict[str, torch.Tensor]]:
    """``(hf_config, state)``: ``model``'s weights as they are now, in its transformers layout."""
    require_model(model, "pmet_lens.export.hf_state_dict")
    config = hf_config_of(model)
    layout = hf_layout(config, model.cfg)
    return config, layout.to_hf(model.state_dict())


def export_hf(model: HookedTransformer, path: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``model`` as it is now (edited or not) as a transformers checkpoint directory.

    The directory holds ``config.json`` (the config the model was loaded from, ``_name_or_path``
    set to ``cfg.model_name``), ``model.safetensors`` (float32) and the tokenizer, so that
    ``AutoModelForCausalLM.from_pretrained(path)`` gives the model's logits. It is written to a
    scratch directory beside ``path`` and renamed into place when complete.

    Raises:
        FileExistsError: ``path`` exists and not ``overwrite`` (checked before any work).
        ValueError: a model without a transformers config, or weights the architecture has no
            place for (see :meth:`pmet_lens.core.hf.HFLayout.to_hf`).
    """
    require_model(model, "pmet_lens.export_hf")
    from transformers import AutoModelForCausalLM

    path = _check_target(path, overwrite)
    config, state = hf_state_dict(model)
    hf_model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            param.copy_(state[name])
    tmp = _scratch(path)
    try:
        hf_model.save_pretrained(tmp)
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
    logger.info("exported %s to %s", model.cfg.model_name, path)
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
    does). transformers' GGUF loader reads the file back.

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
    config, state = hf_state_dict(model)
    n_blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, n_blocks)
    by_gguf: dict[str, str] = {}
    for hf_name in state:
        base, _, suffix = hf_name.rpartition(".")
        mapped = names.get_name(base)
        if mapped is not None:
            by_gguf[f"{mapped}.{suffix}"] = hf_name
    n_head, n_kv = int(config.num_attention_heads), int(config.num_key_value_heads)
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
        for tensor in reader.tensors:
            found = by_gguf.get(tensor.name)
            if found is None:
                raise ValueError(f"GGUF tensor {tensor.name!r} of {source.name} has no transformers counterpart")
            w = state[found]
            if tensor.name.endswith("attn_q.weight"):
                w = _llama_permute(w, n_head)
            elif tensor.name.endswith("attn_k.weight"):
                w = _llama_permute(w, n_kv)
            array = w.numpy().astype(np.float16 if dtype == "f16" and w.ndim > 1 else np.float32)
            writer.add_tensor(tensor.name, array)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
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
def apply_delta(hf_model: Any, path: str | Path, *, check_identity: bool = True) -> Any:
    """Add a saved edit (:meth:`pmet_lens.editing.result.EditResult.save`) to a transformers model's weights, in place.

    Each ΔW is stored in TransformerLens's layout (``blocks.{l}.mlp.W_out`` [d_mlp, d_model],
    ``blocks.{l}.attn.W_O`` [n_heads, d_head, d_model]); its entries are added to the transformers
    parameters they map to (:class:`pmet_lens.core.hf.HFLayout`: module names and orientation from
    the architecture). The model's identity is checked first: the TransformerLens weights hash of
    ``hf_model`` (converted in float32, which costs a second copy of the model) must equal the one
    the file records, i.e. the unedited model the edit was made for.

    Returns:
        ``hf_model`` (edited).

    Raises:
        TypeError: ``hf_model`` is not a transformers model (a HookedTransformer takes
            :meth:`pmet_lens.editing.result.EditResult.load` instead).
        ValueError: not an edit file; a different (or already edited) model; a delta whose shape
            does not fit. In every case the weights are left as they were.
    """
    from safetensors import SafetensorError, safe_open

    from pmet_lens.editing.identity import weights_hash

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
    hooked = hooked_from_hf(hf_model, None, model_name=str(meta.get("model_name", "")), dtype=torch.float32)
    if check_identity:
        current = weights_hash(hooked)
        if current != meta.get("model_hash"):
            raise ValueError(
                f"{path} was made for a different model (weights hash {meta.get('model_hash')}, this model {current}; "
                f"it was saved from {meta.get('model_name')!r}). Load the unedited model it was made for, in float32, "
                "and apply each edit once")
    layout = hf_layout(hf_model.config, hooked.cfg)
    params = dict(hf_model.named_parameters())
    updates: list[tuple[torch.nn.Parameter, torch.Tensor, torch.Tensor]] = []
    for name, delta in deltas.items():
        if name not in layout.index:
            raise ValueError(f"{path}: {name!r} is not a parameter of this {type(hf_model).__name__}")
        if tuple(layout.index[name].shape) != tuple(delta.shape):
            raise ValueError(f"{path}: delta {name} has shape {tuple(delta.shape)}, this model's parameter "
                             f"{tuple(layout.index[name].shape)}")
        flat = delta.reshape(-1)  # [numel] in TransformerLens's layout
        for hf_name, tl_pos, hf_pos in layout.locate(name):
            updates.append((params[hf_name], hf_pos, flat[tl_pos]))
    del hooked
    originals = {id(p): p.detach().clone() for p, _, _ in updates}
    try:
        with torch.no_grad():
            for param, hf_pos, values in updates:
                view = param.data.view(-1)  # [numel], the parameter's own storage
                view[hf_pos.to(view.device)] += values.to(view.device, view.dtype)
    except BaseException:
        with torch.no_grad():
            for param, _, _ in updates:
                param.copy_(originals[id(param)])
        raise
    logger.info("applied %d delta(s) from %s", len(deltas), path)
    return hf_model
