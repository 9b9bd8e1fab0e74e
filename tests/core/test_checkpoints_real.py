"""The real default model through transformers: a checkpoint of it loads by path with its logits;
an edited and exported model, reloaded by transformers, states the new fact and keeps unrelated
ones; the GGUF export reads back with transformers' GGUF loader (f32), and `pmet-lens export --format
gguf --dtype f16` writes the same tensors rounded to f16."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import real_hparams
from pmet_lens import DEFAULT_MODEL, apply_delta, edit, export_gguf, export_hf, load_model
from pmet_lens.data import load_counterfact

PROMPTS = ["The Eiffel Tower is located in the city of", "The mother tongue of Danielle Darrieux is"]
EIFFEL = PROMPTS[0]
TOL = 1e-3  # the default model's own parity bound against transformers (tests/core/test_models.py): over 30
# layers TransformerLens's and transformers' float32 kernels differ by up to about 2e-4 in the logits


def _ids(model) -> torch.Tensor:
    enc = [model.to_tokens(p)[0].tolist() for p in PROMPTS]
    n = min(len(e) for e in enc)
    return torch.tensor([e[:n] for e in enc])  # [2, n]


def _prefers(logits_fn, tokenizer, prompt: str, a: str, b: str) -> bool:
    """Whether the next-token log-probability of " a"'s first token beats " b"'s."""
    ids = torch.tensor([tokenizer.encode(prompt)])
    with torch.no_grad():
        lp = logits_fn(ids)[0, -1].log_softmax(-1)
    return bool(lp[tokenizer.encode(" " + a)[0]] > lp[tokenizer.encode(" " + b)[0]])


@pytest.mark.slow
def test_checkpoint_of_the_default_model_loads_by_path(default_model, tmp_path):
    path = export_hf(default_model, tmp_path / "smollm2")
    ids = _ids(default_model)
    with torch.no_grad():
        expected = default_model(ids)
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        torch.testing.assert_close(hf(ids).logits, expected, atol=TOL, rtol=0)
        again = load_model(path, device="cpu")
        assert again.cfg.model_name == DEFAULT_MODEL  # the preset still applies
        assert again.cfg.default_prepend_bos == default_model.cfg.default_prepend_bos
        torch.testing.assert_close(again(ids), expected, atol=TOL, rtol=0)


@pytest.mark.slow
def test_edited_export_states_the_new_fact(default_model, default_hf, real_cov_store, tmp_path):
    fact = load_counterfact(limit=1)[0]  # Danielle Darrieux: French -> English
    hp = real_hparams("memit")
    store = real_cov_store
    tok = default_model.tokenizer
    assert not _prefers(lambda x: default_model(x), tok, fact.text, "English", "French")
    with edit(default_model, [fact], hparams=hp, cov_store=store, progress=False) as result:
        path = export_hf(default_model, tmp_path / "edited")
        result.save(tmp_path / "edit.safetensors")
        ids = _ids(default_model)
        with torch.no_grad():
            edited = default_model(ids)
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, edited, atol=TOL, rtol=0)
    run = lambda x: hf(x).logits  # noqa: E731
    assert _prefers(run, tok, fact.text, "English", "French")  # the new fact
    assert _prefers(run, tok, EIFFEL, "Paris", "London")      # an unrelated one kept
    for prompt in fact.neighborhood_prompts[:5]:              # the subject's neighbours keep theirs
        assert _prefers(lambda x: default_model(x), tok, prompt, "French", "English") == _prefers(
            run, tok, prompt, "French", "English"), prompt
    # the same delta onto transformers' own de-quantised GGUF model (the session's copy: put back after)
    base, _ = default_hf
    originals = {n: p.detach().clone() for n, p in base.named_parameters() if ".mlp." in n}
    try:
        apply_delta(base, tmp_path / "edit.safetensors")
        changed = [n for n, p in base.named_parameters() if n in originals and not torch.equal(p, originals[n])]
        assert changed == [f"model.layers.{layer}.mlp.down_proj.weight" for layer in hp.layers]
        with torch.no_grad():
            torch.testing.assert_close(base(ids).logits, edited, atol=TOL, rtol=0)
    finally:
        with torch.no_grad():
            for n, p in base.named_parameters():
                if n in originals:
                    p.copy_(originals[n])


@pytest.fixture(scope="module")
def gguf_f32(default_model, tmp_path_factory):
    """The default model exported as an f32 GGUF file (once per module)."""
    return export_gguf(default_model, tmp_path_factory.mktemp("gguf") / "smollm2-f32.gguf", dtype="f32")


@pytest.mark.slow
def test_gguf_round_trip(default_model, gguf_f32):
    """transformers' GGUF loader reads the f32 export back with the model's logits."""
    hf = AutoModelForCausalLM.from_pretrained(gguf_f32.parent, gguf_file=gguf_f32.name, dtype=torch.float32).eval()
    ids = _ids(default_model)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, default_model(ids), atol=TOL, rtol=0)
    with pytest.raises(FileExistsError, match="exists; pass overwrite=True"):
        export_gguf(default_model, gguf_f32, dtype="f32")


@pytest.mark.slow
def test_cli_gguf_f16_export_is_the_f32_export_rounded(gguf_f32, tmp_path):
    """`pmet-lens export --format gguf --dtype f16`, run as a user runs it: the same metadata and tensors, in
    the same order, each matrix the f32 file's rounded to f16 (GGUF type F16) and each norm vector the
    f32 file's (F32), so the f32 round trip above covers it."""
    import gguf

    out = tmp_path / "smollm2-f16.gguf"
    done = subprocess.run([sys.executable, "-m", "pmet_lens.cli", "export", "--format", "gguf", "--dtype", "f16",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out} (gguf, f16)" in done.stdout
    f16, f32 = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(gguf_f32))
    assert [t.name for t in f16.tensors] == [t.name for t in f32.tensors] and len(f32.tensors) > 200
    for a, b in zip(f16.tensors, f32.tensors):
        assert list(a.shape) == list(b.shape), a.name
        if np.asarray(b.data).ndim > 1:
            assert a.tensor_type == gguf.GGMLQuantizationType.F16, a.name
            assert np.array_equal(np.asarray(a.data), np.asarray(b.data).astype(np.float16)), a.name
        else:
            assert a.tensor_type == gguf.GGMLQuantizationType.F32, a.name
            assert np.array_equal(np.asarray(a.data), np.asarray(b.data)), a.name
    skip = {"general.file_type"}
    fields = lambda r: {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.") and k not in skip}  # noqa: E731
    assert fields(f16) == fields(f32)
    assert f16.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_F16
