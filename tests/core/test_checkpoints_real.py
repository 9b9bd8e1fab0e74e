"""The real default model through transformers: a checkpoint of it loads by path with its logits;
an edited and exported model, reloaded by transformers, states the new fact and keeps unrelated
ones; the GGUF export reads back with transformers' GGUF loader."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from pmet_lens import DEFAULT_MODEL, apply_delta, edit, export_gguf, export_hf, load_model
from pmet_lens.data import load_counterfact
from pmet_lens.editing import CovarianceStore, preset

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
def test_edited_export_states_the_new_fact(default_model, tmp_path):
    fact = load_counterfact(limit=1)[0]  # Danielle Darrieux: French -> English
    hp = preset(DEFAULT_MODEL, "memit").with_(cov_tokens=8192)
    store = CovarianceStore(tmp_path / "cov", progress=False)
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
    # the same delta onto transformers' own de-quantised GGUF model
    from pmet_lens.core.models import load_default_hf

    base, _ = load_default_hf()
    apply_delta(base, tmp_path / "edit.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(base(ids).logits, edited, atol=TOL, rtol=0)


@pytest.mark.slow
# f16 rounds every weight to an 11-bit significand; over 30 layers that moves logits of size ~20 by up to ~0.06
@pytest.mark.parametrize("dtype,tol", [("f32", TOL), ("f16", 1e-1)])
def test_gguf_round_trip(default_model, tmp_path, dtype, tol):
    path = export_gguf(default_model, tmp_path / f"smollm2-{dtype}.gguf", dtype=dtype)
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = _ids(default_model)
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, default_model(ids), atol=tol, rtol=0)
    with pytest.raises(FileExistsError):
        export_gguf(default_model, path, dtype=dtype)
