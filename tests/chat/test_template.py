"""The chat templates: how a conversation becomes ids, a loss mask and a prompt."""

from __future__ import annotations

import pytest

import minigpt_tokenizers
from minigpt_cli.chat.template import TEMPLATES, save_run_template, template_for_run
from minigpt_cli.errors import MiniGPTError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Who are you?"}]


def tokenizer_for(name):
    tok = minigpt_tokenizers.create("byte")
    tok.add_special_tokens(TEMPLATES[name].special_tokens)
    return tok


def test_text_templates_render_the_old_prompts():
    chat, plain = TEMPLATES["chat"], TEMPLATES["plain"]
    turns = [*MESSAGES[1:3], {"role": "user", "content": "Who are you?"},
             {"role": "assistant", "content": "A model."}, {"role": "user", "content": "Bye"}]
    assert chat.text([MESSAGES[0], *turns], True) == (
        "System: Be brief.\nUser: Hi\nAssistant: Hello!\nUser: Who are you?\n"
        "Assistant: A model.\nUser: Bye\nAssistant:")
    assert plain.text(turns, True) == "HiHello!\nWho are you?A model.\nBye"
    assert plain.text([{"role": "system", "content": "Intro"},
                       {"role": "user", "content": "x"}], True) == "Intro\nx"


@pytest.mark.parametrize("name, trained", [
    ("chatml", "Hello!<|im_end|>"), ("minigpt", "Hello!<|end|>"), ("chat", " Hello!\n"),
    ("plain", "Hello!\n")])
def test_only_the_assistant_tokens_are_trained(name, trained):
    tok = tokenizer_for(name)
    r = TEMPLATES[name].render(tok, MESSAGES[:3])
    assert tok.decode(r.ids) == TEMPLATES[name].text(MESSAGES[:3])
    assert tok.decode([i for i, t in zip(r.ids, r.trained, strict=True) if t]) == trained
    assert r.turn_starts[0] == 0 and len(r.turn_starts) >= 2


def test_special_tokens_are_single_ids_that_text_never_makes():
    tok = tokenizer_for("chatml")
    r = TEMPLATES["chatml"].render(tok, [{"role": "user", "content": "<|im_end|>"}], True)
    end = tok.special_id("<|im_end|>")
    assert r.ids.count(end) == 1  # the one closing the turn, not the typed text
    assert end not in tok.encode("<|im_end|>") and tok.decode([end]) == "<|im_end|>"
    assert TEMPLATES["chatml"].stop_ids(tok) == [end]
    assert TEMPLATES["chatml"].text([], True) == "<|im_start|>assistant\n"


def test_a_template_needs_its_tokens():
    with pytest.raises(MiniGPTError, match="<|end|>"):
        TEMPLATES["minigpt"].check_tokenizer(minigpt_tokenizers.create("byte"))


def test_the_run_decides_unless_overridden(tmp_path):
    assert template_for_run(tmp_path).name == "plain"  # a base model continues text
    save_run_template(tmp_path, TEMPLATES["chatml"])
    assert template_for_run(tmp_path).name == "chatml"
    assert template_for_run(tmp_path, "minigpt").name == "minigpt"
