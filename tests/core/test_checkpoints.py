"""Real transformers architectures, for real: tiny random transformers models of four architectures
are saved, loaded by path, traced, edited with both methods, exported, reloaded by transformers
and compared (logits to 1e-4), and a saved edit is applied to a transformers model directly."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTJConfig, GPTNeoXConfig, LlamaConfig

from conftest import save_tiny_checkpoint
from pmet_lens import MEMITHyperParams, PMETHyperParams, apply_delta, edit, export_hf, load_model, trace
from pmet_lens.editing import CovarianceStore

V = 49152  # the default model's tokenizer, as in conftest.make_tiny_model
ARCHS = {
    "llama-gqa": lambda: LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                     tie_word_embeddings=False, architectures=["LlamaForCausalLM"]),
    "gpt2": lambda: GPT2Config(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=128,
                               architectures=["GPT2LMHeadModel"]),
    "neox-parallel": lambda: GPTNeoXConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                           num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                                           use_parallel_residual=True, architectures=["GPTNeoXForCausalLM"]),
    "gptj": lambda: GPTJConfig(vocab_size=V, n_embd=32, n_layer=4, n_head=4, n_positions=128, rotary_dim=4,
                               architectures=["GPTJForCausalLM"]),
}
FACT = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
PROMPTS = ["The Eiffel Tower is located in the city of", "The capital of France is"]
TOL = 1e-4




def _ids(tokenizer) -> torch.Tensor:
    enc = [tokenizer.encode(p) for p in PROMPTS]
    n = min(len(e) for e in enc)
    return torch.tensor([e[:n] for e in enc])  # [2, n]


def _hf_logits(path, ids: torch.Tensor) -> torch.Tensor:
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return hf(ids).logits


@pytest.fixture(params=list(ARCHS), scope="module")
def checkpoint(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp("ckpt") / f"tiny-{request.param}"
    save_tiny_checkpoint(ARCHS[request.param](), directory, perturb_norms=True)
    return directory


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return CovarianceStore(cache_dir=tmp_path_factory.mktemp("cov"), progress=False)


def _hparams(cls):
    return cls(layers=(1, 2), steps=4, cov_tokens=2000, cov_seq_len=64, context_prefixes=())


def test_load_by_path_matches_transformers(checkpoint):
    model = load_model(checkpoint, device="cpu")
    assert model.cfg.model_name == checkpoint.name
    ids = _ids(model.tokenizer)
    with torch.no_grad():
        ours = model(ids)
    torch.testing.assert_close(ours, _hf_logits(checkpoint, ids), atol=TOL, rtol=0)
    r = trace(model, PROMPTS[0], "The Eiffel Tower", samples=2)
    assert r.scores.shape[1] == model.cfg.n_layers and torch.isfinite(r.scores[r.subject_range[0]:]).all()


@pytest.mark.parametrize("cls", [PMETHyperParams, MEMITHyperParams], ids=["pmet", "memit"])
def test_edit_export_reload_and_apply_delta(checkpoint, store, cls, tmp_path):
    model = load_model(checkpoint, device="cpu")
    ids = _ids(model.tokenizer)
    with torch.no_grad():
        before = model(ids)
    result = edit(model, [FACT], hparams=_hparams(cls), cov_store=store, progress=False)
    with torch.no_grad():
        after = model(ids)
    assert not torch.allclose(before, after)  # the edit changed the model
    out = export_hf(model, tmp_path / "edited")
    assert json.loads((out / "config.json").read_text())["_name_or_path"] == checkpoint.name
    torch.testing.assert_close(_hf_logits(out, ids), after, atol=TOL, rtol=0)
    # the exported model loads back by path with the same identity and logits
    again = load_model(out, device="cpu")
    assert again.cfg.model_name == model.cfg.model_name
    with torch.no_grad():
        torch.testing.assert_close(again(ids), after, atol=TOL, rtol=0)
    # the saved delta applied to the unedited transformers model gives the edited logits
    result.save(tmp_path / "edit.safetensors")
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    apply_delta(hf, tmp_path / "edit.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, after, atol=TOL, rtol=0)
    # ... and refused on a model it was not made for (here: the already edited one), weights untouched
    snapshot = {k: v.clone() for k, v in hf.state_dict().items()}
    with pytest.raises(ValueError, match="different model"):
        apply_delta(hf, tmp_path / "edit.safetensors")
    assert all(torch.equal(snapshot[k], v) for k, v in hf.state_dict().items())
    result.restore()


def test_bad_paths_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "nope", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model("./no/such/dir", device="cpu")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(str(tmp_path / "model.gguf"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty", device="cpu")


def test_unsupported_architecture_names_it_and_the_supported_ones(tmp_path):
    d = tmp_path / "bert-like"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"architectures": ["BertForMaskedLM"], "model_type": "bert"}))
    with pytest.raises(ValueError, match="'BertForMaskedLM'.*Supported architectures: GPT2LMHeadModel"):
        load_model(d, device="cpu")


def test_existing_export_path_is_refused_and_untouched(checkpoint, tmp_path):
    model = load_model(checkpoint, device="cpu")
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        export_hf(model, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no scratch directory left behind
    export_hf(model, target, overwrite=True)
    assert (target / "config.json").is_file() and not (target / "keep.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_delta_file_checks(checkpoint, tmp_path):
    hf = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    with pytest.raises(FileNotFoundError, match=r"edit file .*missing\.safetensors' does not exist"):
        apply_delta(hf, tmp_path / "missing.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="not a readable safetensors"):
        apply_delta(hf, tmp_path / "junk.safetensors")


def test_delta_files_that_do_not_fit_are_refused_and_change_nothing(tiny_llama_checkpoint, store, tmp_path):
    """apply_delta refuses a safetensors file that is no edit file, a delta for a parameter the model does
    not have, and a delta of the wrong shape, each with its own message and the weights untouched."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    model = load_model(tiny_llama_checkpoint, device="cpu")
    edit(model, [FACT], hparams=_hparams(MEMITHyperParams), cov_store=store, apply=False,
         progress=False).save(tmp_path / "edit.safetensors")
    with safe_open(str(tmp_path / "edit.safetensors"), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    assert sorted(k for k in tensors if k.startswith("delta/")) == ["delta/blocks.1.mlp.W_out", "delta/blocks.2.mlp.W_out"]
    d_mlp, d_model = tensors["delta/blocks.1.mlp.W_out"].shape
    bad = {
        "not-an-edit": ({"x": torch.zeros(2)}, {"format": "something-else"}, "is not a pmet-lens edit file"),
        "unknown-param": ({**tensors, "delta/blocks.9.mlp.W_out": torch.zeros(d_mlp, d_model)}, meta,
                          "'blocks.9.mlp.W_out' is not a parameter of this LlamaForCausalLM"),
        "wrong-shape": ({**tensors, "delta/blocks.2.mlp.W_out": torch.zeros(d_mlp - 1, d_model)}, meta,
                        rf"delta blocks.2.mlp.W_out has shape \({d_mlp - 1}, {d_model}\), this model's parameter "
                        rf"\({d_mlp}, {d_model}\)"),
    }
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_checkpoint, dtype=torch.float32)
    snapshot = {k: v.clone() for k, v in hf.state_dict().items()}
    for name, (content, metadata, message) in bad.items():
        save_file(content, str(tmp_path / f"{name}.safetensors"), metadata=metadata)
        with pytest.raises(ValueError, match=message):
            apply_delta(hf, tmp_path / f"{name}.safetensors")
        assert all(torch.equal(snapshot[k], v) for k, v in hf.state_dict().items()), name
    apply_delta(hf, tmp_path / "edit.safetensors")  # the file they were made from applies
    assert not torch.equal(snapshot["model.layers.1.mlp.down_proj.weight"], hf.state_dict()["model.layers.1.mlp.down_proj.weight"])


def test_gguf_export_refuses_a_bad_dtype_and_a_model_not_from_gguf(tiny_llama_checkpoint, tmp_path):
    from pmet_lens import export_gguf

    model = load_model(tiny_llama_checkpoint, device="cpu")
    with pytest.raises(ValueError, match="dtype must be 'f32' or 'f16', got 'q4_0'"):
        export_gguf(model, tmp_path / "m.gguf", dtype="q4_0")
    with pytest.raises(ValueError, match="'my-tiny-llama' was not loaded from a GGUF file.*export_hf instead"):
        export_gguf(model, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []  # nothing written, no scratch file left
