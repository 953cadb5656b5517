"""The chat session, its prompt-toolkit loop, and the generate/chat commands on a toy run."""

from __future__ import annotations

import io
import json
import signal
from pathlib import Path

import pytest
import torch
from prompt_toolkit.completion import CompleteEvent
from prompt_toolkit.document import Document
from prompt_toolkit.input import create_pipe_input
from prompt_toolkit.output import DummyOutput
from rich.console import Console
from typer.testing import CliRunner

import minigpt_tokenizers
from minigpt_cli.chat.session import ChatSession
from minigpt_cli.chat.template import TEMPLATES, Turn
from minigpt_cli.chat.transcript import Saved, parse_transcript, transcript
from minigpt_cli.cli.app import app
from minigpt_cli.cli.repl import SlashCompleter, run_piped, run_repl
from minigpt_cli.config import Config, ModelConfig
from minigpt_cli.generate import cache, engine
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine
from minigpt_cli.model.gpt import GPT
from minigpt_cli.paths import data_dir
from minigpt_cli.run import checkpoint, layout

runner = CliRunner()
TOY = dict(vocab_size=257, max_seq_length=32, embed_dim=32, num_heads=2, num_layers=2,
           ff_dim=64, dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_thread")  # toy models: one thread is fastest


@pytest.fixture(scope="module")
def tok():
    return minigpt_tokenizers.create("byte")


@pytest.fixture(scope="module")
def model() -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**TOY)).eval()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok, model) -> Path:
    run = tmp_path_factory.mktemp("runs") / "toy"
    cfg = Config()
    cfg.model = ModelConfig(**TOY)
    layout.create_run_dir(run)
    layout.write_run_files(run, cfg, tok)
    checkpoint.save_checkpoint(run, 10, model, state={}, training_tensors={}, best=True)
    return run


@pytest.fixture(autouse=True)
def data_home(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MINIGPT_DATA_DIR", str(tmp_path / "data"))
    return tmp_path / "data"


def session(model, tok, template="chat", **kw) -> ChatSession:
    settings = SamplingSettings(max_new_tokens=kw.pop("max_new_tokens", 12), temperature=0)
    return ChatSession(Engine(model, tok), settings, template=template,
                       model_label="runs/toy", **kw)


@pytest.fixture
def scripted(monkeypatch, tok):
    """The model 'says' this text (then end-of-text) in every reply, whatever the prompt."""
    prefill = cache.CachedLM.prefill

    def script(text: str):
        tokens = iter([])

        def fake_prefill(self, idx):  # a new generation starts the text again
            nonlocal tokens
            tokens = iter([*tok.encode(text), tok.eot_id])
            return prefill(self, idx)

        def fake_sample_next(logits, settings, generator=None, recent=None):
            return torch.full((logits.size(0),), next(tokens, tok.eot_id), dtype=torch.long)

        monkeypatch.setattr(cache.CachedLM, "prefill", fake_prefill)
        monkeypatch.setattr(engine, "sample_next", fake_sample_next)

    return script


# ---- templates and context -------------------------------------------------------------------

def test_templates_render_turns():
    turns = [Turn("Hi", " Hello!"), Turn("Who are you?", "A model.")]
    assert TEMPLATES["chat"].render("Be brief.", turns, "Bye") == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Who are you?\n"
        "Assistant: A model.\nUser: Bye\nAssistant:")
    assert TEMPLATES["plain"].render("", turns, "And then") == (
        "Hi Hello!\nWho are you?A model.\nAnd then")
    assert TEMPLATES["plain"].render("Intro", [], "x") == "Intro\nx"


def test_oldest_turns_leave_the_context_first(model, tok):
    s = session(model, tok, template="plain", max_new_tokens=8)
    s.turns = [Turn(f"m{i}", f"r{i}") for i in range(10)]
    prompt = s.build_prompt("last")
    assert tok.decode(prompt.ids) == "m6r6\nm7r7\nm8r8\nm9r9\nlast"  # 24 tokens: 32 - 8
    assert prompt.first_turn == 6 and not prompt.cropped
    s.reply("last")
    assert s.first_turn_in_context == 6 and len(s.turns) == 11
    s.turns.append(Turn("x" * 50, "y"))  # too long for the context alone: its end is kept
    prompt = s.build_prompt("z")
    assert tok.decode(prompt.ids) == "x" * 21 + "y\nz" and prompt.cropped


