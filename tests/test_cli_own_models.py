"""``pmet-lens calibrate`` and ``pmet-lens export`` run as a user runs them (a new process) on tiny
checkpoints, ``export --delta`` in-process, and clear exits on bad input (in-process, ``main(argv)``)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import calibrate_best_row, run_cli, save_tiny_checkpoint

run = run_cli


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    config = GPT2Config(vocab_size=49152, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        architectures=["GPT2LMHeadModel"])
    return save_tiny_checkpoint(config, tmp_path_factory.mktemp("cli") / "tiny-gpt2")


@pytest.mark.parametrize("command", ["calibrate", "export"])
def test_help(command):
    out = run(command, "--help")
    assert out.returncode == 0 and f"pmet-lens {command}" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("export", "--out", "."), "exists; pass --overwrite"),
    (("export", "--delta", "missing.safetensors", "--out", "new-dir"), "delta file not found"),
    (("calibrate", "--methods", "rome"), "--methods takes pmet and/or memit"),
    (("calibrate", "--lams", "ten"), "--lams must be comma-separated numbers"),
    (("calibrate", "--clamps", "0.75,-1"), "--clamps must be positive numbers"),
])
def test_bad_input_exits_nonzero(tmp_path, args, message, monkeypatch, cli_main, no_model_load):
    """Refused before any model is loaded (loading one fails the test); nothing written."""
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(*args)
    assert code == 2, err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "new-dir").exists()


@pytest.mark.parametrize("command", ["export", "calibrate"])
def test_a_model_path_that_does_not_exist(tmp_path, command, monkeypatch, cli_main):
    monkeypatch.chdir(tmp_path)
    code, _, err = cli_main(command, "./no-such-model", *(("--out", "new-dir") if command == "export" else ()))
    assert code == 2 and "no-such-model" in err and "does not exist" in err, err
    assert list(tmp_path.iterdir()) == []


def test_export_a_checkpoint(tiny_gpt2, tmp_path):
    out = run("export", str(tiny_gpt2), "--out", str(tmp_path / "copy"))
    assert out.returncode == 0, out.stderr
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        a = AutoModelForCausalLM.from_pretrained(tiny_gpt2).eval()(ids).logits
        b = AutoModelForCausalLM.from_pretrained(tmp_path / "copy").eval()(ids).logits
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    again = run("export", str(tiny_gpt2), "--out", str(tmp_path / "copy"))
    assert again.returncode == 2 and "--overwrite" in again.stderr



def test_export_a_delta_onto_its_checkpoint(tiny_llama_checkpoint, tmp_path, monkeypatch, cli_main):
    """`pmet-lens export CHECKPOINT --delta EDIT`: transformers loads the written checkpoint with the logits of
    the edited model (the delta applied in TransformerLens), not the unedited ones."""
    from pmet_lens import MEMITHyperParams, edit, load_model
    from pmet_lens.editing import CovarianceStore

    model = load_model(tiny_llama_checkpoint, device="cpu")
    ids = torch.tensor([model.tokenizer.encode("The Eiffel Tower is located in the city of")])
    hp = MEMITHyperParams(layers=(1, 2), steps=3, cov_tokens=1000, cov_seq_len=64, context_prefixes=())
    fact = {"prompt": "{} is located in the city of", "subject": "The Eiffel Tower", "target_new": "Rome"}
    with edit(model, [fact], hparams=hp, cov_store=CovarianceStore(False, progress=False), progress=False) as result:
        result.save(tmp_path / "edit.safetensors")
        with torch.no_grad():
            edited = model(ids)
    with torch.no_grad():
        unedited = model(ids)
    monkeypatch.chdir(tmp_path)
    code, stdout, err = cli_main("export", str(tiny_llama_checkpoint), "--delta", "edit.safetensors", "--out", "edited")
    assert code == 0, err
    assert "wrote edited (hf, edited by edit.safetensors)" in stdout.splitlines()
    with torch.no_grad():
        logits = AutoModelForCausalLM.from_pretrained(tmp_path / "edited", dtype=torch.float32).eval()(ids).logits
    torch.testing.assert_close(logits, edited, atol=1e-4, rtol=0)
    assert (logits - unedited).abs().max() > 1e-3


def test_calibrate_a_checkpoint(tiny_llama_checkpoint, tmp_path):
    """`pmet-lens calibrate CHECKPOINT` with tiny settings, as a user runs it: R, the λ search and the preset it
    writes, and the evidence files; the chosen λ is the best row of the search table it wrote."""
    from pmet_lens.editing import PMETHyperParams

    presets, out_dir = tmp_path / "presets", tmp_path / "evidence"
    out = run("calibrate", str(tiny_llama_checkpoint), "--facts", "4", "--any-facts", "--size", "2", "--samples", "2",
              "--boot", "50", "--methods", "pmet", "--tune-facts", "2", "--lams", "10,1000", "--clamps", "0.75",
              "--steps", "2", "--cov-tokens", "1000", "--presets", str(presets), "--out", str(out_dir), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    summary = json.loads((out_dir / "calibrate_summary.json").read_text())
    search = pd.read_csv(out_dir / "calibrate_search.csv")
    curves = pd.read_csv(out_dir / "calibrate_curves.csv")
    assert summary["model"] == "my-tiny-llama" and len(summary["R"]) == 2 and summary["facts"] == 4
    assert sorted(search["lam"]) == [10.0, 1000.0] and set(search["method"]) == {"pmet"}
    best = calibrate_best_row(search, "pmet", PMETHyperParams(steps=2, cov_tokens=1000))
    assert summary["chosen"]["pmet"]["lam"] == best["lam"] and summary["chosen"]["pmet"]["clamp_norm_factor"] == best["clamp"]
    assert f"pmet: λ = {best['lam']:g}, clamp c = {best['clamp']:g}" in out.stdout
    assert curves["layer"].tolist() == [0, 1, 2, 3] and curves.loc[curves["in_R"], "layer"].tolist() == summary["R"]
    assert (out_dir / "calibrate.html").stat().st_size > 1000
    editing = json.loads((presets / "editing.json").read_text())["my-tiny-llama"]
    layers = json.loads((presets / "critical_layers.json").read_text())["my-tiny-llama"]
    assert editing["pmet"]["lam"] == best["lam"] and editing["pmet"]["steps"] == 2 and layers["layers"] == summary["R"]
