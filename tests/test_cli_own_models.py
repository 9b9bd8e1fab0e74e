"""``pmet-lens calibrate`` and ``pmet-lens export`` run as a user runs them, with clear exits on bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from conftest import _tokenizer
from pmet_lens.core.models import default_gguf_path


def run(*args: str, cwd: Path | None = None, timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmet_lens.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("cli") / "tiny-gpt2"
    config = GPT2Config(vocab_size=49152, n_embd=16, n_layer=2, n_head=2, n_positions=64,
                        architectures=["GPT2LMHeadModel"])
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    _tokenizer(str(default_gguf_path())).save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["calibrate", "export"])
def test_help(command):
    out = run(command, "--help")
    assert out.returncode == 0 and f"pmet-lens {command}" in out.stdout


@pytest.mark.parametrize("args, message", [
    (("export", "--out", "."), "exists; pass --overwrite"),
    (("export", "./no-such-model", "--out", "new-dir"), "does not exist"),
    (("export", "--delta", "missing.safetensors", "--out", "new-dir"), "delta file not found"),
    (("calibrate", "--methods", "rome"), "--methods takes pmet and/or memit"),
    (("calibrate", "--lams", "ten"), "--lams must be comma-separated numbers"),
    (("calibrate", "./no-such-model"), "does not exist"),
])
def test_bad_input_exits_nonzero(tmp_path, args, message):
    out = run(*args, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "new-dir").exists()


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

