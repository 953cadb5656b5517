"""The server through the official ``openai`` client and plain HTTP: completions, chat,
streaming, errors, the API key, static files and disconnects."""

from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
import torch

from minigpt_cli.run.load import load_run


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=server.api_key, max_retries=0)


@pytest.fixture(scope="module")
def model(serve_run):
    return load_run(serve_run).model


def test_models_lists_the_run_with_its_step_and_val_loss(client, server):
    models = client.models.list().data
    assert [m.id for m in models] == [server.model_id]
    card = models[0].model_dump()
    assert card["step"] == 42 and card["val_loss"] == 3.5


def test_completion_plain_and_streaming_agree(client, server, byte_tok):
    kw = dict(model=server.model_id, prompt="Once upon", max_tokens=12, temperature=0)
    plain = client.completions.create(**kw)
    choice = plain.choices[0]
    assert choice.finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens == len(byte_tok.encode("Once upon"))
    chunks = list(client.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == choice.finish_reason


def test_chat_plain_and_streaming(client, server):
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hello"}]
    plain = client.chat.completions.create(model=server.model_id, messages=messages,
                                           max_tokens=10, temperature=0, seed=3)
    assert plain.choices[0].message.role == "assistant"
    assert plain.usage.completion_tokens <= 10
    stream = client.chat.completions.create(model=server.model_id, messages=messages,
                                            max_tokens=10, temperature=0, seed=3, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == plain.choices[0].message.content


def test_n_samples_and_seed_reproduce(client, server):
    kw = dict(model=server.model_id, prompt="abc", max_tokens=8, temperature=1.0, n=3, seed=7)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert [c.text for c in a.choices] == [c.text for c in b.choices]


def test_echo_logprobs_equal_the_models_own(client, server, model, byte_tok):
    text = "The cat sat."
    out = client.completions.create(model=server.model_id, prompt=text, max_tokens=0,
                                    echo=True, logprobs=1)
    lp = out.choices[0].logprobs
    assert out.choices[0].text == text and lp.token_logprobs[0] is None
    ids = byte_tok.encode(text)
    with torch.inference_mode():
        logp = model(torch.tensor([ids]))[0][0].log_softmax(-1)
    expected = logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
    torch.testing.assert_close(torch.tensor(lp.token_logprobs[1:]), expected)


@pytest.mark.parametrize("body, status, param", [
    ({"prompt": "x", "max_tokens": "ten"}, 400, "max_tokens"),
    ({"prompt": "x", "temperature": 9}, 400, "temperature"),
    ({"prompt": "x", "top_p": 0}, 400, "top_p"),
    ({"prompt": "x", "n": 99}, 400, "n"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": "x" * 3000}, 400, "prompt"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ({"prompt": "x", "stop": [1]}, 400, "stop"),
    ({"prompt": "x", "stream": "yes"}, 400, "stream"),
    ({"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "x", "logit_bias": [1]}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"x1": 5}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"99999999": 5}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": 101}}, 400, "logit_bias"),
    ({"prompt": "x", "logit_bias": {"1": "up"}}, 400, "logit_bias"),
    ({"prompt": "x", "suffix": "the end"}, 400, "suffix"),
    ({"prompt": "x", "best_of": 3}, 400, "best_of"),
])
def test_bad_requests_get_an_openai_error_naming_the_field(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and param in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


def test_logit_bias_through_the_client(client, server):
    """+100 forces a token, -100 keeps one out; the ids are the tokenizer's (as strings)."""
    kw = dict(model=server.model_id, prompt="abc", max_tokens=6)
    forced = client.completions.create(**kw, temperature=1.0, seed=1,
                                       logit_bias={str(ord("q")): 100})
    assert forced.choices[0].text == "q" * 6
    greedy = client.completions.create(**kw, temperature=0).choices[0].text
    banned = client.completions.create(**kw, temperature=0,
                                       logit_bias={str(ord(greedy[0])): -100})
    assert greedy[0] not in banned.choices[0].text
    chat = client.chat.completions.create(model=server.model_id, max_tokens=4, temperature=1.0,
                                          messages=[{"role": "user", "content": "hi"}],
                                          logit_bias={str(ord("z")): 100})
    assert chat.choices[0].message.content == "z" * 4


@pytest.mark.parametrize("extra, param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"modalities": ["text", "audio"]}, "modalities"),
])
def test_chat_parameters_the_server_cannot_honour_are_refused(server, extra, param):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
    assert r.json()["error"]["code"] == "unsupported_parameter"


def test_chat_parameters_that_ask_for_plain_text_are_accepted(server):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            "response_format": {"type": "text"}, "tool_choice": "none", "tools": [],
            "modalities": ["text"], "user": "u", "parallel_tool_calls": False}
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=server.headers)
    assert r.status_code == 200, r.text


