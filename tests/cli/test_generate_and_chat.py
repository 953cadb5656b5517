"""``minigpt generate`` and ``minigpt chat`` through the real Typer app, on a toy run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from minigpt_cli.config import Config
from minigpt_cli.run import checkpoint, layout

pytestmark = pytest.mark.usefixtures("one_thread", "data_home")  # one thread: toy models


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, byte_tok, toy_model, toy_config) -> Path:
    """A run directory holding ``toy_model`` (untrained) and the byte tokenizer, at step 10."""
    run = tmp_path_factory.mktemp("runs") / "toy"
    cfg = Config()
    cfg.model = toy_config()
    layout.create_run_dir(run)
    layout.write_run_files(run, cfg, byte_tok)
    checkpoint.save_checkpoint(run, 10, toy_model, state={}, training_tensors={}, best=True)
    return run


def test_generate_streams_the_prompt_and_continuation(run_dir, cli):
    args = ("generate", "--model", run_dir, "--prompt", "Hello", "--max-new-tokens", "10",
            "--seed", "3")
    first = cli.invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("Hello")
    assert "tokens/s" in first.stderr and "tokens/s" not in first.stdout
    assert cli.invoke(*args).stdout == first.stdout


def test_generate_json_and_several_samples(run_dir, cli):
    result = cli.invoke("generate", "--model", run_dir, "--prompt", "Hi", "--max-new-tokens", "5",
                        "--num-samples", "2", "--temperature", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["samples"]) == 2 and report["samples"][0]["num_tokens"] == 5
    assert report["settings"]["temperature"] == 0 and report["tokens_per_second"] > 0
    assert report["time_to_first_token_s"] > 0
    text = cli.invoke("generate", "--model", run_dir, "--prompt", "Hi", "--max-new-tokens", "5",
                      "--num-samples", "2", "--temperature", "0").stdout
    assert "sample 1/2" in text and "sample 2/2" in text
    assert text.count("Hi" + report["samples"][0]["text"]) == 2


def test_generate_json_lists_every_warning(run_dir, cli):
    args = ("generate", "--model", run_dir, "--max-new-tokens", "2", "--seed", "1", "--json")
    empty = cli.invoke(*args, "--prompt", "")
    assert empty.exit_code == 0, empty.output
    warnings = json.loads(empty.stdout)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("the prompt is empty")
    assert f"Warning: {warnings[0]}" in " ".join(empty.stderr.split())
    long = json.loads(cli.invoke(*args, "--prompt", "x" * 100).stdout)  # context 32
    assert len(long["warnings"]) == 1 and "only the last" in long["warnings"][0]


def test_generate_prompt_file_skips_a_byte_order_mark(run_dir, tmp_path, cli):
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfHello\n")
    report = cli.ok_json("generate", "--model", run_dir, "--prompt-file", tmp_path / "bom.txt",
                         "--max-new-tokens", "2", "--json")
    assert report["prompt"] == "Hello" and report["prompt_tokens"] == 5
    piped = cli.invoke("generate", "--model", run_dir, "--prompt-file", "-",
                       "--max-new-tokens", "2", "--json", input="\ufeffHello\n")
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["prompt"] == "Hello"


def test_generate_prints_model_text_literally(run_dir, scripted_reply, cli):
    scripted_reply("[bold red]x[/] :smile:")
    result = cli.invoke("generate", "--model", run_dir, "--prompt", "[i]", "--max-new-tokens", "40")
    assert result.stdout == "[i][bold red]x[/] :smile:\n"


def test_generate_reads_stdin_and_stops(run_dir, scripted_reply, cli):
    scripted_reply("abc STOP def")
    result = cli.invoke("generate", "--model", run_dir, "--stop", "STOP", input="prompt\n")
    assert result.stdout == "prompt" + "abc \n"
    scripted_reply("one\ntwo")
    result = cli.invoke("generate", "--model", run_dir, "--prompt", "", "--stop", "\\n")
    assert result.stdout == "one\n"  # '\n' typed in a shell is a newline


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "-1"), ("--top-p", "1.5"), ("--top-k", "-3"), ("--min-p", "2"),
    ("--repetition-penalty", "0"), ("--max-new-tokens", "0"), ("--num-samples", "0"),
    ("--seed", "-1"), ("--quantize", "int3"),
])
def test_generate_rejects_bad_values_before_loading(tmp_path, flag, value, cli):
    result = cli.invoke("generate", "--model", tmp_path / "nowhere", "--prompt", "x", flag, value)
    assert result.exit_code == 1
    assert flag in result.stderr and "nowhere" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_generate_and_chat_quantized(run_dir, cli, mode):
    result = cli.invoke("generate", "--model", run_dir, "--prompt", "Hi", "--max-new-tokens", "6",
                        "--quantize", mode, "--seed", "1", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantize"] == mode and report["samples"][0]["num_tokens"] <= 6
    result = cli.invoke("chat", "--model", run_dir, "--quantize", mode, input="Hi\n/quit\n")
    assert result.exit_code == 0, result.output


def test_chat_command_piped(run_dir, scripted_reply, cli):
    scripted_reply(" Hello.")
    result = cli.invoke("chat", "--model", run_dir, "--template", "chat", input="Hi\n/quit\nmore\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello.\n"


def test_chat_command_reads_messages_until_the_end_of_input(run_dir, scripted_reply, tmp_path, cli):
    scripted_reply(" Fine [b]thanks[/b].")
    saved = tmp_path / "t.json"
    result = cli.invoke("chat", "--model", run_dir, "--template", "chat",
                        input=f"Hi\nHow are you?\n/save {saved}\nBye")  # no newline at the end
    assert result.exit_code == 0, result.output
    assert result.stdout == "Fine [b]thanks[/b].\n\n" * 2 + "Fine [b]thanks[/b].\n"
    raw = json.loads(saved.read_text())
    assert raw["template"] == "chat" and len(raw["turns"]) == 2


def test_chat_command_rejects_stdin_that_is_not_utf8(run_dir, scripted_reply, cli):
    scripted_reply(" Hello.")
    result = cli.invoke("chat", "--model", run_dir, input=b"Hi\n\xff\xfe\n")
    assert result.exit_code == 1
    assert "not UTF-8" in result.stderr and "Traceback" not in result.output


def test_chat_rejects_a_bad_template(run_dir, cli):
    result = cli.invoke("chat", "--model", run_dir, "--template", "fancy")
    assert result.exit_code == 1 and "--template" in result.stderr


def _stdin_of_a_c_utf8_locale(monkeypatch, data: bytes) -> None:
    """stdin as Python opens it in a C or C.UTF-8 locale: bytes that are not UTF-8 come
    through as surrogates instead of an error."""
    import io
    import sys

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data), encoding="utf-8",
                                                       errors="surrogateescape"))


def test_stdin_that_is_not_utf8_is_refused_in_any_locale(run_dir, scripted_reply, monkeypatch,
                                                          capsys):
    import typer

    from minigpt_cli.cli.commands.chat import chat
    from minigpt_cli.cli.commands.generate import read_prompt
    from minigpt_cli.errors import MiniGPTError

    _stdin_of_a_c_utf8_locale(monkeypatch, b"The \xff\xfe")
    with pytest.raises(MiniGPTError, match="not UTF-8"):  # it was 'The \udcff\udcfe'
        read_prompt(None, None)
    _stdin_of_a_c_utf8_locale(monkeypatch, "\ufeffHé\n".encode())
    assert read_prompt(None, None) == "Hé"

    scripted_reply(" Hello.")
    _stdin_of_a_c_utf8_locale(monkeypatch, b"Hi\n\xff\xfe\nmore\n")
    with pytest.raises(typer.Exit) as e:  # the second message was answered
        chat(model=run_dir, template="chat")
    out, err = capsys.readouterr()
    assert e.value.exit_code == 1 and out == "Hello.\n"
    assert "not UTF-8 text (line 2)" in err and "Traceback" not in err


def test_generate_into_a_closed_pipe_ends_quietly(run_dir, monkeypatch, capsys):
    """`minigpt generate | head`: the text streamed after head left ends the command with
    exit code 0 and nothing on stderr, as --json's output does (Rich's own exit was 1)."""
    import errno
    import io
    import os
    import sys

    import typer

    from minigpt_cli.cli import ui
    from minigpt_cli.cli.commands.generate import generate

    class ClosedPipe(io.StringIO):
        def write(self, text):
            raise BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE))

    monkeypatch.setattr(ui.console, "_file", ClosedPipe())
    monkeypatch.setattr(ui.console, "quiet", False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # guarded closes it
    with pytest.raises(typer.Exit) as e:
        generate(model=run_dir, prompt="Hi", max_new_tokens=5, seed=1)
    assert e.value.exit_code == 0
