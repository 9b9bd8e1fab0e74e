"""Loading a transformers checkpoint without TransformerLens's weight processing (which, with every
flag off, changes no value but copies a half-precision model to float32 and back) gives the
parameters of TransformerLens's own path bit for bit, in float32 and in bfloat16."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from conftest import _tokenizer
from pmet_lens.core.hf import _tl_config, hooked_from_hf, tl_state_dict
from pmet_lens.core.models import default_gguf_path


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_lean_load_equals_transformer_lens_loading(dtype):
    from transformer_lens import HookedTransformer

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=64, architectures=["LlamaForCausalLM"])
    hf = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    tok = _tokenizer(str(default_gguf_path()))
    lean = hooked_from_hf(hf, tok, model_name="tiny", dtype=dtype)
    cfg = _tl_config(hf.config, dtype, "cpu")
    ref = HookedTransformer(cfg, tokenizer=tok, move_to_device=False, default_padding_side="right")
    ref.load_and_process_state_dict({k: v.to(dtype) for k, v in tl_state_dict(hf, cfg).items()}, fold_ln=False,
                                    center_writing_weights=False, center_unembed=False, fold_value_biases=False,
                                    refactor_factored_attn_matrices=False)
    ours, theirs = lean.state_dict(), ref.state_dict()
    assert ours.keys() == theirs.keys()
    for k in ours:  # parameters and buffers (a float32 attention buffer stays float32 in both)
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    assert all(p.dtype == dtype for p in lean.parameters())