def test_reply_streams_and_is_recorded(model, tok, scripted):
    scripted(" Hello [bold]there[/bold]\nUser: not this")
    s = session(model, tok, max_new_tokens=60)
    assert s.reply("Hi") == "Hello [bold]there[/bold]"
    assert s.turns == [Turn("Hi", "Hello [bold]there[/bold]")]
    assert s.last_result.samples[0].finish_reason == "stop"


def test_plain_template_stops_at_a_blank_line(model, tok, scripted):
    scripted(" went home.\nThe end.\n\nNext story")
    s = session(model, tok, template="plain", max_new_tokens=60)
    assert s.reply("He") == " went home.\nThe end."


def test_a_stopped_reply_keeps_what_was_shown(model, tok, scripted):
    scripted("abcdefgh")
    s = session(model, tok, max_new_tokens=60)
    pieces = s.respond("Hi")
    assert next(pieces) == "a"
    pieces.close()
    assert s.turns == [Turn("Hi", "a")]


def test_greedy_replies_are_reproducible(model, tok):
    a, b = session(model, tok), session(model, tok)
    assert a.reply("Hello") == b.reply("Hello")


# ---- slash commands ------------------------------------------------------------------------

def test_set_changes_settings(model, tok):
    s = session(model, tok)
    for line, field, value in [("/set temperature 0.5", "temperature", 0.5),
                               ("/set top_k 40", "top_k", 40), ("/set top_p 0.9", "top_p", 0.9),
                               ("/set min_p 0.05", "min_p", 0.05),
                               ("/set repetition_penalty 1.3", "repetition_penalty", 1.3),
                               ("/set max_tokens 64", "max_new_tokens", 64),
                               ("/set seed 7", "seed", 7), ("/set seed none", "seed", None)]:
        result = s.handle_command(line)
        assert result.ok, result.lines
        assert getattr(s.settings, field) == value


@pytest.mark.parametrize("line, hint", [
    ("/set temperature -1", "temperature must be >= 0"),
    ("/set top_p 0", "top_p must be in (0, 1]"),
    ("/set max_tokens 0", "max_tokens must be at least 1"),
    ("/set top_k 2.5", "top_k needs a whole number, got '2.5'"),
    ("/set temperature hot", "temperature needs a number"),
    ("/set colour blue", "usage: /set KEY VALUE"),
    ("/set temperature", "usage: /set KEY VALUE"),
    ("/set top_k -1", "top_k must be >= 0"),
    ("/set top_p 1.5", "top_p must be in (0, 1]"),
    ("/set min_p 2", "min_p must be in [0, 1]"),
    ("/set repetition_penalty 0", "repetition_penalty must be > 0"),
    ("/set temperature nan", "temperature must be >= 0"),
    ("/set seed -5", "seed must be between 0 and 2**64 - 1"),
    ("/set seed lucky", "seed needs a whole number, got 'lucky'"),
    ("/set max_tokens 1e3", "max_tokens needs a whole number"),
    ("/frobnicate", "unknown command /frobnicate; type /help"),
    ("/stats maybe", "usage: /stats on|off"),
    ("/save", "usage: /save FILE"),
])
def test_bad_commands_give_a_one_line_hint(model, tok, line, hint):
    s = session(model, tok)
    before = s.settings
    result = s.handle_command(line)
    assert not result.ok and not result.quit
    assert len(result.lines) == 1 and hint in result.lines[0]
    assert s.settings == before


