"""The four ``pmet-lens`` commands run as a user runs them (``python -m pmet_lens.cli``, subprocess),
including clear non-zero exits on bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pmet_lens.data import load_counterfact

COMMANDS = ("similarity", "trace", "edit", "evaluate")
# smallest settings that still run the whole edit pipeline (one layer, 2 steps, tiny covariance)
TINY_HPARAMS = {"layers": [3], "steps": 2, "cov_tokens": 512, "cov_seq_len": 128, "prefixes_per_start": 0}


def run(*args: str, cwd: Path | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pmet_lens.cli", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("cli")
    (d / "facts.json").write_text(json.dumps([f.to_counterfact() for f in load_counterfact(limit=1)]))
    (d / "broken.json").write_text('[{"case_id": 1, "requested_rewrite": ')
    (d / "bad_record.json").write_text(json.dumps([{"case_id": 7, "requested_rewrite": {"prompt": "{} is", "subject": "X"}}]))
    (d / "one_object.json").write_text(json.dumps(load_counterfact(limit=1)[0].to_counterfact()))
    (d / "bad_hp.json").write_text(json.dumps({"steps": 0}))
    return d


@pytest.mark.parametrize("command", COMMANDS)
def test_help(command):
    out = run(command, "--help")
    assert out.returncode == 0
    assert f"pmet-lens {command}" in out.stdout
    assert "``" not in out.stdout  # plain text, no RST markup


def test_top_level_help_is_plain_text():
    out = run("--help")
    assert out.returncode == 0 and "similarity" in out.stdout
    assert "``" not in out.stdout


def test_main_module_and_no_command():
    out = subprocess.run([sys.executable, "-m", "pmet_lens", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "similarity" in out.stdout
    assert run().returncode != 0


@pytest.mark.parametrize("args, message", [
    (("edit", "--facts", "missing.json", "--out", "d.safetensors"), "facts file not found"),
    (("edit", "--facts", "broken.json", "--out", "d.safetensors"), "not valid JSON"),
    (("edit", "--facts", "bad_record.json", "--out", "d.safetensors"), "case_id=7"),
    (("edit", "--facts", "facts.json", "--preset", "gpt-5", "--out", "d.safetensors"), "unknown preset 'gpt-5'"),
    (("edit", "--facts", "facts.json", "--method", "serac", "--out", "d.safetensors"), "invalid choice: 'serac'"),
    (("edit", "--facts", "facts.json", "--corpus", "missing.txt", "--out", "d.safetensors"), "corpus file not found"),
    (("evaluate", "--records", "missing.json"), "records file not found"),
    (("evaluate", "--records", "broken.json"), "not valid JSON"),
    (("evaluate", "--delta", "missing.safetensors"), "delta file not found"),
    (("similarity", "--facts", "missing.json"), "known-facts file not found"),
    (("trace",), "give either --prompt"),
])
def test_bad_input_exits_nonzero(workdir, args, message):
    out = run(*args, cwd=workdir)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr


EDIT = ("edit", "--facts", "facts.json", "--out", "never.safetensors")


@pytest.mark.parametrize("args, message", [
    # a single JSON object where a list of records belongs
    (("edit", "--facts", "one_object.json", "--out", "never.safetensors"), "must hold a JSON list of records"),
    # --hparams inline, exactly as --help shows it: parsed as JSON, then checked
    ((*EDIT, "--hparams", '{"lam": -1}'), "bad hyper-parameters in --hparams: lam must be a finite number > 0"),
    ((*EDIT, "--hparams", '{"lamb": 600}'), "unknown hyper-parameter(s) in --hparams: ['lamb']"),
    ((*EDIT, "--hparams", '{lam: 600}'), "--hparams is not valid JSON"),
    ((*EDIT, "--method", "memit", "--hparams", '{"method": "pmet"}'), "names method 'pmet' but --method is 'memit'"),
    # each method's own fields: FT-W has no λ, ROME takes one layer
    ((*EDIT, "--method", "ft-w", "--hparams", '{"lam": 600}'), "unknown hyper-parameter(s) in --hparams: ['lam']"),
    ((*EDIT, "--method", "rome", "--hparams", '{"layers": [3, 4]}'), "rome edits one layer"),
    # --hparams as a file
    ((*EDIT, "--hparams", "bad_hp.json"), "bad hyper-parameters in bad_hp.json: steps must be an int >= 1"),
    ((*EDIT, "--hparams", "missing.json"), "hparams file not found"),
    ((*EDIT, "--preset", "gpt-5"), "unknown preset 'gpt-5'"),
    (("trace", "--prompt", "The Eiffel Tower is in"), "--prompt needs --subject"),
])
def test_input_errors_come_before_the_model_load(workdir, args, message):
    """Each bad input is reported before the model is loaded (the CLI logs "loading model" with -v),
    and nothing is written."""
    out = run("-v", *args, cwd=workdir)
    assert out.returncode == 2, out.stderr
    assert message in out.stderr
    assert "Traceback" not in out.stderr
    assert "loading model" not in out.stderr
    assert not (workdir / "never.safetensors").exists()


@pytest.mark.slow
def test_edit_then_evaluate(workdir):
    from pmet_lens.data import wikitext_path

    (workdir / "corpus.txt").write_text(wikitext_path()[0].read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    # inline JSON, as `pmet-lens edit --help` shows it (a file is tested in the fast input checks)
    out = run("edit", "--facts", "facts.json", "--hparams", json.dumps(TINY_HPARAMS), "--corpus", "corpus.txt",
              "--out", "delta.safetensors", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert (workdir / "delta.safetensors").is_file()
    out = run("evaluate", "--delta", "delta.safetensors", "--limit", "1", "--no-generation",
              "--out", "ev.csv", "--summary", "ev.json", cwd=workdir)
    assert out.returncode == 0, out.stderr
    summary = json.loads((workdir / "ev.json").read_text())
    assert summary["n_records"] == 1 and 0.0 <= summary["efficacy"] <= 1.0
    assert "case_id" in (workdir / "ev.csv").read_text()
    # AlphaEdit as a single mass edit: MEMIT's targets, the null-space projected update
    out = run("edit", "--facts", "facts.json", "--method", "alphaedit", "--hparams", json.dumps(TINY_HPARAMS),
              "--corpus", "corpus.txt", "--out", "alpha.safetensors", cwd=workdir)
    assert out.returncode == 0, out.stderr
    from safetensors import safe_open

    with safe_open(str(workdir / "alpha.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        delta_names = [k for k in fh.keys() if k.startswith("delta/")]
    assert meta["method"] == "alphaedit" and json.loads(meta["hparams"])["nullspace"] is True
    assert len(delta_names) == 1  # one layer edited ([3]); its update is the projected one


@pytest.mark.slow
def test_delta_for_another_model(workdir):
    """A delta file whose model hash is not this model's is refused with a clear message."""
    import torch
    from safetensors.torch import save_file

    meta = {"format": "pmet-lens-edit/1", "method": "pmet", "model_hash": "0" * 16, "model_name": "gpt2",
            "hparams": "{}", "facts": "[]", "prefixes": "[]", "stats": "{}"}
    save_file({"delta/blocks.3.mlp.W_out": torch.zeros(2, 2)}, str(workdir / "other.safetensors"), metadata=meta)
    (workdir / "junk.safetensors").write_text("not a delta file")
    out = run("evaluate", "--delta", "other.safetensors", "--limit", "1", "--no-generation", cwd=workdir)
    assert out.returncode == 2 and "different model" in out.stderr, out.stderr
    out = run("evaluate", "--dataset", "zsre", "--delta", "junk.safetensors", "--limit", "1", cwd=workdir)
    assert out.returncode == 2 and "junk.safetensors" in out.stderr and "corrupt" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_similarity_and_trace(workdir):
    out = run("similarity", "--limit", "2", "--out", "sim.csv", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert (workdir / "sim.csv").read_text().count("\n") > 10
    out = run("trace", "--prompt", "The Eiffel Tower is in", "--subject", "The Eiffel Tower", "--samples", "2",
              "--out", "trace.csv", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "clean P" in out.stdout and (workdir / "trace.csv").is_file()
    out = run("trace", "--average", "2", "--samples", "2", "--no-sever", "--out", "avg.csv", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "averaged over" in out.stdout and "token_class" in (workdir / "avg.csv").read_text()
    assert not (workdir / "avg_severed.csv").exists()  # --no-sever: no severed curves
