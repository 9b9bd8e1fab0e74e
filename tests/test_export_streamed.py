"""Streamed export and apply_delta (issue 34): the transformers layout is strided views found by a
one-block probe (no model-sized index maps), the streamed tensors are transformers' own, the weights
hash read through the views equals the loaded model's, and bf16 / fp16 edits export and apply to a
transformers model of their dtype bit for bit (a model of another dtype is refused, naming both)."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

from conftest import _tokenizer
from pmet_lens import PMETHyperParams, apply_delta, edit, export_hf, load_model
from pmet_lens.core.hf import hf_layout
from pmet_lens.core.models import default_gguf_path
from pmet_lens.editing import CovarianceStore
from pmet_lens.editing.identity import HASH_SCHEME, legacy_weights_hash, weights_hash
from pmet_lens.export import _identity, hf_tensors

V = 49152  # the default model's tokenizer
ARCHS = {
    "llama-gqa": lambda: LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
    "gpt2-tied": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=128,
                                    architectures=["GPT2LMHeadModel"]),
    "neox-parallel": lambda: GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                           num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                                           use_parallel_residual=True, architectures=["GPTNeoXForCausalLM"]),
    "gptj": lambda: GPTJConfig(vocab_size=V, n_embd=32, n_layer=3, n_head=4, n_positions=128, rotary_dim=4,
                               architectures=["GPTJForCausalLM"]),
}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
FACT = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}


def _save(kind: str, directory) -> None:
    torch.manual_seed(1)
    hf = AutoModelForCausalLM.from_config(ARCHS[kind]())
    with torch.no_grad():  # random norms and biases, so that a wrong place for them shows
        for name, p in hf.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
    hf.save_pretrained(directory)
    _tokenizer(str(default_gguf_path())).save_pretrained(directory)


@pytest.fixture(scope="module", params=list(ARCHS))
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}"
    _save(request.param, directory)
    return directory


@pytest.fixture(scope="module", params=["llama-gqa", "neox-parallel"])
def half_checkpoint(request, tmp_path_factory):
    """One sequential (Llama, grouped K/V) and one parallel (GPT-NeoX, fused QKV) architecture."""
    directory = tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}"
    _save(request.param, directory)
    return directory


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CovarianceStore(cache_dir=tmp_path_factory.mktemp("cov"), progress=False)


def test_layout_streams_transformers_own_tensors_and_hash(checkpoint):
    """Every streamed transformers tensor equals transformers' own parameter; the layout holds a few
    integers per parameter; the hash read through it equals the loaded model's (both schemes)."""
    model = load_model(checkpoint, device="cpu")
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    config, layout, tensors = hf_tensors(model)
    own = dict(hf.named_parameters())
    streamed = dict(tensors)
    assert list(streamed) == list(own)
    for name, t in streamed.items():
        assert torch.equal(t, own[name].detach()), name
    assert not any(isinstance(v, torch.Tensor) for v in vars(layout).values())  # no model-sized maps
    assert set(layout.places) | set(layout.zeros) == set(layout.tl_params)
    assert _identity(hf, {"hash_scheme": HASH_SCHEME}, layout, "") == weights_hash(model)
    assert _identity(hf, {}, layout, "") == legacy_weights_hash(model)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_half_precision_edit_exports_and_applies_exactly(half_checkpoint, store, dtype, tmp_path):
    """A bf16 / fp16 edit: the export is the edited model in its dtype, the saved delta applied to the
    transformers model of that dtype gives exactly the exported weights; a float32 model is refused
    (both dtypes named), and so is the edited model (a different model)."""
    torch_dtype = DTYPES[dtype]
    checkpoint = half_checkpoint
    model = load_model(checkpoint, device="cpu", dtype=torch_dtype)
    hp = PMETHyperParams(layers=(1, 2), steps=4, cov_tokens=2000, cov_seq_len=64, context_prefixes=())
    result = edit(model, [FACT], hparams=hp, cov_store=store, progress=False)
    out = export_hf(model, tmp_path / "edited")
    assert json.loads((out / "config.json").read_text())["dtype"] == str(torch_dtype)[6:]
    exported = AutoModelForCausalLM.from_pretrained(out, dtype=torch_dtype)
    assert all(p.dtype == torch_dtype for p in exported.parameters())
    again = load_model(out, device="cpu", dtype=torch_dtype)  # the export loads back as the edited model
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters()))
    path = result.save(tmp_path / "edit.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch_dtype)
    apply_delta(hf, path)
    mine = dict(exported.named_parameters())
    for name, p in hf.named_parameters():
        assert torch.equal(p, mine[name]), name
    with pytest.raises(ValueError, match="different model"):
        apply_delta(hf, path)
    f32 = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(ValueError, match=f"{str(torch_dtype)[6:]}.*float32"):
        apply_delta(f32, path)
    result.restore()


def test_layout_probe_is_one_block(checkpoint, monkeypatch):
    """The layout probe converts a one-block model with a small vocabulary, not the model."""
    import pmet_lens.core.hf as hf_module

    seen = []
    real = hf_module.tl_state_dict

    def spy(hf_model, cfg):
        seen.append((cfg.n_layers, cfg.d_vocab, sum(p.numel() for p in hf_model.parameters())))
        return real(hf_model, cfg)

    config = AutoModelForCausalLM.from_pretrained(checkpoint).config
    model = load_model(checkpoint, device="cpu")
    monkeypatch.setattr(hf_module, "tl_state_dict", spy)
    hf_layout(config, model.cfg)
    (layers, vocab, numel), = seen
    assert layers == 1 and vocab < V and numel < sum(p.numel() for p in model.parameters()) / 3
