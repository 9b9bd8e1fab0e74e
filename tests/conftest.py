"""Shared fixtures: tiny random HookedTransformers covering every architecture path, and the
real default model (session-scoped, loaded once; converted weights are cached on disk)."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path
from types import ModuleType

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig
from transformers import AutoTokenizer

# Presets a user wrote on this machine (pmet-lens calibrate, tune scripts) must not change what the
# tests see: the suite (and every CLI subprocess it starts) reads an empty user preset directory.
# The covariance and model caches stay where they are, so their files are reused.
os.environ["PMET_LENS_PRESETS"] = tempfile.mkdtemp(prefix="pmet_lens_test_presets_")

TINY_VARIANTS = {
    # id: (parallel_attn_mlp, normalization_type, gated_mlp)
    "seq-rms-gated": (False, "RMS", True),   # Llama / SmolLM2 layout
    "seq-ln": (False, "LN", False),          # GPT-2 layout
    "par-ln": (True, "LN", False),           # GPT-J / GPT-NeoX layout
    "par-rms-gated": (True, "RMS", True),
}


def make_tiny_model(parallel: bool, norm: str, gated: bool, seed: int = 0, n_layers: int = 4) -> HookedTransformer:
    """A tiny random model with the default model's tokenizer (so real prompts tokenise)."""
    from pmet_lens.core.models import default_gguf_path

    torch.manual_seed(seed)
    cfg = HookedTransformerConfig(
        n_layers=n_layers, d_model=16, d_head=4, n_heads=4, d_mlp=32, n_ctx=64,
        d_vocab=49152, act_fn="silu" if gated else "gelu", normalization_type=norm,
        parallel_attn_mlp=parallel, gated_mlp=gated, positional_embedding_type="rotary" if gated else "standard",
        default_prepend_bos=False, seed=seed, device="cpu",
    )
    path = default_gguf_path()
    tok = _tokenizer(str(path))
    model = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    # random LN scales/biases so that norm affine parameters matter in every test
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".w",)) and p.ndim == 1:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif name.endswith((".b",)) and p.ndim == 1:
                p.copy_(0.1 * torch.randn_like(p))
    model.eval()
    return model


_TOK_CACHE: dict[str, object] = {}


def _tokenizer(path: str):
    if path not in _TOK_CACHE:
        from pathlib import Path

        p = Path(path)
        _TOK_CACHE[path] = AutoTokenizer.from_pretrained(p.parent, gguf_file=p.name)
    return _TOK_CACHE[path]


@pytest.fixture(params=list(TINY_VARIANTS), scope="module")
def tiny_model(request) -> HookedTransformer:
    """Each tiny architecture variant in turn (sequential/parallel x RMS/LN)."""
    return make_tiny_model(*TINY_VARIANTS[request.param])


@pytest.fixture(scope="session")
def default_model() -> HookedTransformer:
    """The real embedded default model, SmolLM2-135M-Instruct (loaded once per session)."""
    from pmet_lens import load_model

    return load_model()


def load_analysis(name: str) -> ModuleType:
    """Import one of the repo's ``analyses/*.py`` scripts (not a package) by name, e.g. ``"tune_editing"``."""
    path = Path(__file__).resolve().parents[1] / "analyses" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