def test_help_show_system_reset_stats_quit(model, tok):
    s = session(model, tok)
    help_text = "\n".join(s.handle_command("/help").lines)
    for cmd in ("/set", "/show", "/reset", "/system", "/save", "/load", "/stats", "/quit"):
        assert cmd in help_text
    assert s.handle_command("/system You are terse.").ok and s.system == "You are terse."
    s.reply("Hi")
    show = "\n".join(s.handle_command("/show").lines)
    for part in ("runs/toy", "byte", "chat", "You are terse.", "temperature=0",
                 "of 32 tokens", "1 of 1 turns"):
        assert part in show
    s.handle_command("/reset")
    assert s.turns == [] and s.system == "You are terse."
    s.handle_command("/system")
    assert s.system == ""
    assert s.handle_command("/stats on").ok and s.show_stats
    assert "tokens/s" in s.handle_command("/stats").lines[0]
    assert s.handle_command("/quit").quit and s.handle_command("/exit").quit


@pytest.mark.parametrize("name", ["chat.json", "chat.txt"])
def test_save_and_load_round_trip(model, tok, tmp_path, name):
    s = session(model, tok, system="Be kind.")
    s.turns = [Turn("Hi", "Hello!"), Turn("two\nlines", "ok\n\nwith a gap")]
    assert s.handle_command(f"/save {tmp_path / name}").ok
    other = session(model, tok)
    result = other.handle_command(f"/load {tmp_path / name}")
    assert result.ok and "2 turns" in result.lines[0] and not result.warnings
    assert other.turns == s.turns and other.system == "Be kind."
    assert other.template.name == "chat"
    saved = (tmp_path / name).read_text()
    if name.endswith(".json"):
        raw = json.loads(saved)
        assert raw["turns"][0] == {"user": "Hi", "assistant": "Hello!"}
        assert raw["template"] == "chat" and raw["model"] == "runs/toy"
    else:
        assert saved.startswith("# minigpt chat transcript\n# template: chat\n"
                                "# model: runs/toy\n\nSystem: Be kind.\n\nUser: Hi\n")


@pytest.mark.parametrize("name", ["chat.json", "chat.txt"])
def test_load_restores_the_template_it_was_saved_with(model, tok, tmp_path, name):
    s = session(model, tok, template="chat")
    s.turns = [Turn("Hi", "Hello!")]
    s.handle_command(f"/save {tmp_path / name}")
    plain = session(model, tok, template="plain")
    result = plain.handle_command(f"/load {tmp_path / name}")
    assert result.ok and plain.template.name == "chat"
    assert result.warnings == ["template chat, as saved (it was plain)"]
    assert "template   chat" in plain.handle_command("/show").lines


def test_load_warns_about_a_template_it_does_not_know(model, tok, tmp_path):
    (tmp_path / "a.txt").write_text("# template: alpaca\nUser: Hi\nAssistant: Yo\n")
    (tmp_path / "b.txt").write_text("User: Hi\nAssistant: Yo\n")  # written by hand
    s = session(model, tok, template="plain")
    result = s.handle_command(f"/load {tmp_path / 'a.txt'}")
    assert result.ok and s.template.name == "plain" and s.turns == [Turn("Hi", "Yo")]
    assert len(result.warnings) == 1 and "'alpaca'" in result.warnings[0]
    assert "keeping plain" in result.warnings[0]
    result = s.handle_command(f"/load {tmp_path / 'b.txt'}")
    assert result.ok and not result.warnings and s.template.name == "plain"


def test_load_rejects_other_files(model, tok, tmp_path):
    s = session(model, tok)
    (tmp_path / "notes.txt").write_text("just some notes\n")
    (tmp_path / "bad.json").write_text("[1, 2]")
    for name, hint in (("notes.txt", "not a saved conversation"),
                       ("bad.json", "not a saved conversation"), ("missing.txt", "cannot read")):
        result = s.handle_command(f"/load {tmp_path / name}")
        assert not result.ok and hint in result.lines[0]


def test_transcript_parsing():
    turns = [Turn("a", "b"), Turn("c", "")]
    assert parse_transcript(transcript("sys", turns, "plain", "runs/x")) == Saved(
        "sys", turns, "plain")
    assert parse_transcript(transcript("", turns)) == Saved("", turns, None)


