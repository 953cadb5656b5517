"""The chat loop: prompt-toolkit keys in, rich text out; and piped chat."""

from __future__ import annotations

import io
import shutil
import signal
from pathlib import Path

import pytest
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console

from minigpt_cli.chat.session import ChatSession
from minigpt_cli.chat.template import Turn
from minigpt_cli.cli.repl import SlashCompleter, run_jsonl, run_piped, run_repl
from minigpt_cli.generate import engine
from minigpt_cli.paths import data_dir

pytestmark = pytest.mark.usefixtures("one_thread", "data_home")  # one thread: toy models


def drive(s: ChatSession, keys: str, history: Path | None = None) -> tuple[int, str]:
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None)
    with create_pipe_input() as inp:
        inp.send_text(keys)
        code = run_repl(s, console, history_path=history, input=inp, output=DummyOutput())
    return code, out.getvalue()


def test_repl_commands_reply_and_ctrl_d(data_home, scripted_reply, chat_session):
    scripted_reply(" Hi [bold]you[/bold]")
    s = chat_session(max_new_tokens=40)
    history = data_dir() / "chat_history"
    code, out = drive(s, "/set temperature 0.3\r/nope\rhello\r\x04", history)
    assert code == 0
    assert "temperature = 0.3" in out and "unknown command /nope" in out
    assert "Hi [bold]you[/bold]" in out  # model text literally, not markup
    assert s.turns == [Turn("hello", "Hi [bold]you[/bold]")]
    assert history == data_home / "chat_history"
    saved = history.read_text()
    assert "+hello" in saved and "+/set temperature 0.3" in saved


def test_repl_empty_reply_and_stats(scripted_reply, chat_session):
    scripted_reply("\nUser: the model speaks for the user")
    s = chat_session(max_new_tokens=40)
    code, out = drive(s, "/stats on\rhi\r/quit\r")
    assert code == 0
    assert "(empty reply)\n" in out and " tokens/s · first token " in out and "· stop" in out


def test_repl_multi_line_input_ctrl_c_and_quit(data_home, chat_session):
    s = chat_session(max_new_tokens=3)
    keys = 'one\x1b\rtwo\r"""\rthree\rfour\r"""\r"""five\rsix"""\rhalf\x03/quit\r'
    code, _ = drive(s, keys, data_home / "history")
    assert code == 0
    assert [t.user for t in s.turns] == ["one\ntwo", "three\nfour", "five\nsix"]
    saved = (data_home / "history").read_text()  # a block is one entry, recalled whole
    assert '\n+"""\n+three\n+four\n+"""\n' in saved and "+half" not in saved


def test_ctrl_c_during_a_reply_keeps_the_session(scripted_reply, monkeypatch, chat_session):
    scripted_reply("abcdef")
    script, calls = engine.sample_next, 0

    def interrupted(*args, **kwargs):  # Ctrl-C arrives while the third token is sampled
        nonlocal calls
        calls += 1
        if calls == 3:
            signal.raise_signal(signal.SIGINT)
        return script(*args, **kwargs)

    monkeypatch.setattr(engine, "sample_next", interrupted)
    s = chat_session(template="plain", max_new_tokens=40)
    code, out = drive(s, "hello\ragain\r/show\r/quit\r")
    assert code == 0
    assert "ab\n(reply stopped)\nabcdef\n" in out
    assert s.turns == [Turn("hello", "ab"), Turn("again", "abcdef")]  # the session went on
    assert "(1 of 2 turns)" in out  # /show still answers; the first turn no longer fits


def test_repl_save_and_load(tmp_path, scripted_reply, chat_session):
    scripted_reply(" Hello.")
    s = chat_session(max_new_tokens=40)
    path = tmp_path / "t.txt"
    code, out = drive(s, f"Hi\r/save {path}\r/reset\r/load {path}\r/quit\r")
    assert code == 0 and f"saved 1 turns to {path}" in out and f"loaded 1 turns from {path}" in out
    assert s.turns == [Turn("Hi", "Hello.")]
    assert "User: Hi\nAssistant: Hello.\n" in path.read_text()


def test_tab_completion():
    def complete(text: str) -> list[str]:
        doc = Document(text, len(text))
        return [c.text for c in SlashCompleter().get_completions(doc, CompleteEvent())]

    assert complete("/s") == ["/set", "/show", "/system", "/save", "/stats"]
    assert complete("/set t") == ["temperature", "top_k", "top_p"]
    assert complete("/set ma") == ["max_tokens"]
    assert complete("/stats o") == ["on", "off"]
    assert complete("hello /s") == []


def test_piped_chat_prints_one_reply_per_message(scripted_reply, chat_session):
    scripted_reply("Fine, thanks.\n\nMore.")
    s = chat_session(max_new_tokens=40)
    out, err = io.StringIO(), io.StringIO()
    code = run_piped(s, ["/set top_k 5\n", "How are you?\n", "\n", "And you?\n"],
                     Console(file=out), Console(file=err))
    assert code == 0
    assert out.getvalue() == "Fine, thanks.\n\nFine, thanks.\n"
    assert "top_k = 5" in err.getvalue()


