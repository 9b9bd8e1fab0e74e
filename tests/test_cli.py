"""The four ``pmet-lens`` commands similarity, trace, edit and evaluate: each run as a user runs it
(``python -m pmet_lens.cli``, a subprocess), and clear exits on bad input, checked in-process through
``main(argv)`` (the same code without a new Python per case)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from conftest import run_cli as run
from pmet_lens.data import load_counterfact

COMMANDS = ("similarity", "trace", "edit", "evaluate")
# smallest settings that still run the whole edit pipeline (one layer, 2 steps, tiny covariance)
TINY_HPARAMS = {"layers": [3], "steps": 2, "cov_tokens": 512, "cov_seq_len": 128, "prefixes_per_start": 0}


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
def test_bad_input_exits_nonzero(workdir, args, message, monkeypatch, cli_main, no_model_load):
    monkeypatch.chdir(workdir)
    code, _, err = cli_main(*args)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err


def test_bad_input_in_a_new_process(workdir):
    """The same refusal from a real ``pmet-lens`` process: one line on stderr, exit status 2, no traceback."""
    out = run("edit", "--facts", "broken.json", "--out", "d.safetensors", cwd=workdir)
    assert out.returncode == 2, out.stderr
    assert out.stderr.startswith("error: ") and "not valid JSON" in out.stderr and "Traceback" not in out.stderr


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
def test_input_errors_come_before_the_model_load(workdir, args, message, monkeypatch, cli_main, no_model_load):
    """Each bad input is reported before the model is loaded (loading one fails the test), and nothing is
    written."""
    monkeypatch.chdir(workdir)
    code, _, err = cli_main("-v", *args)
    assert code == 2, err
    assert message in err
    assert "Traceback" not in err
    assert not (workdir / "never.safetensors").exists()


@pytest.fixture
def cli_on_default_model(monkeypatch, default_model):
    """In-process CLI calls get the session's default model instead of loading another copy."""
    import pmet_lens.cli

    def load(name):
        assert name is None, name
        return default_model

    monkeypatch.setattr(pmet_lens.cli, "_load_model", load)


