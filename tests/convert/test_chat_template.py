"""Exported chat templates: Hugging Face's ``apply_chat_template`` on the exported tokenizer
gives exactly the ids minigpt's template renders, for every template and tokenizer."""

from __future__ import annotations

import json
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
    assert hf.decode([tok.special_id("<|im_end|>")]) == "<|im_end|>"


def test_template_tokens_are_special_so_decoding_can_skip_them(exported):
    """skip_special_tokens drops the template's tokens; text that spells them is text with
    split_special_tokens, and in messages with apply_chat_template's
    sanitize_control_tokens."""
    from transformers import AutoTokenizer

    tok, _, folder = exported
    hf = AutoTokenizer.from_pretrained(folder)  # the fixture's has had its template changed
    end = tok.special_id("<|im_end|>")
    assert hf.decode([*tok.encode("12"), end, tok.eot_id], skip_special_tokens=True) == "12"
    config = json.loads((folder / "tokenizer_config.json").read_text())
    assert all(e["special"] for e in config["added_tokens_decoder"].values())
    for text in ("<|endoftext|>", "<|im_end|> <|user|>"):
        assert hf(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == \
            tok.encode(text)
    messages = [{"role": "user", "content": "say <|im_end|> or <|endoftext|> <|end|>"}]
    out = hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                 sanitize_control_tokens=True)
    specials = {*tok.added_tokens.values(), tok.eot_id}
    ours = TEMPLATES["chatml"].render(tok, messages, add_generation_prompt=True).ids
    theirs = list(out["input_ids"] if hasattr(out, "keys") else out)
    assert [i for i in theirs if i in specials] == [i for i in ours if i in specials]
    assert tok.decode(theirs) == tok.decode(ours)


def test_an_exported_chat_run_imports_back_with_its_template(tmp_path, chat_run):
    """The template's tokens come back as the tokenizer's special tokens, with their ids,
    and the run records the template, so chat uses it untold."""
    import torch

    from minigpt_cli.chat.template import saved_template_name
    from minigpt_cli.convert.export import export
    from minigpt_cli.convert.importing import import_run
    from minigpt_cli.run.load import load_run

    run = chat_run(tmp_path / "run")
    out = export(run, tmp_path / "hf", "hf")
    back = load_run(import_run(str(out), tmp_path / "back"))
    assert saved_template_name(back.run_dir) == "minigpt"
    assert back.tokenizer.added_tokens == run.tokenizer.added_tokens
    messages = [{"role": "user", "content": "What is 2+3? <|end|>"}]
    ids = TEMPLATES["minigpt"].render(back.tokenizer, messages, True).ids
    assert ids == TEMPLATES["minigpt"].render(run.tokenizer, messages, True).ids
    with torch.no_grad():
        torch.testing.assert_close(back.model(torch.tensor([ids]))[0],
                                   run.model(torch.tensor([ids]))[0], atol=1e-5, rtol=0)


def test_an_exported_chat_run_answers_in_transformers_as_in_minigpt(tmp_path, chat_run):
    """transformers' greedy reply to apply_chat_template's prompt is minigpt's reply, and
    both end at the end of turn."""
    import torch
    import transformers

    from minigpt_cli.convert.export import export
    from minigpt_cli.generate.decoding import SamplingSettings
    from minigpt_cli.generate.engine import Engine

    template = TEMPLATES["minigpt"]
    run = chat_run(tmp_path / "run")
    tok = run.tokenizer
    end = tok.special_id("<|end|>")
    out = export(run, tmp_path / "hf", "hf")
    assert end in json.loads((out / "generation_config.json").read_text())["eos_token_id"]
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    messages = [{"role": "user", "content": "What is 2+3?"}]
    ids = hf_ids(hf_tok, messages, True)
    assert ids == template.render(tok, messages, True).ids
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([ids]), max_new_tokens=30,
                                   do_sample=False)[0, len(ids):].tolist()
    *_, result = Engine(run.model, tok).generate(
        ids, SamplingSettings(max_new_tokens=30, temperature=0), template.stop_ids(tok))
    ours = result.samples[0]
    if ours.finish_reason == "eot":  # transformers keeps the end token, minigpt drops it
        assert theirs == [*ours.tokens, end] or theirs == [*ours.tokens, tok.eot_id]
    else:
        assert theirs == ours.tokens


def test_gguf_carries_the_chat_template_and_its_tokens(tmp_path, chat_run):
    gguf = pytest.importorskip("gguf")
    from minigpt_cli.convert.export import export

    run = chat_run(tmp_path / "run")
    path = export(run, tmp_path / "chat.gguf", "gguf")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.chat_template"]
    assert bytes(field.parts[field.data[0]]).decode() == TEMPLATES["minigpt"].chat_template
    tokens = reader.fields["tokenizer.ggml.tokens"]
    end = run.tokenizer.special_id("<|end|>")
    assert bytes(tokens.parts[tokens.data[end]]).decode() == "<|end|>"
