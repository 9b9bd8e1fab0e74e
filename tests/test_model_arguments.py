"""What a user passes as the model: ``pmet_lens.calibrate`` takes what ``load_model`` takes (a checkpoint
directory, a .gguf file, a name, None) as well as a loaded model; every other public function that takes a
model refuses anything but a loaded HookedTransformer with one TypeError that says what to pass
(``pmet_lens.core.models.require_model``), before any work; ``apply_delta`` refuses anything but a
transformers model the same way; and ``EditSession.load`` on a model that already carries edits says so."""

from __future__ import annotations

import re

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import pmet_lens
from conftest import TINY_VARIANTS, _tokenizer, make_tiny_model
from pmet_lens.analysis.layer_scan import scan_layers
from pmet_lens.calibration import search_lambda
from pmet_lens.core.models import default_gguf_path
from pmet_lens.editing import CovarianceStore, MEMITHyperParams
from pmet_lens.editing.nullspace import NullspaceStore
from pmet_lens.evaluation.perplexity import perplexity, wikitext_sample

FACT = {"subject": "Danielle Darrieux", "prompt": "The mother tongue of {} is", "target_new": "English",
        "target_true": "French"}
SCAN = {"n_facts": 3, "known_only": False, "size": 2, "samples": 2, "n_boot": 20, "methods": (), "write": False,
        "progress": False}
"""A small R-only calibration (the λ search has its own tests in tests/test_calibration.py)."""


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny Llama saved as a transformers checkpoint directory, with the default model's tokenizer."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=49152, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         architectures=["LlamaForCausalLM"])
    path = tmp_path_factory.mktemp("models") / "my-tiny-llama"
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    _tokenizer(str(default_gguf_path())).save_pretrained(path)
    return path


def _calls(tmp_path):
    """Each public entry point that takes a model, called as a user would with ``model`` in its place."""
    facts = pmet_lens.load_known_facts(limit=2)
    records = pmet_lens.load_counterfact(limit=1)
    zsre = pmet_lens.load_zsre(limit=1)
    return {
        "pmet_lens.trace": lambda m: pmet_lens.trace(m, "The Eiffel Tower is located in", "The Eiffel Tower"),
        "pmet_lens.average_traces": lambda m: pmet_lens.average_traces(m, facts),
        "pmet_lens.component_similarity": lambda m: pmet_lens.component_similarity(m, [f.prompt for f in facts]),
        "pmet_lens.analysis.layer_scan.scan_layers": lambda m: scan_layers(m, facts),
        "pmet_lens.edit": lambda m: pmet_lens.edit(m, [FACT], method="pmet"),
        "EditSession": lambda m: pmet_lens.EditSession(m, method="memit"),
        "EditSession.load": lambda m: pmet_lens.EditSession.load(tmp_path / "run.safetensors", m),
        "EditResult.load": lambda m: pmet_lens.EditResult.load(tmp_path / "edit.safetensors", m),
        "pmet_lens.evaluate_counterfact": lambda m: pmet_lens.evaluate_counterfact(m, records),
        "pmet_lens.evaluate_zsre": lambda m: pmet_lens.evaluate_zsre(m, zsre),
        "pmet_lens.evaluation.perplexity.wikitext_sample": lambda m: wikitext_sample(m),
        "pmet_lens.evaluation.perplexity.perplexity": lambda m: perplexity(m, None),
        "pmet_lens.calibration.search_lambda": lambda m: search_lambda(m, "pmet", [1, 2], records),
        "pmet_lens.export_hf": lambda m: pmet_lens.export_hf(m, tmp_path / "exported"),
        "pmet_lens.export_gguf": lambda m: pmet_lens.export_gguf(m, tmp_path / "exported.gguf"),
        "pmet_lens.dashboard": lambda m: pmet_lens.dashboard(m, records[0], html_path=tmp_path / "board.html"),
    }