@pytest.mark.slow
def test_edit_then_evaluate(workdir, default_model, monkeypatch, cli_main, cli_on_default_model):
    from pmet_lens.data import wikitext_path
    from pmet_lens.editing import EditResult
    from pmet_lens.evaluation import evaluate_counterfact

    (workdir / "corpus.txt").write_text(wikitext_path()[0].read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    # inline JSON, as `pmet-lens edit --help` shows it (a file is tested in the fast input checks)
    out = run("edit", "--facts", "facts.json", "--hparams", json.dumps(TINY_HPARAMS), "--corpus", "corpus.txt",
              "--out", "delta.safetensors", cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert "edited 1 fact(s) with pmet; wrote delta.safetensors" in out.stdout
    out = run("evaluate", "--delta", "delta.safetensors", "--limit", "1", "--no-generation",
              "--out", "ev.csv", "--summary", "ev.json", cwd=workdir)
    assert out.returncode == 0, out.stderr
    summary = json.loads((workdir / "ev.json").read_text())
    per_record = pd.read_csv(workdir / "ev.csv")
    # what the files hold is the evaluation of the model with that delta applied, done here by the API
    facts = load_counterfact(limit=1)
    with EditResult.load(workdir / "delta.safetensors", default_model, apply=True):
        expected_rows, expected = evaluate_counterfact(default_model, facts, generation=False, progress=False)
    assert summary["n_records"] == 1 and per_record["case_id"].tolist() == [facts[0].case_id]
    for key in ("efficacy", "paraphrase", "neighborhood", "score", "efficacy_magnitude", "neighborhood_magnitude"):
        assert summary[key] == pytest.approx(expected[key], abs=1e-6), key
    for column in ("p_new", "p_true", "paraphrase_magnitude"):
        assert per_record[column][0] == pytest.approx(expected_rows[column][0], rel=1e-5, abs=1e-8), column
    # AlphaEdit as a single mass edit: MEMIT's targets, the null-space projected update (in-process)
    monkeypatch.chdir(workdir)
    code, stdout, err = cli_main("edit", "--facts", "facts.json", "--method", "alphaedit", "--hparams",
                                 json.dumps(TINY_HPARAMS), "--corpus", "corpus.txt", "--out", "alpha.safetensors")
    assert code == 0, err
    assert "edited 1 fact(s) with alphaedit; wrote alpha.safetensors" in stdout
    from safetensors import safe_open

    with safe_open(str(workdir / "alpha.safetensors"), framework="pt") as fh:
        meta = fh.metadata()
        delta_names = [k for k in fh.keys() if k.startswith("delta/")]
    assert meta["method"] == "alphaedit" and json.loads(meta["hparams"])["nullspace"] is True
    assert len(delta_names) == 1  # one layer edited ([3]); its update is the projected one


def test_delta_for_another_model(workdir, tiny_llama_checkpoint, monkeypatch, cli_main):
    """A delta file whose model hash is not this model's, or that is no delta file, is refused with a clear
    message (on a tiny checkpoint: the refusal needs a model, not the default one)."""
    from safetensors.torch import save_file

    meta = {"format": "pmet-lens-edit/1", "method": "pmet", "model_hash": "0" * 16, "model_name": "gpt2",
            "hparams": "{}", "facts": "[]", "prefixes": "[]", "stats": "{}"}
    save_file({"delta/blocks.3.mlp.W_out": torch.zeros(2, 2)}, str(workdir / "other.safetensors"), metadata=meta)
    (workdir / "junk.safetensors").write_text("not a delta file")
    monkeypatch.chdir(workdir)
    model = str(tiny_llama_checkpoint)
    code, _, err = cli_main("evaluate", "--model", model, "--delta", "other.safetensors", "--limit", "1", "--no-generation")
    assert code == 2 and "different model" in err, err
    code, _, err = cli_main("evaluate", "--model", model, "--dataset", "zsre", "--delta", "junk.safetensors", "--limit", "1")
    assert code == 2 and "junk.safetensors" in err and "corrupt" in err, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_similarity_and_trace(workdir, default_model, monkeypatch, cli_main, cli_on_default_model):
    from pmet_lens.analysis.similarity import component_similarity
    from pmet_lens.analysis.tracing import trace
    from pmet_lens.data import load_known_facts

    out = run("similarity", "--limit", "2", "--out", "sim.csv", cwd=workdir)
    assert out.returncode == 0, out.stderr
    sim = pd.read_csv(workdir / "sim.csv")
    expected = component_similarity(default_model, [f.prompt for f in load_known_facts(limit=2)], k=50, progress=False)
    assert len(sim) == 2 * 2 * default_model.cfg.n_layers and list(sim.columns) == list(expected.columns)
    pd.testing.assert_frame_equal(sim, expected.reset_index(drop=True), check_dtype=False, atol=1e-6, rtol=0)
    out = run("trace", "--prompt", "The Eiffel Tower is in", "--subject", "The Eiffel Tower", "--samples", "2",
              "--out", "trace.csv", cwd=workdir)
    assert out.returncode == 0, out.stderr
    r = trace(default_model, "The Eiffel Tower is in", "The Eiffel Tower", samples=2)
    assert f"target {r.target!r}: clean P = {r.high_score:.4f}, corrupted P = {r.low_score:.4f}" in out.stdout
    grid = pd.read_csv(workdir / "trace.csv")
    assert grid["token"].tolist() == r.tokens
    torch.testing.assert_close(torch.tensor(grid.drop(columns="token").to_numpy()), r.scores.double(), atol=1e-5, rtol=0)
    # the averaged run, in-process on the session's model
    monkeypatch.chdir(workdir)
    code, stdout, err = cli_main("trace", "--average", "2", "--samples", "2", "--no-sever", "--out", "avg.csv")
    assert code == 0, err
    assert "averaged over 2 known facts" in stdout
    avg = pd.read_csv(workdir / "avg.csv")
    assert len(avg) == 6 * default_model.cfg.n_layers and set(avg["kind"]) == {"hidden"}
    assert not (workdir / "avg_severed.csv").exists()  # --no-sever: no severed curves
