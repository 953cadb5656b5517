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


def test_an_exported_chat_run_answers_in_transformers_as_in_minigpt(tmp_path, chat_run):
    """transformers' greedy reply to apply_chat_template's prompt is minigpt's reply, and
    both end at the end of turn."""
    import json

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