# ---- the prompt-toolkit loop ------------------------------------------------------------------

def drive(s: ChatSession, keys: str, history: Path | None = None) -> tuple[int, str]:
    out = io.StringIO()
    console = Console(file=out, width=100, color_system=None)
    with create_pipe_input() as inp:
        inp.send_text(keys)
        code = run_repl(s, console, history_path=history, input=inp, output=DummyOutput())
    return code, out.getvalue()


def test_repl_commands_reply_and_ctrl_d(model, tok, data_home, scripted):
    scripted(" Hi [bold]you[/bold]")
    s = session(model, tok, max_new_tokens=40)
    history = data_dir() / "chat_history"
    code, out = drive(s, "/set temperature 0.3\r/nope\rhello\r\x04", history)
    assert code == 0
    assert "temperature = 0.3" in out and "unknown command /nope" in out
    assert "Hi [bold]you[/bold]" in out  # model text literally, not markup
    assert s.turns == [Turn("hello", "Hi [bold]you[/bold]")]
    assert history == data_home / "chat_history"
    saved = history.read_text()
    assert "+hello" in saved and "+/set temperature 0.3" in saved


def test_repl_empty_reply_and_stats(model, tok, scripted):
    scripted("\nUser: the model speaks for the user")
    s = session(model, tok, max_new_tokens=40)
    code, out = drive(s, "/stats on\rhi\r/quit\r")
    assert code == 0
    assert "(empty reply)\n" in out and " tokens/s · first token " in out and "· stop" in out


def test_repl_multi_line_input_ctrl_c_and_quit(model, tok, data_home):
    s = session(model, tok, max_new_tokens=3)
    keys = 'one\x1b\rtwo\r"""\rthree\rfour\r"""\r"""five\rsix"""\rhalf\x03/quit\r'
    code, _ = drive(s, keys, data_home / "history")
    assert code == 0
    assert [t.user for t in s.turns] == ["one\ntwo", "three\nfour", "five\nsix"]
    saved = (data_home / "history").read_text()  # a block is one entry, recalled whole
    assert '\n+"""\n+three\n+four\n+"""\n' in saved and "+half" not in saved


def test_ctrl_c_during_a_reply_keeps_the_session(model, tok, scripted, monkeypatch):
    scripted("abcdef")
    script, calls = engine.sample_next, 0

    def interrupted(*args, **kwargs):  # Ctrl-C arrives while the third token is sampled
        nonlocal calls
        calls += 1
        if calls == 3:
            signal.raise_signal(signal.SIGINT)
        return script(*args, **kwargs)

    monkeypatch.setattr(engine, "sample_next", interrupted)
    s = session(model, tok, template="plain", max_new_tokens=40)
    code, out = drive(s, "hello\ragain\r/show\r/quit\r")
    assert code == 0
    assert "ab\n(reply stopped)\nabcdef\n" in out
    assert s.turns == [Turn("hello", "ab"), Turn("again", "abcdef")]  # the session went on
    assert "(1 of 2 turns)" in out  # /show still answers; the first turn no longer fits


def test_repl_save_and_load(model, tok, tmp_path, scripted):
    scripted(" Hello.")
    s = session(model, tok, max_new_tokens=40)
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


def test_piped_chat_prints_one_reply_per_message(model, tok, scripted):
    scripted("Fine, thanks.\n\nMore.")
    s = session(model, tok, max_new_tokens=40)
    out, err = io.StringIO(), io.StringIO()
    code = run_piped(s, ["/set top_k 5\n", "How are you?\n", "\n", "And you?\n"],
                     Console(file=out), Console(file=err))
    assert code == 0
    assert out.getvalue() == "Fine, thanks.\n\nFine, thanks.\n"
    assert "top_k = 5" in err.getvalue()


def test_data_dir_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("MINIGPT_DATA_DIR")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path))
    assert data_dir() == tmp_path / "minigpt"


# ---- the commands --------------------------------------------------------------------------