ENTRIES = list(_calls(None))


@pytest.mark.parametrize("entry", ENTRIES)
def test_a_name_or_path_instead_of_a_model_is_one_clear_type_error(entry, tmp_path):
    call = _calls(tmp_path)[entry]
    expected = (rf"^{re.escape(entry)} needs a HookedTransformer loaded with pmet_lens\.load_model\(\.\.\.\); "
                r"got str 'path/to/my-model'\. Load it first: model = pmet_lens\.load_model\('path/to/my-model'\), "
                r"then pass model\. To calibrate a checkpoint by path use pmet_lens\.calibrate\(path\)$")
    with pytest.raises(TypeError, match=expected):
        call("path/to/my-model")
    with pytest.raises(TypeError, match=rf"^{re.escape(entry)} needs .* got None\. Load it first: "
                                        r"model = pmet_lens\.load_model\(\)"):
        call(None)
    assert list(tmp_path.iterdir()) == []  # refused before anything was written


@pytest.mark.parametrize("entry", ["pmet_lens.trace", "pmet_lens.edit", "pmet_lens.export_hf", "pmet_lens.dashboard"])
def test_a_transformers_model_instead_of_a_hooked_one_says_how_to_convert_it(entry, tmp_path):
    hf = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=64, n_embd=8, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(TypeError, match=rf"^{re.escape(entry)} needs a HookedTransformer .* got GPT2LMHeadModel "
                                        r"\(from transformers\)\. This is a transformers model: load its checkpoint "
                                        r"directory with pmet_lens\.load_model\(path\)"):
        _calls(tmp_path)[entry](hf)
    with pytest.raises(TypeError, match=rf"^{re.escape(entry)} needs .* got int 3\.$"):
        _calls(tmp_path)[entry](3)


def test_apply_delta_refuses_a_hooked_model_and_a_path(tmp_path):
    hooked = make_tiny_model(*TINY_VARIANTS["seq-ln"])
    with pytest.raises(TypeError, match=r"^pmet_lens\.apply_delta needs a transformers model .* got HookedTransformer "
                                        r"\(from transformer_lens\)\. For a model loaded with pmet_lens\.load_model, "
                                        r"load the saved edit with pmet_lens\.EditResult\.load\(path, model, apply=True\)"):
        pmet_lens.apply_delta(hooked, tmp_path / "edit.safetensors")
    with pytest.raises(TypeError, match=r"^pmet_lens\.apply_delta needs a transformers model .* got str 'gpt2'\. "
                                        r"Load the model first"):
        pmet_lens.apply_delta("gpt2", tmp_path / "edit.safetensors")


# ----------------------------------------------------------------------------- calibrate by path
def test_calibrate_takes_a_checkpoint_path_as_the_cli_does(tiny_checkpoint, tmp_path, monkeypatch):
    """``calibrate("path")`` loads the checkpoint with load_model and gives the result of calibrating the
    loaded model (same seeds: the same curves, bit for bit)."""
    monkeypatch.setenv("PMET_LENS_CACHE", str(tmp_path / "cache"))
    by_path = pmet_lens.calibrate(str(tiny_checkpoint), **SCAN)
    assert by_path.model_name == "my-tiny-llama"
    loaded = pmet_lens.calibrate(pmet_lens.load_model(tiny_checkpoint), **SCAN)
    assert by_path.layers == loaded.layers
    assert torch.equal(by_path.scan.plain, loaded.scan.plain) and torch.equal(by_path.scan.severed, loaded.scan.severed)


