"""A run fine-tuned on conversations is served in its own chat template: the prompt is the
template's ids and the reply is the one ``minigpt chat`` gives (the scheduler's ending at the
end of turn is tested in tests/generate/test_batching.py)."""

from __future__ import annotations

import openai

from minigpt_cli.chat.template import template_for_run
from minigpt_cli.generate.decoding import SamplingSettings
from minigpt_cli.generate.engine import Engine

MESSAGES = [{"role": "user", "content": "What is 2+3?"}]


def test_a_chat_run_replies_in_its_template_and_stops_at_the_end_of_turn(
        tmp_path, chat_run, start_server):
    run = chat_run(tmp_path / "chat")
    template = template_for_run(run.run_dir)
    assert template.name == "minigpt"
    ids = template.render(run.tokenizer, MESSAGES, add_generation_prompt=True).ids
    *_, result = Engine(run.model, run.tokenizer).generate(
        ids, SamplingSettings(max_new_tokens=40, temperature=0),
        template.stop_ids(run.tokenizer))
    expected = result.samples[0]
    finish = {"eot": "stop", "stop": "stop", "length": "length"}[expected.finish_reason]

    server = start_server(run_dir=run.run_dir)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=server.model_id, messages=MESSAGES,
                                               max_tokens=40, temperature=0)
        assert reply.usage.prompt_tokens == len(ids)
        assert reply.choices[0].message.content == expected.text
        assert reply.choices[0].finish_reason == finish
        ended = expected.finish_reason == "eot"  # the end of turn is counted, not shown
        assert reply.usage.completion_tokens == len(expected.tokens) + ended
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=server.model_id, messages=MESSAGES, max_tokens=40, temperature=0,
                stream=True) if c.choices)
        assert streamed == expected.text
    finally:
        server.stop()


def test_a_reply_in_the_chat_template_comes_without_the_space_after_assistant(
        tmp_path, start_server, toy_run, corpus):
    """"Assistant: Hi": the model writes the layout's space with its first word; the reply's
    text is "Hi", as ``minigpt chat`` shows it, plain and streamed."""
    import torch

    from minigpt_cli.chat.template import TEMPLATES
    from minigpt_cli.run.checkpoint import save_checkpoint
    from minigpt_cli.run.load import load_run

    run_dir = toy_run(tmp_path / "run", corpus, tie_embeddings=False)
    run = load_run(run_dir)
    ids = TEMPLATES["chat"].render(run.tokenizer, MESSAGES, add_generation_prompt=True).ids
    seen = []
    hook = run.model.transformer.ln_f.register_forward_hook(lambda m, i, out: seen.append(out))
    with torch.no_grad():
        run.model(torch.tensor([ids]))
        hook.remove()
        run.model.lm_head.weight.zero_()  # a head that answers the prompt with a space
        run.model.lm_head.weight[ord(" ")] = seen[0][0, -1]
    save_checkpoint(run_dir, 13, run.model, state={"best_val_loss": 5.0},
                    training_tensors={}, best=True)
    run = load_run(run_dir)
    *_, result = Engine(run.model, run.tokenizer).generate(
        ids, SamplingSettings(max_new_tokens=8, temperature=0))
    text = result.samples[0].text
    assert text.startswith(" ")
    server = start_server("--template", "chat", run_dir=run_dir)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        reply = client.chat.completions.create(model=server.model_id, messages=MESSAGES,
                                               max_tokens=8, temperature=0)
        assert reply.choices[0].message.content == text[1:]
        streamed = "".join(
            c.choices[0].delta.content or "" for c in client.chat.completions.create(
                model=server.model_id, messages=MESSAGES, max_tokens=8, temperature=0,
                stream=True) if c.choices)
        assert streamed == text[1:]
    finally:
        server.stop()