def invoke(*args: str, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def test_generate_streams_the_prompt_and_continuation(run_dir):
    args = ("generate", "--model", run_dir, "--prompt", "Hello", "--max-new-tokens", "10",
            "--seed", "3")
    first = invoke(*args)
    assert first.exit_code == 0, first.output
    assert first.stdout.startswith("Hello")
    assert "tokens/s" in first.stderr and "tokens/s" not in first.stdout
    assert invoke(*args).stdout == first.stdout


def test_generate_json_and_several_samples(run_dir):
    result = invoke("generate", "--model", run_dir, "--prompt", "Hi", "--max-new-tokens", "5",
                    "--num-samples", "2", "--temperature", "0", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert len(report["samples"]) == 2 and report["samples"][0]["num_tokens"] == 5
    assert report["settings"]["temperature"] == 0 and report["tokens_per_second"] > 0
    assert report["time_to_first_token_s"] > 0
    text = invoke("generate", "--model", run_dir, "--prompt", "Hi", "--max-new-tokens", "5",
                  "--num-samples", "2", "--temperature", "0").stdout
    assert "sample 1/2" in text and "sample 2/2" in text
    assert text.count("Hi" + report["samples"][0]["text"]) == 2


def test_generate_prints_model_text_literally(run_dir, scripted):
    scripted("[bold red]x[/] :smile:")
    result = invoke("generate", "--model", run_dir, "--prompt", "[i]", "--max-new-tokens", "40")
    assert result.stdout == "[i][bold red]x[/] :smile:\n"


def test_generate_reads_stdin_and_stops(run_dir, scripted):
    scripted("abc STOP def")
    result = invoke("generate", "--model", run_dir, "--stop", "STOP", input="prompt\n")
    assert result.stdout == "prompt" + "abc \n"
    scripted("one\ntwo")
    result = invoke("generate", "--model", run_dir, "--prompt", "", "--stop", "\\n")
    assert result.stdout == "one\n"  # '\n' typed in a shell is a newline


@pytest.mark.parametrize("flag, value", [
    ("--temperature", "-1"), ("--top-p", "1.5"), ("--top-k", "-3"), ("--min-p", "2"),
    ("--repetition-penalty", "0"), ("--max-new-tokens", "0"), ("--num-samples", "0"),
    ("--seed", "-1"),
])
def test_generate_rejects_bad_values_before_loading(tmp_path, flag, value):
    result = invoke("generate", "--model", tmp_path / "nowhere", "--prompt", "x", flag, value)
    assert result.exit_code == 1
    assert flag in result.stderr and "nowhere" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_chat_command_piped(run_dir, scripted):
    scripted(" Hello.")
    result = invoke("chat", "--model", run_dir, "--template", "chat", input="Hi\n/quit\nmore\n")
    assert result.exit_code == 0, result.output
    assert result.stdout == "Hello.\n"


def test_chat_command_reads_messages_until_the_end_of_input(run_dir, scripted, tmp_path):
    scripted(" Fine [b]thanks[/b].")
    saved = tmp_path / "t.json"
    result = invoke("chat", "--model", run_dir, "--template", "chat",
                    input=f"Hi\nHow are you?\n/save {saved}\nBye")  # no newline at the end
    assert result.exit_code == 0, result.output
    assert result.stdout == "Fine [b]thanks[/b].\n\n" * 2 + "Fine [b]thanks[/b].\n"
    raw = json.loads(saved.read_text())
    assert raw["template"] == "chat" and len(raw["turns"]) == 2


def test_chat_command_rejects_stdin_that_is_not_utf8(run_dir, scripted):
    scripted(" Hello.")
    result = runner.invoke(app, ["chat", "--model", str(run_dir)], input=b"Hi\n\xff\xfe\n")
    assert result.exit_code == 1
    assert "not UTF-8" in result.stderr and "Traceback" not in result.output


def test_chat_rejects_a_bad_template(run_dir):
    result = invoke("chat", "--model", run_dir, "--template", "fancy")
    assert result.exit_code == 1 and "--template" in result.stderr