def test_calibrate_refuses_what_load_model_does_not_take(tmp_path):
    with pytest.raises(TypeError, match=r"^pmet_lens\.calibrate takes a HookedTransformer loaded with "
                                        r"pmet_lens\.load_model\(\.\.\.\), or what load_model takes: a transformers "
                                        r"checkpoint directory, a \.gguf file, a TransformerLens model name, or None "
                                        r"for the default model; got int 3$"):
        pmet_lens.calibrate(3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        pmet_lens.calibrate(str(tmp_path / "no-such-model"), **SCAN)
    # settings are checked before a model is loaded: a bad method is reported even for a path that does not exist
    with pytest.raises(ValueError, match="methods must be among"):
        pmet_lens.calibrate(str(tmp_path / "no-such-model"), methods=("rome",))


def test_calibrate_hands_none_and_a_gguf_path_to_load_model(monkeypatch):
    """``calibrate()`` and ``calibrate("model.gguf")`` load the model with ``load_model`` exactly as given (the
    default model, the GGUF file) and calibrate what it returns."""
    import pmet_lens.calibration as calibration

    tiny = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])
    asked = []
    monkeypatch.setattr(calibration, "load_model", lambda name: asked.append(name) or tiny)
    expected = pmet_lens.calibrate(tiny, **SCAN)
    for given in (None, "my-model.Q4_1.gguf"):
        result = pmet_lens.calibrate(given, **SCAN)
        assert result.layers == expected.layers and torch.equal(result.scan.plain, expected.scan.plain)
    assert asked == [None, "my-model.Q4_1.gguf"]


@pytest.mark.slow
def test_calibrate_loads_the_default_models_gguf_file():
    """``calibrate`` on the embedded default model's .gguf file, as a user with that file would call it."""
    result = pmet_lens.calibrate(str(default_gguf_path()), **{**SCAN, "n_facts": 1, "samples": 1, "n_boot": 0})
    assert result.model_name == "SmolLM2-135M-Instruct" and len(result.layers) == 2 and result.scan.n_facts == 1


# ----------------------------------------------------------------------------- sessions on an edited model
@pytest.fixture(scope="module")
def saved_session(tmp_path_factory):
    """A one-batch MEMIT session on a tiny model, saved; the session's (edited) model is returned with it."""
    model = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])
    hp = MEMITHyperParams(layers=(1, 2), cov_tokens=1500, cov_seq_len=64, steps=3, lam=0.5,
                          context_prefixes=("Once upon a time",))
    folder = tmp_path_factory.mktemp("session")
    stores = {"cov_store": CovarianceStore(folder / "cov", progress=False), "nullspace_store": NullspaceStore(False)}
    session = pmet_lens.EditSession(model, hparams=hp, progress=False, **stores)
    session.edit([FACT])
    return session.save(folder / "run.safetensors"), model, stores


def test_loading_a_session_onto_its_own_edited_model_says_it_may_be_edited(saved_session):
    path, edited, stores = saved_session
    before = {k: v.clone() for k, v in edited.state_dict().items()}
    with pytest.raises(ValueError, match=r"was saved from a session on 'custom', and this model has that name but "
                                         r"other weights .*: it may already be edited, e\.g\. the same session's "
                                         r"model.* Load the model fresh \(model = pmet_lens\.load_model\(\.\.\.\), "
                                         r"no edit applied\) and call EditSession\.load\(path, model\) on it"):
        pmet_lens.EditSession.load(path, edited, progress=False, **stores)
    assert all(torch.equal(v, before[k]) for k, v in edited.state_dict().items())  # nothing written into it
    fresh = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"])  # loaded fresh: the session resumes
    assert len(pmet_lens.EditSession.load(path, fresh, progress=False, **stores)) == 1


def test_loading_a_session_onto_another_model_names_both(saved_session):
    path, _, stores = saved_session
    other = make_tiny_model(*TINY_VARIANTS["seq-rms-gated"], seed=1)
    other.cfg.model_name = "someone-elses-model"
    with pytest.raises(ValueError, match=r"belongs to another model \(weights hash \w+ of 'custom'; this model, "
                                         r"'someone-elses-model', has \w+\)\. Load it on the unedited model"):
        pmet_lens.EditSession.load(path, other, progress=False, **stores)
