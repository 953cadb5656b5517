"""Conversation data through the CLI: each bad file is one line naming the file and the
line, exit 1 and nothing written; good data is read as chat by content or by
``data.format``, and ``inspect data`` says how many conversations were cut."""

from __future__ import annotations

import json

import pytest

GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}
TOY = ["model.max_seq_length=32", "model.embed_dim=32", "model.num_heads=2",
       "model.num_layers=1", "model.ff_dim=64", "train.batch_size=2", "train.max_steps=1",
       "train.eval_iters=1", "train.device=cpu"]
SETS = [arg for item in TOY for arg in ("--set", item)]


@pytest.mark.parametrize("bad, needle", [
    (b'{"messages": [', "not JSON"),
    (b'{"turns": []}', "missing 'messages'"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), "unknown role"),
    (b'{"messages": []}', "empty conversation"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}]}).encode(),
     "no assistant turn"),
    (b'{"messages": [{"role": "user", "content": "caf\xe9"}]}', "not UTF-8"),
    (b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", '
     b'"content": "half \\ud83d"}]}', "lone surrogate"),
])
def test_a_bad_line_is_one_error_naming_file_and_line(tmp_path, cache_dir, cli, bad, needle):
    data = tmp_path / "c.jsonl"
    data.write_bytes((json.dumps(GOOD) + "\n").encode() * 3 + bad + b"\n")
    out = tmp_path / "run"
    result = cli.invoke("train", "--dataset", data, "--out", out, *SETS)
    cli.assert_one_line_error(result, f"{data}:4", needle)
    assert not out.exists() and not (cache_dir / "tokens").exists()
    cli.assert_one_line_error(cli.invoke("inspect", "data", data), f"{data}:4", needle)


def test_a_folder_with_train_and_valid_jsonl(tmp_path, cache_dir, cli):
    folder = tmp_path / "chat"
    folder.mkdir()
    (folder / "train.jsonl").write_text((json.dumps(GOOD) + "\n") * 20)
    (folder / "valid.jsonl").write_text((json.dumps(GOOD) + "\n") * 2)
    out = tmp_path / "run"
    cli.ok_text("train", "--dataset", folder, "--out", out, *SETS)
    assert json.loads((out / "chat_template.json").read_text())["name"] == "minigpt"
    reply = cli.ok_text("generate", "--model", out, "--chat", "--prompt", "Hi",
                        "--max-new-tokens", "3", "--seed", "1", "--json")
    assert json.loads(reply)["samples"][0]["text"] is not None
    scored = cli.ok_json("eval", "--model", out, "--json")
    assert scored["scored"] == "assistant tokens"
    assert scored["tokens"] == 2 * 3  # two replies: "Y", "o" and the end of turn


def test_format_text_reads_jsonl_as_text_and_chat_insists(tmp_path, cache_dir, cli):
    data = tmp_path / "c.txt"
    data.write_text((json.dumps(GOOD) + "\n") * 40 + "plain line\n")
    result = cli.invoke("train", "--dataset", data, "--out", tmp_path / "r1", *SETS,
                        "--set", "data.format=chat")
    cli.assert_one_line_error(result, f"{data}:41", "not JSON")
    cli.ok_text("train", "--dataset", data, "--out", tmp_path / "r2", *SETS,
                "--set", "data.format=text")
    assert not (tmp_path / "r2" / "chat_template.json").exists()  # a base model


def test_inspect_data_counts_the_conversations_cut(tmp_path, cache_dir, cli):
    long = {"messages": [m for i in range(8) for m in (
        {"role": "user", "content": f"question number {i}"},
        {"role": "assistant", "content": f"reply {i}"})]}
    data = tmp_path / "c.jsonl"
    data.write_text((json.dumps(GOOD) + "\n") * 9 + json.dumps(long) + "\n"
                    + json.dumps(long) + "\n")
    report = cli.ok_json("inspect", "data", data, "--context", "64", "--json")
    chat = report["chat"]
    assert chat["template"] == "minigpt" and chat["context"] == 64
    assert chat["splits"]["train"]["conversations"] == 10
    assert chat["splits"]["train"]["cut"] == 1 and chat["splits"]["val"]["cut"] == 1


@pytest.mark.parametrize("first", [b'{"messages": [ broken', b"\n  {'messages': []}"])
def test_a_broken_first_line_of_a_jsonl_file_is_an_error_not_text(tmp_path, cache_dir, cli,
                                                                   first):
    """Detection reads the first line: one that starts like JSON but is not is the same
    error as a broken line further on (a .txt file starting so is still text)."""
    data = tmp_path / "c.jsonl"
    data.write_bytes(first + b"\n" + (json.dumps(GOOD) + "\n").encode() * 30)
    line = first.count(b"\n") + 1
    out = tmp_path / "run"
    result = cli.invoke("train", "--dataset", data, "--out", out, *SETS)
    cli.assert_one_line_error(result, f"{data}:{line}: not JSON")
    assert not out.exists()
    cli.assert_one_line_error(cli.invoke("inspect", "data", data), f"{data}:{line}: not JSON")
    text = tmp_path / "c.txt"
    text.write_bytes(data.read_bytes())
    assert "chat" not in cli.ok_json("inspect", "data", text, "--json")


def test_inspect_data_counts_the_tokens_training_uses_for_conversations(tmp_path, cache_dir,
                                                                        cli):
    """The table's tokens and most frequent tokens are the rendered ids (a template token is
    one id), as in its Conversations section; lengths are per conversation."""
    import minigpt_tokenizers
    from minigpt_cli.chat.template import TEMPLATES

    data = tmp_path / "c.jsonl"
    data.write_text((json.dumps(GOOD) + "\n") * 20)
    report = cli.ok_json("inspect", "data", data, "--top", "3", "--json")
    tok = minigpt_tokenizers.create("byte")
    tok.add_special_tokens(TEMPLATES["minigpt"].special_tokens)
    ids = TEMPLATES["minigpt"].render(tok, GOOD["messages"]).ids  # <|user|>Hi<|end|>...
    train = report["splits"]["train"]
    assert train["tokens"] == report["chat"]["splits"]["train"]["tokens"] == 18 * len(ids)
    assert train["top_tokens"][0] == {"id": tok.special_id("<|end|>"), "token": "<|end|>",
                                      "count": 36, "share": 2 / len(ids)}
    assert report["unit"] == "conversation" and train["documents"] == 18
    assert train["lengths"]["max"] == len(ids) and train["bytes"] == 18 * len("HiYo")
    view = cli.ok_text("inspect", "data", data)
    assert "conversation length, mean" in view and "<|end|>" in view
