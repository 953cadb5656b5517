"""The OpenAI API's requests and responses: parsing, checking, and the JSON sent back.

Everything here is plain Python over dicts; ``app.py`` puts it behind HTTP. A bad request
raises ``ApiError``, which names the API's field (``max_tokens``, ``messages``), never a
command-line flag.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from minigpt_cli.chat.template import Template
from minigpt_cli.generate.batching import BatchRequest, TokenInfo
from minigpt_cli.generate.decoding import SamplingSettings


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, the field at fault and a code."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error",
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.kind, self.headers = kind, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


def _bad(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param, code)


# ---- reading fields ------------------------------------------------------------------------

def _number(body: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise _bad(key, f"must be {'an integer' if integer else 'a number'}, got "
                   f"{type(value).__name__}", "invalid_type")
    if not lo <= value <= hi:  # NaN fails this too
        raise _bad(key, f"must be between {lo:g} and {hi:g}, got {value}")
    return value


def _bool(body: dict, key: str, default: bool = False) -> bool:
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(key, f"must be true or false, got {type(value).__name__}", "invalid_type")
    return value


def _stops(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise _bad("stop", "must be a string or a list of strings", "invalid_type")
    if len(stops) > 4:
        raise _bad("stop", f"takes at most 4 sequences, got {len(stops)}")
    return stops


def _logit_bias(body: dict, vocab: int) -> dict[int, float] | None:
    """OpenAI's ``logit_bias``: token ids (as strings) to a bias in [-100, 100], added to
    the logits before sampling."""
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("logit_bias", "must be an object mapping token ids to numbers",
                   "invalid_type")
    out = {}
    for key, value in bias.items():
        if not (key.isascii() and key.isdigit() and int(key) < vocab):
            raise _bad("logit_bias", f"{key!r} is not a token id in [0, {vocab})")
        if isinstance(value, bool) or not isinstance(value, int | float) \
                or not -100 <= value <= 100:
            raise _bad("logit_bias", f"the bias of token {key} must be a number between "
                       f"-100 and 100, got {value!r}")
        out[int(key)] = float(value)
    return out or None


def _unsupported(param: str, message: str) -> ApiError:
    """A parameter whose meaning this server cannot honour: refused, not ignored, so that
    a client that asks for JSON or a tool call never gets free text as if it were."""
    return _bad(param, message, "unsupported_parameter")


def _refuse_unsupported_chat(body: dict) -> None:
    for key in ("tools", "functions"):
        if body.get(key):
            raise _unsupported(key, "function calling is not supported by this server")
    if body.get("tool_choice") not in (None, "none", "auto"):
        raise _unsupported("tool_choice", "function calling is not supported by this server")
    fmt = body.get("response_format")
    if fmt is not None and not (isinstance(fmt, dict) and fmt.get("type") == "text"):
        raise _unsupported("response_format", 'only {"type": "text"} is supported')
    if body.get("modalities") not in (None, ["text"]):
        raise _unsupported("modalities", 'only ["text"] is supported')


def _refuse_unsupported_completion(body: dict) -> None:
    if body.get("suffix") not in (None, ""):
        raise _unsupported("suffix", "is not supported (the model only continues a prompt)")
    if body.get("best_of") not in (None, body.get("n") or 1):
        raise _unsupported("best_of", "is not supported; leave it out (or equal to n)")


@dataclass
class Generation:
    """One API call, checked: its prompts (token ids) and how to decode them."""

    prompts: list[list[int]]
    settings: SamplingSettings
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None
    echo: bool = False
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    prompt_texts: list[str] = field(default_factory=list)
    stop_ids: tuple[int, ...] = ()
    reply: bool = False  # chat: replies, see StopFilter
    logit_bias: dict[int, float] | None = None
    reply_prefix: str = ""  # the chat template's, left out of the replies

    def requests(self) -> list[BatchRequest]:
        return [BatchRequest(p, self.settings, self.logprobs, self.echo,
                             self.frequency_penalty, self.presence_penalty, self.stop_ids,
                             self.reply, self.reply_prefix, self.logit_bias)
                for p in self.prompts]


def _sampling(body: dict, *, max_batch: int, default_max: int, min_tokens: int,
              stops: list[str], vocab: int) -> tuple[SamplingSettings, dict]:
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, key, default_max, min_tokens, 1_000_000, integer=True)
    settings = SamplingSettings(
        max_new_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0, 2),
        top_p=_number(body, "top_p", 1.0, 0, 1),
        top_k=_number(body, "top_k", 0, 0, 1_000_000, integer=True),
        min_p=_number(body, "min_p", 0.0, 0, 1),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 0.01, 100),
        stop=stops,
        seed=_number(body, "seed", None, 0, 2**63 - 1, integer=True),
        num_samples=_number(body, "n", 1, 1, max_batch, integer=True))
    if settings.top_p == 0:
        raise _bad("top_p", "must be greater than 0")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise _bad("stream_options", "must be an object", "invalid_type")
    extra = dict(
        stream=_bool(body, "stream"),
        include_usage=_bool(options or {}, "include_usage"),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2, 2),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2, 2),
        logit_bias=_logit_bias(body, vocab))
    return settings, extra


def check_model(body: dict, model_id: str) -> None:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", "must be a string", "invalid_type")
    if model not in (None, model_id):
        raise ApiError(404, f"model: '{model}' does not exist; this server has '{model_id}'",
                       "model", "model_not_found")


def _check_length(ids: list[int], param: str, context: int) -> list[int]:
    if len(ids) > context:
        raise ApiError(400, f"{param}: {len(ids)} tokens, more than the model's context of "
                       f"{context}", param, "context_length_exceeded")
    return ids


def _prompt_ids(prompt: Any, tokenizer, context: int) -> list[list[int]]:
    """A completions ``prompt``: a string, a list of strings, token ids or lists of them."""
    def is_ids(x):
        return isinstance(x, list) and x and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        items = [prompt]
    elif is_ids(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or is_ids(p) for p in prompt):
        items = prompt
    else:
        raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a "
                   "list of such lists (none empty)", "invalid_type")
    if len(items) > 64:
        raise _bad("prompt", f"takes at most 64 prompts at once, got {len(items)}")
    out = []
    for item in items:
        if isinstance(item, str):
            ids = tokenizer.encode(item) or [tokenizer.eot_id]
        else:
            if not all(0 <= t < tokenizer.vocab_size for t in item):
                raise _bad("prompt", f"token ids must be in [0, {tokenizer.vocab_size})")
            ids = list(item)
        out.append(_check_length(ids, "prompt", context))
    return out


def parse_completion(body: dict, tokenizer, context: int, max_batch: int) -> Generation:
    _refuse_unsupported_completion(body)
    prompts = _prompt_ids(body.get("prompt"), tokenizer, context)
    echo = _bool(body, "echo")
    settings, extra = _sampling(body, max_batch=max_batch, default_max=16, min_tokens=0,
                                stops=_stops(body), vocab=tokenizer.vocab_size)
    if settings.max_new_tokens == 0 and not echo:
        raise _bad("max_tokens", "must be at least 1 (0 is only for echo: true)")
    logprobs = _number(body, "logprobs", None, 0, 20, integer=True)
    return Generation(prompts, settings, logprobs=logprobs, echo=echo, **extra)


# ---- chat ----------------------------------------------------------------------------------

def _message_text(content: Any, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"
                    and isinstance(part.get("text"), str)):
                raise _bad(f"messages[{i}].content", "only text parts are supported",
                           "invalid_type")
            parts.append(part["text"])
        return "".join(parts)
    raise _bad(f"messages[{i}].content", "must be a string or a list of text parts",
               "invalid_type")


def render_chat(messages: list[tuple[str, str]], template: Template,
                tokenizer) -> tuple[list[int], list[str], tuple[int, ...]]:
    """The prompt's token ids, stop strings and end-of-turn ids for a conversation of
    (role, text) messages, laid out by the run's chat template.

    The one place that knows how chat messages become model input.
    """
    msgs = [{"role": "system" if role == "developer" else role, "content": text}
            for role, text in messages]
    ids = template.render(tokenizer, msgs, add_generation_prompt=True).ids
    return ids, list(template.stops), tuple(template.stop_ids(tokenizer))


def parse_chat(body: dict, tokenizer, context: int, max_batch: int,
               template: Template) -> Generation:
    _refuse_unsupported_chat(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "must be a non-empty list of messages", "invalid_type")
    parsed = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _bad(f"messages[{i}]", "must be an object with role and content",
                       "invalid_type")
        role = m.get("role")
        if role not in ("system", "developer", "user", "assistant"):
            raise _bad(f"messages[{i}].role", "must be system, developer, user or "
                       f"assistant, got {role!r}")
        parsed.append((role, _message_text(m.get("content"), i)))
    if not any(role in ("user", "assistant") for role, _ in parsed):
        raise _bad("messages", "needs at least one user message")
    ids, stops, stop_ids = render_chat(parsed, template, tokenizer)
    ids = _check_length(ids or [tokenizer.eot_id], "messages", context)
    settings, extra = _sampling(body, max_batch=max_batch, default_max=context,
                                min_tokens=1, stops=stops + _stops(body),
                                vocab=tokenizer.vocab_size)
    logprobs = None
    if _bool(body, "logprobs"):
        logprobs = _number(body, "top_logprobs", 0, 0, 20, integer=True)
    return Generation([ids], settings, logprobs=logprobs, stop_ids=stop_ids, reply=True,
                      reply_prefix=template.reply_prefix, **extra)


# ---- responses -----------------------------------------------------------------------------

def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


FINISH = {"stop": "stop", "eot": "stop", "length": "length"}


def completion_logprobs(tokenizer, infos: list[TokenInfo], offset: int = 0) -> dict:
    """The legacy completions ``logprobs`` object: tokens, their log-probs, the top ones
    and each token's offset in the text."""
    tokens, offsets, pos = [], [], offset
    for info in infos:
        text = tokenizer.decode([info.token])
        tokens.append(text)
        offsets.append(pos)
        pos += len(text)
    return {"tokens": tokens, "token_logprobs": [i.logprob for i in infos],
            "top_logprobs": [None if i.top is None else
                             {tokenizer.decode([t]): lp for t, lp in i.top.items()}
                             for i in infos],
            "text_offset": offsets}


def chat_logprobs(tokenizer, infos: list[TokenInfo]) -> dict:
    def entry(token: int, logprob: float) -> dict:
        text = tokenizer.decode([token])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(i.token, i.logprob),
                         "top_logprobs": [entry(t, lp) for t, lp in (i.top or {}).items()]}
                        for i in infos]}
