"""``pmet-lens session`` (and ``--resume``) and ``evaluate --session``: bad input is refused before a model is
loaded, and a session on a tiny checkpoint runs to success, resumes, and is evaluated (the session's
algebra itself is tested in tests/editing/test_session.py)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli
from pmet_lens.cli import build_parser, main


def test_session_subcommand_parses():
    args = build_parser().parse_args(["session", "--facts", "f.json", "--batch", "5", "--out", "s.safetensors",
                                      "--method", "pmet+ns"])
    assert args.batch == 5 and args.method == "pmet+ns" and not args.resume


@pytest.mark.parametrize("argv, message", [
    (["session", "--facts", "missing.json", "--batch", "2", "--out", "s.safetensors"], "facts file"),
    (["evaluate", "--session", "missing.safetensors"], "session file"),
])
def test_missing_files_are_clear_errors(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_resume_without_a_file_and_bad_batch_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "f.json").write_text('[{"subject": "Eiffel Tower", "prompt": "The {} is in", "target_new": "Rome"}]')
    assert main(["session", "--facts", "f.json", "--batch", "2", "--out", "none.safetensors", "--resume"]) == 2
    assert "no session file" in capsys.readouterr().err
    assert main(["session", "--facts", "f.json", "--batch", "0", "--out", "s.safetensors"]) == 2
    assert "--batch" in capsys.readouterr().err


# smallest settings that run the whole session pipeline on the tiny checkpoint (its layers are 0..3)
TINY_SESSION = {"layers": [1, 2], "steps": 2, "cov_tokens": 1000, "cov_seq_len": 64, "prefixes_per_start": 0}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from pmet_lens.data import load_counterfact, wikitext_path

    d = tmp_path_factory.mktemp("cli_session")
    (d / "facts.json").write_text(json.dumps([f.to_counterfact() for f in load_counterfact(limit=3)]))
    (d / "corpus.txt").write_text(wikitext_path()[0].read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    return d


def _batch_lines(stdout: str) -> list[str]:
    """What the command reports per batch (TransformerLens prints its own lines when a model loads)."""
    return [line for line in stdout.splitlines() if line.startswith("batch ")]


def _session(model: str, *args: str) -> list[str]:
    return ["session", "--model", model, "--facts", "facts.json", "--batch", "1", "--corpus", "corpus.txt", *args]


def test_session_resume_and_evaluate_session(workdir, tiny_llama_checkpoint, monkeypatch, cli_main):
    """`pmet-lens session` (a new process, as a user runs it) writes two batches; `--resume` adds the third;
    the file equals one uninterrupted run's, bit for bit; `evaluate --session` scores the model with all
    three batches' ΔW added."""
    from pmet_lens import load_model
    from pmet_lens.data import load_counterfact
    from pmet_lens.editing.session import EditSession
    from pmet_lens.evaluation import evaluate_counterfact

    model = str(tiny_llama_checkpoint)
    preset = ("--method", "alphaedit", "--preset", "SmolLM2-135M-Instruct", "--hparams", json.dumps(TINY_SESSION))
    out = run_cli(*_session(model, *preset, "--limit", "2", "--out", "resumed.safetensors"), cwd=workdir)
    assert out.returncode == 0, out.stderr
    assert _batch_lines(out.stdout) == [f"batch {b}/2: 1 fact(s); wrote resumed.safetensors" for b in (1, 2)]
    meta, _ = EditSession.read(workdir / "resumed.safetensors")
    assert len(json.loads(meta["batches"])) == 2
    monkeypatch.chdir(workdir)
    code, stdout, err = cli_main(*_session(model, "--out", "resumed.safetensors", "--resume"))
    assert code == 0, err
    assert _batch_lines(stdout) == ["batch 3/3: 1 fact(s); wrote resumed.safetensors"]
    code, stdout, err = cli_main(*_session(model, *preset, "--out", "whole.safetensors"))
    assert code == 0, err
    resumed, whole = EditSession.read(workdir / "resumed.safetensors"), EditSession.read(workdir / "whole.safetensors")
    def timeless(meta):  # a batch's wall time is the one entry two runs may not share
        batches = json.loads(meta["batches"])
        for batch in batches:
            assert batch["metrics"].pop("seconds") > 0
        return {**meta, "batches": batches}

    assert timeless(resumed[0]) == timeless(whole[0])  # hparams, prefixes, facts, statistics, model identity
    facts = load_counterfact(limit=3)
    assert [b["facts"][0]["case_id"] for b in json.loads(whole[0]["batches"])] == [f.case_id for f in facts]
    assert json.loads(whole[0]["hparams"])["method"] == "alphaedit"
    assert resumed[1].keys() == whole[1].keys() and all(torch.equal(resumed[1][k], whole[1][k]) for k in whole[1])
    assert sum(k.startswith("batch2/delta/") for k in whole[1]) == 2  # W_out of layers 1 and 2

    code, _, err = cli_main("evaluate", "--model", model, "--session", "whole.safetensors", "--limit", "3",
                            "--no-generation", "--summary", "ev.json")
    assert code == 0, err
    summary = json.loads((workdir / "ev.json").read_text())
    # the reference: the checkpoint with every batch's ΔW added by hand
    hooked = load_model(tiny_llama_checkpoint, device="cpu")
    _, unedited = evaluate_counterfact(hooked, facts, generation=False, progress=False)
    params = dict(hooked.named_parameters())
    with torch.no_grad():
        for key in sorted(k for k in whole[1] if "/delta/" in k):
            params[key.split("/", 2)[2]] += whole[1][key].to(torch.float32)
    _, edited = evaluate_counterfact(hooked, facts, generation=False, progress=False)
    # (a tiny random model's probabilities are ~1e-5: compare magnitudes relatively)
    for key in ("efficacy", "paraphrase", "neighborhood", "efficacy_magnitude", "neighborhood_magnitude"):
        assert summary[key] == pytest.approx(edited[key], rel=1e-4, abs=1e-15), key
    assert summary["efficacy_magnitude"] != pytest.approx(unedited["efficacy_magnitude"], rel=1e-3, abs=0)
