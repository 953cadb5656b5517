"""Supervised fine-tuning on conversations: the loss counts the assistant's tokens only,
the run keeps its template, a fine-tuned model grows its embedding for the template's
tokens, and (the point of it all) a tiny model learns a rule and answers held-out
questions through the chat session."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from minigpt_cli.chat.session import ChatSession
from minigpt_cli.chat.template import TEMPLATES, template_for_run
from minigpt_cli.config import Config
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine
from minigpt_cli.run.load import load_run
from minigpt_cli.train import setup

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def write_chat(path: Path, pairs) -> Path:
    with open(path, "w", encoding="utf-8") as f:
        for q, a in pairs:
            f.write(json.dumps({"messages": [{"role": "user", "content": q},
                                             {"role": "assistant", "content": a}]}) + "\n")
    return path


def upper_case_task(length: int, held_out: int = 40, seed: int = 0):
    """Words of ``length`` letters; the answer is the word in capitals. Returns the
    training pairs and the held-out words (never seen in training)."""
    r = random.Random(seed)
    words = sorted({"".join(r.choice(LETTERS) for _ in range(length)) for _ in range(3000)})
    r.shuffle(words)
    return [(w, w.upper()) for w in words[held_out:held_out + 1000]], words[:held_out]


def settings(dataset: Path, *extra: str) -> Config:
    return Config.from_sources("tiny", overrides=[
        f"data.dataset={dataset}", "model.embed_dim=64", "model.num_layers=2",
        "model.num_heads=4", "model.ff_dim=256", "train.batch_size=16", "train.warmup_steps=20",
        "train.eval_interval=1000", "train.checkpoint_interval=1000", "train.log_interval=50",
        "train.precision=fp32", "train.device=cpu", *extra])


def answer_rate(run_dir: Path, words: list[str]) -> float:
    """How many held-out words the chat session (as ``minigpt chat`` builds it) answers."""
    run = load_run(run_dir)
    session = ChatSession(Engine(run.model, run.tokenizer),
                          SamplingSettings(temperature=0, max_new_tokens=8),
                          template=template_for_run(run_dir))
    right = 0
    for w in words:
        session.turns.clear()
        right += session.reply(w) == w.upper()
    return right / len(words)


def test_targets_are_the_assistants_tokens_only(tmp_path, cache_dir):
    data = write_chat(tmp_path / "c.jsonl", [(f"q{i}", f"answer {i}") for i in range(50)])
    run = setup.prepare(settings(data, "model.max_seq_length=32", "train.max_steps=1"),
                        tmp_path / "run")
    tok = run.tokenizer
    x, y = run.trainer.sampler.next_batch(8)
    scored = y[y != -1].tolist()
    assert scored and tok.special_id("<|end|>") in scored
    text = tok.decode(scored)
    assert "answer" in text and "q" not in text.replace("<|end|>", "")
    assert template_for_run(run.run_dir).name == "minigpt"  # saved with the run
    assert (run.run_dir / "chat_template.json").is_file()
    from minigpt_cli.run.load import load_tokenizer

    assert set(TEMPLATES["minigpt"].special_tokens) <= set(
        load_tokenizer(run.run_dir).added_tokens)


def test_a_long_conversation_is_split_at_turns_not_dropped(tmp_path, cache_dir):
    from minigpt_cli.data import chat

    long = {"messages": [m for i in range(6) for m in (
        {"role": "user", "content": f"question {i}"},
        {"role": "assistant", "content": f"reply {i}"})]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(long) + "\n" + json.dumps(
        {"messages": [{"role": "user", "content": "x" * 80},
                      {"role": "assistant", "content": "y"}]}) + "\n")
    import minigpt_tokenizers

    tok = minigpt_tokenizers.create("byte")
    tok.add_special_tokens(TEMPLATES["minigpt"].special_tokens)
    source = chat.ChatSource("c", {"train": chat.read_jsonl(path)})
    cached = chat.chat_token_cache(source, "train", tok, TEMPLATES["minigpt"])
    packed = chat.pack(cached, 32, tok.eot_id)
    assert (packed.conversations, packed.cut, packed.truncated) == (2, 2, 1)
    # every reply of the long conversation is still trained
    text = tok.decode(packed.tokens[packed.mask].tolist())
    assert all(f"reply {i}" in text for i in range(6))
    again = chat.chat_token_cache(source, "train", tok, TEMPLATES["minigpt"])
    assert again.reused and (again.flags == cached.flags).all()


def test_fine_tuning_an_initialised_model_grows_its_embedding(tmp_path, cache_dir, toy_run,
                                                             corpus):
    base = toy_run(tmp_path / "base", corpus)
    data = write_chat(tmp_path / "c.jsonl", [(f"q{i}", f"a{i}") for i in range(40)])
    cfg = settings(data, f"train.init={base}", "train.max_steps=1")
    run = setup.prepare(cfg, tmp_path / "sft", changed={"train.init", "data.dataset"})
    w = run.trainer.model.transformer.wte.weight.detach()
    old = load_run(base).model.transformer.wte.weight.detach()
    assert w.shape[0] == 257 + 4 == run.config.model.vocab_size
    torch.testing.assert_close(w[:257], old)
    torch.testing.assert_close(w[257:], old.mean(0, keepdim=True).expand(4, -1))


def learned_rate(tmp_path: Path, length: int, *extra: str) -> float:
    """Fine-tune on the upper-case task with words of ``length``; the held-out rate."""
    pairs, held = upper_case_task(length)
    data = write_chat(tmp_path / "c.jsonl", pairs)
    run = setup.prepare(settings(data, *extra), tmp_path / "run")
    run.trainer.fit()
    return answer_rate(run.run_dir, held)


def test_fine_tuning_teaches_a_rule_fast(tmp_path, cache_dir):
    rate = learned_rate(tmp_path, 2, "model.max_seq_length=32", "train.max_steps=200",
                        "train.learning_rate=0.005")
    assert rate >= 0.5, rate  # chance: 1 in 676


@pytest.mark.slow
def test_fine_tuning_teaches_a_rule(tmp_path, cache_dir):
    rate = learned_rate(tmp_path, 3, "model.max_seq_length=64", "train.max_steps=300",
                        "train.learning_rate=0.003")
    assert rate >= 0.8, rate  # chance: 1 in 17,576


def test_resuming_a_chat_run_is_exact(tmp_path, cache_dir, train_config, untimed_records,
                                      stop_after):
    from minigpt_cli.train.trainer import TrainingStopped

    data = write_chat(tmp_path / "c.jsonl", [(f"q{i}", f"answer {i}") for i in range(60)])
    full = setup.prepare(train_config(data, "train.max_steps=8"), tmp_path / "full")
    full.trainer.fit()
    run = setup.prepare(train_config(data, "train.max_steps=8"), tmp_path / "part")
    stop_after(run, 3)
    with pytest.raises(TrainingStopped):
        run.trainer.fit()
    setup.prepare(train_config(data, "train.max_steps=8"), tmp_path / "part",
                  resume=True).trainer.fit()
    assert untimed_records(tmp_path / "part") == untimed_records(tmp_path / "full")