def test_a_history_file_that_cannot_be_used_is_one_note_not_a_traceback(
        tmp_path, scripted_reply, chat_session):
    scripted_reply(" Hello.")
    folder = tmp_path / "history"
    folder.mkdir()  # a folder where the file should be: touching it passed
    code, out = drive(chat_session(), "Hi\r/quit\r", folder)
    assert code == 0 and "Traceback" not in out and "Hello." in out
    assert f"input history not saved: cannot write {folder}" in out

    home = tmp_path / "gone"  # the file's folder is deleted while the chat runs
    s = chat_session()
    handle = s.handle_command

    def delete_the_folder(line):
        shutil.rmtree(home, ignore_errors=True)
        return handle(line)

    s.handle_command = delete_the_folder
    code, out = drive(s, "/show\rHi\rHi again\r/quit\r", home / "history")
    assert code == 0 and "Traceback" not in out
    assert out.count(f"input history not saved: cannot write {home / 'history'}") == 1
    assert [t.user for t in s.turns] == ["Hi", "Hi again"]


def test_command_output_cannot_drive_the_terminal(tmp_path, chat_session):
    from minigpt_cli.cli.ui import terminal_safe

    (tmp_path / "t.txt").write_text("System: hi\x1b]0;owned\x07\x1b[2J\nUser: a\nAssistant: b\n")
    s = chat_session()
    out = io.StringIO()
    with create_pipe_input() as inp:
        inp.send_text(f"/load {tmp_path / 't.txt'}\r/show\r/quit\r")
        run_repl(s, Console(file=out, width=200, color_system=None), input=inp,
                 output=DummyOutput(), safe=terminal_safe)
    assert s.system == "hi\x1b]0;owned\x07\x1b[2J"  # kept as loaded, shown as symbols
    assert "\x1b" not in out.getvalue() and "hi␛]0;owned␇␛[2J" in out.getvalue()


def test_piped_chat_reports_stats_after_each_reply_once_on(scripted_reply, chat_session):
    """``/stats on`` works piped too: the speed line goes to stderr after every reply, so
    that stdout keeps only the replies."""
    scripted_reply("Fine.")
    s = chat_session(max_new_tokens=12)  # room for the messages in the toy's context
    out, err = io.StringIO(), io.StringIO()
    code = run_piped(s, ["Hi\n", "/stats on\n", "Yo\n", "Ok\n"],
                     Console(file=out, width=200), Console(file=err, width=200))
    assert code == 0
    assert out.getvalue() == "Fine.\n\nFine.\n\nFine.\n"
    lines = err.getvalue().splitlines()
    assert lines[0] == "stats on"
    assert len(lines) == 3 and all(" tokens/s · first token " in line for line in lines[1:])


def test_a_message_can_start_with_a_slash(scripted_reply, chat_session):
    """``//`` sends a message that starts with ``/``, typed or piped; so does a quoted block."""
    scripted_reply(" Sure.")
    s = chat_session(max_new_tokens=40)
    code, out = drive(s, '//etc/hosts is what?\r"""/usr/bin"""\r/nope\r/quit\r')
    assert code == 0 and "unknown command /nope" in out and "// sends a message" in out
    assert [t.user for t in s.turns] == ["/etc/hosts is what?", "/usr/bin"]
    s = chat_session(max_new_tokens=40)
    out, err = io.StringIO(), io.StringIO()
    assert run_piped(s, ["//tmp is full\n", "  // spaced\n"], Console(file=out),
                     Console(file=err)) == 0
    assert [t.user for t in s.turns] == ["/tmp is full", "  / spaced"]
    assert "unknown command" not in err.getvalue()


def test_jsonl_chat_keeps_lines_and_takes_commands(scripted_reply, chat_session):
    """``--jsonl``: a reply of several lines is one line out (with the minigpt and chatml
    templates they may hold blank lines too); messages may hold newlines or start with a
    slash; commands report on stderr; a bad line stops the chat
    with an error naming it, after the replies before it."""
    import json

    from minigpt_cli.errors import MiniGPTError

    scripted_reply('Fine.\nMore "quoted" \u2713')
    s = chat_session(max_new_tokens=40)
    out, err = io.StringIO(), io.StringIO()
    lines = ['"How are you?"\n', "\n", '{"content": "two\\nlines"}\n',
             '{"command": "/set top_k 5"}\n', '"/etc"\n']
    assert run_jsonl(s, lines, Console(file=out), Console(file=err)) == 0
    replies = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [r["reply"] for r in replies] == ['Fine.\nMore "quoted" \u2713'] * 3
    assert all(r["tokens"] > 0 and r["finish_reason"] for r in replies)
    assert [t.user for t in s.turns] == ["How are you?", "two\nlines", "/etc"]
    assert "top_k = 5" in err.getvalue()
    for bad, needle in [("{oops\n", "line 2 is not JSON"), ('{"role": "user"}\n',
                        "line 2 is neither a message nor a command"), ("[1]\n", "neither")]:
        out = io.StringIO()
        with pytest.raises(MiniGPTError, match=needle):
            run_jsonl(chat_session(max_new_tokens=40), ['"Hi"\n', bad, '"never"\n'],
                      Console(file=out), Console(file=io.StringIO()))
        assert len(out.getvalue().splitlines()) == 1  # the reply before it
