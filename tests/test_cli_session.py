"""``pmet-lens session`` and ``evaluate --session``: the commands exist and refuse bad input before
loading a model (the full session path is exercised by tests/editing/test_session.py)."""

from __future__ import annotations

import pytest

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
