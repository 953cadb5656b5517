"""The HTTP layer: FastAPI routes over the scheduler, OpenAI's JSON and server-sent events.

The routes parse and check (``api.py``), the scheduler owns the batch
(``generate/batching.py``), the engine computes. FastAPI is imported here only, and this
module only by ``minigpt serve``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections import deque
from dataclasses import dataclass
from importlib import resources

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from minigpt_cli.chat.template import TEMPLATES, Template
from minigpt_cli.generate.batching import (
    Done,
    Failed,
    QueueFull,
    SampleFinished,
    Scheduler,
    Started,
    Token,
)
from minigpt_cli.serve import api
from minigpt_cli.serve.api import ApiError

GET = ["GET", "HEAD"]  # HEAD answers as GET does, without the body (probes, curl -I)
MAX_BODY = 1 << 20  # bytes in a request body
WATCH_INTERVAL = 1.0  # seconds between checks that a client is still connected
_GONE = object()  # the event that says the client went away
EOS_TOKEN = "<|endoftext|>"  # how /tokenize and /tokenizer_info spell end-of-text
STATIC = {  # the web page: a fixed set of files, so no path can reach anything else
    "/": ("index.html", "text/html; charset=utf-8"),
    "/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/style.css": ("style.css", "text/css; charset=utf-8"),
}


@dataclass
class ServedModel:
    scheduler: Scheduler
    tokenizer: object
    model_id: str
    step: int | None
    val_loss: float | None
    context: int
    max_batch: int
    template: Template = TEMPLATES["plain"]
    stream_interval: float = 0.0  # seconds a stream waits after each chunk, letting tokens gather


def create_app(served: ServedModel, api_key: str | None = None,
               cors_origins: list[str] | tuple = ()) -> FastAPI:
    """The API and the page. ``cors_origins``: web origins (or ``*``) whose pages may call
    the API from a browser; none by default, so only the page served here can."""
    app = FastAPI(title="minigpt", docs_url=None, redoc_url=None, openapi_url=None)
    tok = served.tokenizer
    if cors_origins:
        from starlette.middleware.cors import CORSMiddleware

        # any request header: OpenAI's JavaScript client sends its own (x-stainless-...)
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST"], allow_headers=["*"],
                           expose_headers=["Retry-After"], max_age=600)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        code = "not_found" if e.status_code == 404 else None
        return JSONResponse(ApiError(e.status_code, str(e.detail), None, code).body(),
                            status_code=e.status_code, headers=e.headers)  # 405's Allow

    @app.exception_handler(Exception)
    async def unexpected(request: Request, e: Exception):
        return JSONResponse(ApiError(500, "internal error", kind="server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                given.strip().encode(), api_key.encode()):
            raise ApiError(401, "invalid API key: send the header 'Authorization: Bearer KEY'",
                           None, "invalid_api_key")

    async def read_json(request: Request) -> dict:
        authorize(request)
        # JSON only: a page of any other site may send a form or plain text without asking
        # the browser first (no CORS preflight), and would then use the model unasked
        media = request.headers.get("content-type", "").partition(";")[0].strip().lower()
        if media != "application/json":
            raise ApiError(415, f"the body must be JSON, sent with the header 'Content-Type: "
                           f"application/json' (got {media or 'none'!r})", None,
                           "unsupported_media_type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > MAX_BODY:
            raise _too_large()
        data = bytearray()
        try:
            async for chunk in request.stream():
                data += chunk
                if len(data) > MAX_BODY:
                    raise _too_large()
        except ClientDisconnect:  # nobody is left to answer
            raise ApiError(499, "the client closed the connection", None, "cancelled") from None
        try:
            body = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the body is not valid JSON: {e}", None, "invalid_json") from e
        except RecursionError:
            raise ApiError(400, "the body is not valid JSON: nested too deeply", None,
                           "invalid_json") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the body must be a JSON object", None, "invalid_json")
        return body

    def model_card() -> dict:
        return {"id": served.model_id, "object": "model", "created": 0, "owned_by": "minigpt",
                "step": served.step, "val_loss": served.val_loss,
                "context_length": served.context}

    @app.api_route("/health", methods=GET)
    async def health():
        return {"status": "ok", "active": served.scheduler.active,
                "queued": served.scheduler.queued}

    @app.api_route("/v1/models", methods=GET)
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.api_route("/v1/models/{model_id:path}", methods=GET)
    async def model(model_id: str, request: Request):
        authorize(request)
        api.check_model({"model": model_id}, served.model_id)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await read_json(request)
        api.check_model(body, served.model_id)
        gen = api.parse_completion(body, tok, served.context, served.max_batch)
        return await _respond(served, request, gen, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await read_json(request)
        api.check_model(body, served.model_id)
        gen = api.parse_chat(body, tok, served.context, served.max_batch, served.template)
        return await _respond(served, request, gen, chat=True)

    # vLLM's tokenizer endpoints: evaluation harnesses (lm-eval's local-completions)
    # tokenize through them, so scores use exactly the server's tokens.
    @app.api_route("/tokenizer_info", methods=GET)
    async def tokenizer_info(request: Request):
        authorize(request)
        return {"eos_token": EOS_TOKEN, "bos_token": None, "pad_token": None,
                "model_max_length": served.context, "tokenizer_class": tok.spec}

    @app.post("/tokenize")
    async def tokenize(request: Request):
        body = await read_json(request)
        text = body.get("prompt")
        if not isinstance(text, str):
            raise ApiError(400, "prompt: must be a string", "prompt", "invalid_type")
        ids = []
        for i, part in enumerate(text.split(EOS_TOKEN)):
            ids += ([tok.eot_id] if i else []) + tok.encode(part)
        return {"tokens": ids, "count": len(ids), "max_model_len": served.context}

    @app.post("/detokenize")
    async def detokenize(request: Request):
        body = await read_json(request)
        ids = body.get("tokens")
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tok.vocab_size
                for t in ids):
            raise ApiError(400, f"tokens: must be a list of ids in [0, {tok.vocab_size})",
                           "tokens", "invalid_type")
        return {"prompt": tok.decode(ids)}

    for route, (name, media) in STATIC.items():
        app.add_api_route(route, _static(name, media), methods=GET)
    return app


def _too_large() -> ApiError:
    return ApiError(413, f"the body is larger than {MAX_BODY} bytes", None,
                    "request_too_large")


def _static(name: str, media: str):
    content = resources.files("minigpt_cli.serve").joinpath("static", name).read_bytes()

    async def page():
        return Response(content, media_type=media,
                        headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
    return page


# ---- running a generation ----------------------------------------------------------------------

class _Calls:
    """The scheduler requests of one API call, their events merged into one stream.

    The scheduler's thread appends every event to a buffer as it happens and wakes the
    event loop only when it is not already due to look, so a loop that falls behind is not
    woken once per token. The loop takes everything buffered at once, and after each lot
    waits ``served.stream_interval`` seconds (the tokens sampled meanwhile go out together,
    in one chunk per sample) before it looks again, or less when a request ends meanwhile:
    the end of a reply is never held back. A watcher polls, once a second, whether
    the client is still there, and cancels the requests (freeing their rows before the
    next step) when it is not. A stream also notices a hang-up when its next write fails.
    """

    def __init__(self, served: ServedModel, gen: api.Generation, request: Request):
        self.served, self.gen = served, gen
        self.buffer: deque = deque()  # (call index, event), appended by the scheduler
        self.due = False  # the loop has been asked to look at the buffer
        self.arrived = asyncio.Event()
        self.resume = asyncio.Event()  # ends a pause between lots: its timer, or a request done
        self.handles = []
        self.pending: list = []
        self.watcher: asyncio.Task | None = None
        loop = asyncio.get_running_loop()
        try:
            for i, req in enumerate(gen.requests()):
                def emit(event, i=i):
                    self.buffer.append((i, event))
                    if isinstance(event, Done | Failed):  # the last lot goes out at once
                        loop.call_soon_threadsafe(self.resume.set)
                    if not self.due:
                        self.due = True
                        loop.call_soon_threadsafe(self.arrived.set)
                self.handles.append(served.scheduler.submit(req, emit))
        except QueueFull as e:
            self.cancel()
            raise ApiError(429, f"the server is busy: {e.message}", None,
                           "rate_limit_exceeded", kind="rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        self.watcher = loop.create_task(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while not all(h.finished for h in self.handles):
            if await request.is_disconnected():
                self.cancel()
                self.buffer.append((-1, _GONE))
                self.arrived.set()
                return
            await asyncio.sleep(WATCH_INTERVAL)

    def cancel(self) -> None:
        """Free the rows of every request not yet done, and stop watching."""
        for h in self.handles:
            if not h.finished:
                self.served.scheduler.cancel(h)
        if self.watcher is not None and asyncio.current_task() is not self.watcher:
            self.watcher.cancel()

    async def _take(self) -> list:
        """Everything buffered, waiting for at least one event."""
        while True:
            self.due = False  # before taking: an event appended after this wakes the loop
            self.arrived.clear()
            taken = [self.buffer.popleft() for _ in range(len(self.buffer))]
            if taken:
                return taken
            await self.arrived.wait()

    async def started(self) -> list[Started]:
        """Wait until every prompt is in the batch; a timeout or shutdown is an error."""
        firsts: dict[int, Started] = {}
        while len(firsts) < len(self.handles):
            for i, event in await self._take():
                if event is _GONE:
                    raise ApiError(499, "the client closed the connection", None,
                                   "cancelled")
                if isinstance(event, Failed):
                    self.cancel()
                    raise ApiError(503, event.message, None, event.reason,
                                   kind="server_error", headers={"Retry-After": "1"})
                if isinstance(event, Started):
                    firsts[i] = event
                else:
                    self.pending.append((i, event))
        return [firsts[i] for i in range(len(self.handles))]

    async def batches(self):
        """The rest of the events, until every request is done, in lots of all that arrived
        together; stops when the client goes away."""
        batch, done = self.pending, 0
        while True:
            done += sum(isinstance(event, Done | Failed) for _, event in batch)
            if batch:
                yield batch
            if done == len(self.handles):
                return
            if batch and self.served.stream_interval > 0:
                self.due = True  # the loop looks after the pause anyway: no wake-ups before
                timer = asyncio.get_running_loop().call_later(self.served.stream_interval,
                                                              self.resume.set)
                await self.resume.wait()
                timer.cancel()
                self.resume.clear()  # what ended is in the buffer now
            batch = await self._take()
            if any(event is _GONE for _, event in batch):
                return

    async def events(self):
        """The same events one by one."""
        async for batch in self.batches():
            for item in batch:
                yield item


async def _respond(served: ServedModel, request: Request, gen: api.Generation, chat: bool):
    calls = _Calls(served, gen, request)
    try:
        starts = await calls.started()
    except BaseException:
        calls.cancel()
        raise
    n = gen.settings.num_samples
    if gen.stream:
        stream = _chat_stream if chat else _completion_stream
        return StreamingResponse(_guard(calls, stream(served, gen, calls, starts)),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    try:
        texts = {}
        infos: dict[int, list] = {}
        finish, failed = {}, None
        async for i, event in calls.events():
            if isinstance(event, Token):
                k = i * n + event.sample
                texts[k] = texts.get(k, "") + event.text
                infos.setdefault(k, []).append(event.info)
            elif isinstance(event, SampleFinished):
                finish[i * n + event.sample] = api.FINISH[event.finish_reason]
            elif isinstance(event, Failed):
                failed = event
    finally:
        calls.cancel()
    if failed is not None:
        raise ApiError(503, failed.message, None, failed.reason, kind="server_error")
    tok = served.tokenizer
    prompt_tokens = sum(s.prompt_tokens for s in starts)
    completion_tokens = sum(h.completion_tokens for h in calls.handles)
    choices = []
    for k in range(len(starts) * n):
        start, text, toks = starts[k // n], texts.get(k, ""), infos.get(k, [])
        reason = finish.get(k, "length")
        if chat:
            choices.append({"index": k, "message": {"role": "assistant", "content": text},
                            "logprobs": api.chat_logprobs(tok, toks)
                            if gen.logprobs is not None else None,
                            "finish_reason": reason})
            continue
        logprobs = None
        if gen.echo:
            prefix = tok.decode(gen.prompts[k // n])
            text = prefix + text
            toks = start.prompt + toks
        if gen.logprobs is not None:
            logprobs = api.completion_logprobs(tok, toks)
        choices.append({"index": k, "text": text, "logprobs": logprobs,
                        "finish_reason": reason})
    return {"id": api.new_id("chatcmpl" if chat else "cmpl"),
            "object": "chat.completion" if chat else "text_completion",
            "created": api.now(), "model": served.model_id, "choices": choices,
            "usage": api.usage(prompt_tokens, completion_tokens)}


async def _guard(calls: _Calls, chunks):
    """Server-sent events; whatever ends the stream (a disconnect too) frees the rows."""
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        calls.cancel()


async def _chat_stream(served, gen, calls: _Calls, starts):
    n, tok = gen.settings.num_samples, served.tokenizer
    head = {"id": api.new_id("chatcmpl"), "object": "chat.completion.chunk",
            "created": api.now(), "model": served.model_id}

    def chunk(k, delta, reason=None, logprobs=None):
        return {**head, "choices": [{"index": k, "delta": delta, "logprobs": logprobs,
                                     "finish_reason": reason}]}

    for k in range(len(starts) * n):
        yield chunk(k, {"role": "assistant", "content": ""})
    async for i, event in _coalesced(calls, gen):
        if isinstance(event, Token):
            lp = api.chat_logprobs(tok, [event.info]) if gen.logprobs is not None else None
            if event.text or lp:
                yield chunk(i * n + event.sample, {"content": event.text}, logprobs=lp)
        elif isinstance(event, SampleFinished):
            yield chunk(i * n + event.sample, {}, api.FINISH[event.finish_reason])
        elif isinstance(event, Failed):
            yield _failure(event)
            return
    if gen.include_usage:
        yield {**head, "choices": [], "usage": _usage(starts, calls)}


async def _completion_stream(served, gen, calls: _Calls, starts):
    n, tok = gen.settings.num_samples, served.tokenizer
    head = {"id": api.new_id("cmpl"), "object": "text_completion", "created": api.now(),
            "model": served.model_id}

    def chunk(k, text, reason=None, logprobs=None):
        return {**head, "choices": [{"index": k, "text": text, "logprobs": logprobs,
                                     "finish_reason": reason}]}

    offsets: dict[int, int] = {}  # where each choice's next token starts in its text

    def logprobs(k, infos):
        if gen.logprobs is None:
            return None
        lp = api.completion_logprobs(tok, infos, offsets.get(k, 0))
        offsets[k] = offsets.get(k, 0) + sum(map(len, lp["tokens"]))
        return lp

    if gen.echo:
        for k in range(len(starts) * n):
            yield chunk(k, tok.decode(gen.prompts[k // n]),
                        logprobs=logprobs(k, starts[k // n].prompt))
    async for i, event in _coalesced(calls, gen):
        if isinstance(event, Token):
            lp = logprobs(i * n + event.sample, [event.info])
            if event.text or lp:
                yield chunk(i * n + event.sample, event.text, logprobs=lp)
        elif isinstance(event, SampleFinished):
            yield chunk(i * n + event.sample, "", api.FINISH[event.finish_reason])
        elif isinstance(event, Failed):
            yield _failure(event)
            return
    if gen.include_usage:
        yield {**head, "choices": [], "usage": _usage(starts, calls)}


async def _coalesced(calls: _Calls, gen: api.Generation):
    """The events of a stream, where a sample's tokens that arrived together are joined
    into one: a client (or the event loop) that falls behind the decoder catches up with
    one chunk instead of one per token. Tokens are reported one by one when their
    log-probabilities are asked for. Each sample's events keep their order."""
    async for batch in calls.batches():
        if gen.logprobs is not None or len(batch) == 1:
            for item in batch:
                yield item
            continue
        merged, open_tokens = [], {}  # (call, sample) -> where its latest Token is in merged
        for i, event in batch:
            key = (i, getattr(event, "sample", None))
            if isinstance(event, Token):
                j = open_tokens.get(key)
                if j is not None:
                    first = merged[j][1]
                    merged[j] = (i, Token(first.sample, first.info, first.text + event.text))
                    continue
                open_tokens[key] = len(merged)
            else:
                open_tokens.pop(key, None)
            merged.append((i, event))
        for item in merged:
            yield item


def _failure(event: Failed) -> dict:
    """What a stream sends when generation fails after its headers went out."""
    return ApiError(503, event.message, None, event.reason, kind="server_error").body()


def _usage(starts, calls: _Calls) -> dict:
    return api.usage(sum(s.prompt_tokens for s in starts),
                     sum(h.completion_tokens for h in calls.handles))