def test_bad_chat_bodies(server):
    url = f"{server.url}/v1/chat/completions"
    for raw, param in [(b"{not json", None), (b"[1]", None),
                       (json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode(),
                        "messages[0].role"),
                       (json.dumps({"messages": [{"role": "user", "content": 3}]}).encode(),
                        "messages[0].content")]:
        r = httpx.post(url, content=raw, headers={**server.headers,
                                                  "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param
        assert "Traceback" not in r.text
    r = httpx.post(url, content=b"x" * (2 << 20), headers={
        **server.headers, "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_the_api_key_is_needed_everywhere_but_health(server):
    assert httpx.get(f"{server.url}/health").status_code == 200
    for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("POST", "/tokenize")]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={})
            assert r.status_code == 401, (path, r.text)
            assert r.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()


def test_static_files_only_the_page(server):
    r = httpx.get(f"{server.url}/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert "<script src=\"/app.js\">" in r.text and "http" not in r.text.split("<body>")[1]
    assert httpx.get(f"{server.url}/app.js").headers["content-type"].startswith(
        "text/javascript")
    assert httpx.get(f"{server.url}/style.css").headers["content-type"].startswith("text/css")
    for path in ["/../pyproject.toml", "/%2e%2e/%2e%2e/etc/passwd", "/static/",
                 "/static/../app.py", "/..%2fapp.py", "/app.py", "/static/index.html",
                 "//etc/passwd"]:
        r = httpx.get(f"{server.url}{path}")
        assert r.status_code == 404, (path, r.status_code)
        assert "root:" not in r.text and "import" not in r.text


def test_tokenizer_endpoints(server, byte_tok):
    r = httpx.post(f"{server.url}/tokenize", json={"prompt": "hi<|endoftext|>"},
                   headers=server.headers).json()
    assert r["tokens"] == [*byte_tok.encode("hi"), byte_tok.eot_id]
    r = httpx.post(f"{server.url}/detokenize", json={"tokens": byte_tok.encode("yo")},
                   headers=server.headers).json()
    assert r["prompt"] == "yo"


def test_a_client_that_gives_up_on_a_reply_frees_its_slot(server):
    # not streamed: nothing is written until the end, so the server has to notice the
    # hang-up by itself
    body = {"prompt": "a", "max_tokens": 100_000, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/completions", json=body, headers=server.headers,
                   timeout=httpx.Timeout(5, read=0.5))
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "active": 0,
                                                        "queued": 0}


def test_a_client_that_disconnects_frees_its_slot(server):
    # greedy: this model never says end-of-text here, so only the hang-up ends the stream
    body = {"prompt": "a", "max_tokens": 100_000, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers=server.headers) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert httpx.get(f"{server.url}/health").json()["active"] == 1
    deadline = time.monotonic() + 10
    while httpx.get(f"{server.url}/health").json()["active"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok", "active": 0,
                                                        "queued": 0}


def test_the_stream_interval_never_holds_back_the_end_of_a_reply(start_server):
    # tokens gather for up to a second between lots here, but a reply that is done goes out
    # at once: a few tokens of the toy model take milliseconds, not the interval
    s = start_server("--stream-interval", "1")
    try:
        body = {"prompt": "a", "max_tokens": 3, "stream": True, "temperature": 0}
        t0 = time.monotonic()
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=30) as r:
            lines = [line for line in r.iter_lines() if line.startswith("data: ")]
        elapsed = time.monotonic() - t0
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"
        assert elapsed < 0.9, f"the reply took {elapsed:.2f} s with a 1 s stream interval"
    finally:
        s.stop()


def test_bodies_that_are_not_json_are_refused_before_anything_runs(server):
    """A page of another site can POST a form or plain text without a CORS preflight: such
    bodies (and bodies without a type) are refused, so such a page cannot use the model."""
    url = f"{server.url}/v1/completions"
    body = json.dumps({"prompt": "hi", "max_tokens": 2}).encode()
    for media in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data",
                  None]:
        headers = {**server.headers, **({"Content-Type": media} if media else {})}
        r = httpx.post(url, content=body, headers=headers)
        assert r.status_code == 415, (media, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    r = httpx.post(url, content=body, headers={
        **server.headers, "Content-Type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200, r.text


def test_deeply_nested_json_is_a_400(server):
    deep = b"[" * 100_000 + b"]" * 100_000
    for path in ["/v1/chat/completions", "/tokenize"]:
        r = httpx.post(f"{server.url}{path}", content=deep, headers={
            **server.headers, "Content-Type": "application/json"})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["code"] == "invalid_json"


def test_head_answers_as_get_and_405_says_what_is_allowed(server):
    for path, headers in [("/health", {}), ("/", {}), ("/v1/models", server.headers)]:
        r = httpx.head(f"{server.url}{path}", headers=headers)
        assert r.status_code == 200 and r.content == b"", path
    r = httpx.get(f"{server.url}/v1/completions", headers=server.headers)
    assert r.status_code == 405 and r.headers["allow"] == "POST"


def test_the_bearer_scheme_is_case_insensitive(server):
    key = server.headers["Authorization"].split()[1]
    for given in [f"bearer {key}", f"BEARER {key}"]:
        r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": given})
        assert r.status_code == 200, given
    for given in [f"Basic {key}", key, f"Bearer {key}x", "Bearer"]:
        r = httpx.get(f"{server.url}/v1/models", headers={"Authorization": given})
        assert r.status_code == 401, given


def test_streamed_text_offsets_run_on_as_in_the_plain_reply(client, server):
    kw = dict(model=server.model_id, prompt="Once", max_tokens=6, temperature=0, logprobs=1,
              echo=True)
    plain = client.completions.create(**kw).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(**kw, stream=True)
              if c.choices and c.choices[0].logprobs]
    offsets = [o for c in chunks for o in c.logprobs.text_offset]
    assert offsets == plain.text_offset and offsets == sorted(set(offsets))


def test_a_vanishing_temperature_is_greedy_and_harms_no_other_stream(client, server):
    kw = dict(model=server.model_id, prompt="Once", max_tokens=8)
    other = client.completions.create(**{**kw, "max_tokens": 60}, temperature=1.0,
                                      seed=1, stream=True)
    first = next(other)  # decoding, beside the next request
    tiny = client.completions.create(**kw, temperature=1e-300).choices[0].text
    rest = [c.choices[0] for c in other if c.choices]  # an error would raise here
    assert [first.choices[0], *rest][-1].finish_reason in ("stop", "length")
    assert tiny == client.completions.create(**kw, temperature=0).choices[0].text
