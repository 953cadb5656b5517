"""The console script (``main``) turns Click's usage errors into one line, as every other
error, and keeps help, ``--version`` and exit codes as they were."""

from __future__ import annotations

import sys

import pytest

from minigpt_cli.cli.app import main


def run_main(monkeypatch, capsys, *args: str) -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "argv", ["minigpt", *args])
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit) as e:
        main()
    out, err = capsys.readouterr()
    return e.value.code, out, err


@pytest.mark.parametrize("args, message, hint", [
    (["train", "--bogus"], "No such option: --bogus", "minigpt train --help"),
    (["generate", "--temperature", "abc"], "'abc' is not a valid float",
     "minigpt generate --help"),
    (["inspect", "nope"], "No such command 'nope'", "minigpt inspect --help"),
    (["chat", "extra"], "unexpected extra argument", "minigpt chat --help"),
    (["train", "--preset"], "'--preset' requires an argument", "minigpt train --help"),
    (["inspect", "model", "--model"], "'--model' requires an argument",
     "minigpt inspect model --help"),
])
def test_a_usage_error_is_one_line(monkeypatch, capsys, args, message, hint):
    code, out, err = run_main(monkeypatch, capsys, *args)
    assert code == 2 and out == ""
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("Error: ") and message in lines[0] and hint in lines[0]
    assert "Traceback" not in err and "╭" not in err


def test_help_and_version_are_unchanged(monkeypatch, capsys):
    code, out, _ = run_main(monkeypatch, capsys, "--version")
    assert code == 0 and out.startswith("minigpt ")
    code, out, _ = run_main(monkeypatch, capsys, "generate", "--help")
    assert code == 0 and "--temperature" in out
    code, out, _ = run_main(monkeypatch, capsys)  # no command: the help, exit 2 as before
    assert code == 2 and "train" in out + capsys.readouterr().err
