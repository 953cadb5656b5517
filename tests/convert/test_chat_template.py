"""Exported chat templates: Hugging Face's ``apply_chat_template`` on the exported tokenizer
gives exactly the ids minigpt's template renders, for every template and tokenizer."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import minigpt_tokenizers  # noqa: E402
from minigpt_cli.chat.template import TEMPLATES  # noqa: E402
from minigpt_cli.convert.hf_tokenizer import save_hf_tokenizer  # noqa: E402

SHARED = Path(os.environ.get("MINIGPT_SHARED_DIR") or Path(__file__).resolve().parents[3]
              / "shared")
GPT2_RANKS = SHARED / "tokenizers" / "gpt2.tiktoken"

CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+3?"}],
    [{"role": "system", "content": "You answer in one word.\n\n  Always."},
     {"role": "user", "content": "Café?  It's 9:41 -- naïve 日本語 🙂"},
     {"role": "assistant", "content": "\n\nYes, indeed.  "},
     {"role": "user", "content": "  again\ttabs\r\nand lines\n"}],
]


def tokenizer(spec: str):
    if spec == "gpt2":
        if not GPT2_RANKS.is_file():
            pytest.skip(f"{GPT2_RANKS} not available")
        return minigpt_tokenizers.create(f"tiktoken:{GPT2_RANKS}")
    return minigpt_tokenizers.create(spec)


def hf_ids(hf, messages, add_generation_prompt: bool) -> list[int]:
    out = hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                 tokenize=True)
    ids = out["input_ids"] if hasattr(out, "keys") else out
    return list(ids)


@pytest.fixture(scope="module", params=["byte", "gpt2"])
def exported(request, tmp_path_factory):
    """A tokenizer with every template's tokens, exported once with the chatml template;
    (minigpt's tokenizer, transformers' tokenizer from the folder, the folder)."""
    from transformers import AutoTokenizer

    tok = tokenizer(request.param)
    for template in TEMPLATES.values():
        tok.add_special_tokens(template.special_tokens)
    folder = tmp_path_factory.mktemp(f"hf-{request.param}")
    save_hf_tokenizer(tok, folder, 128, chat_template=TEMPLATES["chatml"].chat_template)
    return tok, AutoTokenizer.from_pretrained(folder), folder


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_apply_chat_template_gives_minigpts_ids(exported, name):
    tok, hf, _ = exported
    template = TEMPLATES[name]
    hf.chat_template = template.chat_template  # the file holds chatml's (checked below)
    for messages in CONVERSATIONS:
        ours = template.render(tok, messages, add_generation_prompt=True).ids
        assert hf_ids(hf, messages, True) == ours
        full = [*messages, {"role": "assistant", "content": "Five."}]
        assert hf_ids(hf, full, False) == template.render(tok, full).ids
    for t in template.special_tokens:  # one id each, as in minigpt
        assert hf.convert_tokens_to_ids(t) == tok.special_id(t)


def test_the_exported_files_carry_the_template_and_tokens(exported):
    from transformers import AutoTokenizer

    tok, _, folder = exported
    hf = AutoTokenizer.from_pretrained(folder)
    messages = CONVERSATIONS[1]
    assert hf_ids(hf, messages, True) == \
        TEMPLATES["chatml"].render(tok, messages, add_generation_prompt=True).ids
    # ordinary text never makes end-of-text, as in minigpt
    assert hf("<|endoftext|>", add_special_tokens=False)["input_ids"] == \
        tok.encode("<|endoftext|>")
    assert hf.decode([tok.special_id("<|im_end|>")]) == "<|im_end|>"
