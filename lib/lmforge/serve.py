"""`lmforge serve --model DIR`: an OpenAI-compatible chat endpoint over a chat model directory.

    lmforge serve --model data/sft/model                     # http://127.0.0.1:8000/v1
    lmforge serve --model data/rl/model --name lmforge-rl --port 8080 --device cuda

    curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"model": "model", "messages": [{"role": "user", "content": "What is 2 + 3?"}], "max_tokens": 64}'
    curl -sN http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\
      -d '{"messages": [{"role": "user", "content": "Hi"}], "stream": true}'

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    r = client.chat.completions.create(model="model", messages=messages, temperature=0, max_tokens=64)
    print(r.choices[0].message.content, r.choices[0].finish_reason, r.usage.model_extra["mean_logprob"])
    for chunk in client.chat.completions.create(model="model", messages=messages, stream=True):
        print(chunk.choices[0].delta.content or "", end="", flush=True)

Routes: `POST /v1/chat/completions`, `GET /v1/models` (and `/v1/models/{id}`), `GET /health`.
A conversation is rendered with the training chat format (`lmforge.chat.prompt_ids`) and sampled
by `lmforge.engine.steps` until <|bos|> or <|assistant_end|>, `max_tokens`, or a `stop` string
(the reply ends before it; streamed text that might begin one is held back until it is ruled
out). Streamed deltas are whole characters: bytes of a UTF-8 character split across tokens wait
for the rest; concatenated they equal the non-streaming content. `usage` carries an extra
field, `mean_logprob`: the mean log-probability of the reply's tokens under the model's own,
untempered distribution (the stop token that ended it not counted; null for an empty reply).

Request fields: `messages` (system / developer, user, assistant; content a string or text
parts), `max_completion_tokens` or `max_tokens` (default: the rest of the context), `temperature`
(default 1, 0 is greedy), `top_p`, `top_k` (not OpenAI's; vLLM's spelling), `seed`, `stop` (up to
4 strings), `stream`, `stream_options.include_usage`, `n` (1 only). Other fields OpenAI clients
send (`presence_penalty`, `user`, `metadata`, ...) are ignored; `model` may name anything (one
model is served; replies carry its `--name`). Refused with a 400: `n` > 1, `logprobs` /
`top_logprobs`, `tools` / `functions` (no tool calls), a `response_format` other than text, a
reply that cannot fit the context (no truncation). Errors are OpenAI's JSON shape,
`{"error": {"message", "type", "param", "code"}}`; bodies over 1 MiB get a 413.

One generation runs at a time (a lock, in one worker thread, so the event loop keeps
answering); other requests queue. There is no authentication: the server binds 127.0.0.1
unless `--host` says otherwise, and warns when that is not a loopback address.
"""

from __future__ import annotations

import argparse
import asyncio
import codecs
import ipaddress
import json
import logging
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import tiktoken
from pydantic import BaseModel, ConfigDict, Field

from .chat import ChatError, check, prompt_ids
from .engine import DEFAULT_STOPS, steps
from .model import GPT

if TYPE_CHECKING:
    from fastapi import FastAPI

log = logging.getLogger("lmforge.serve")

MAX_BODY = 1 << 20  # bytes of request body
MAX_STOPS = 4  # OpenAI's limit on stop strings


def load(model_dir: str | Path, *, device: str | None = None) -> tuple[GPT, tiktoken.Encoding]:
    """The model and tokenizer of `model_dir` (one of our model directories, or a Hugging Face
    export such as data/export/hf), the one place `lmforge serve` loads from."""
    from .chat_cli import load_chat_model

    return load_chat_model(model_dir, device)


# --- the request ----------------------------------------------------------------------------------

class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool | None = False


class ChatRequest(BaseModel):
    """The fields of OpenAI's chat completion request this server reads; others are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    messages: list[Any]  # checked by lmforge.chat.check, whose errors name the message
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)
    seed: int | None = Field(None, ge=-(1 << 63), lt=1 << 64)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[Any] | None = None
    functions: list[Any] | None = None
    response_format: dict[str, Any] | None = None


class ApiError(Exception):
    """A request the server refuses: the status and OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _bad(message: str, param: str | None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


def _turns(messages: list[Any]) -> list[tuple[str, str]]:
    """OpenAI messages as chat turns: `developer` is the system role, text parts are joined."""
    plain: list[Any] = []
    for i, m in enumerate(messages):
        if isinstance(m, Mapping):
            content = m.get("content")
            if isinstance(content, list):
                if not all(isinstance(p, Mapping) and p.get("type") == "text"
                           and isinstance(p.get("text"), str) for p in content):
                    raise _bad(f"messages: message {i} has a content part that is not text; only text is "
                               f"supported", "messages")
                content = "\n".join(p["text"] for p in content)
            m = {"role": "system" if m.get("role") == "developer" else m.get("role"), "content": content}
        plain.append(m)
    try:
        return check(plain, "messages", need_assistant=False)
    except ChatError as e:
        raise _bad(str(e), "messages") from None


@dataclass(frozen=True)
class Job:
    """One validated request: what to sample and how."""

    prompt: list[int]
    max_tokens: int
    temperature: float
    top_p: float | None
    top_k: int | None
    seed: int | None
    stops: tuple[str, ...]


def prepare(req: ChatRequest, encoder: tiktoken.Encoding, max_seq_len: int) -> Job:
    """The job a request asks for, or an ApiError saying what is wrong with it."""
    if req.n not in (None, 1):
        raise _bad(f"n={req.n} is not supported: this server returns one choice per request (leave n out or "
                   f"set it to 1)", "n")
    if req.logprobs or req.top_logprobs:
        raise _bad("per-token logprobs are not supported (usage.mean_logprob has the mean log-probability of "
                   "the reply)", "logprobs" if req.logprobs else "top_logprobs")
    if req.tools or req.functions:
        raise _bad("tool calls are not supported by this server", "tools" if req.tools else "functions")
    if req.response_format is not None and req.response_format.get("type") != "text":
        raise _bad('only response_format {"type": "text"} is supported', "response_format")
    stops = (req.stop,) if isinstance(req.stop, str) else tuple(req.stop or ())
    if len(stops) > MAX_STOPS or not all(stops):
        raise _bad(f"stop must be a non-empty string or a list of at most {MAX_STOPS} non-empty strings",
                   "stop")
    prompt = prompt_ids(encoder, _turns(req.messages))
    room = max_seq_len - len(prompt)
    if room < 1:
        raise _bad(f"the conversation is {len(prompt)} tokens, which leaves no room for a reply in the "
                   f"model's context of {max_seq_len} tokens; shorten it", "messages",
                   "context_length_exceeded")
    field = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    if asked is not None and asked > room:
        raise _bad(f"{field}={asked} is too large: the prompt is {len(prompt)} tokens and the model's "
                   f"context is {max_seq_len}, so at most {room} new tokens fit", field,
                   "context_length_exceeded")
    temperature = 1.0 if req.temperature is None else req.temperature
    return Job(prompt=prompt, max_tokens=asked or room, temperature=temperature, top_p=req.top_p,
               top_k=req.top_k, seed=req.seed, stops=stops)


# --- generation -----------------------------------------------------------------------------------

class Reply:
    """The reply's text as tokens arrive: `add` returns the new text that is safe to send (whole
    UTF-8 characters, nothing that may be the start of a stop string); after a stop string,
    `stopped` is set and the text ends before it."""

    def __init__(self, stops: Sequence[str] = ()):
        self.stops = tuple(stops)
        self.text, self.sent, self.stopped = "", 0, False
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as tiktoken's decode

    def add(self, data: bytes, *, final: bool = False) -> str:
        if self.stopped:
            return ""
        before = len(self.text)
        self.text += self._decoder.decode(data, final=final)
        longest = max(map(len, self.stops), default=0)
        # a stop string is found as soon as it is complete, so it ends in the new text
        found = [i for s in self.stops if (i := self.text.find(s, max(0, before - longest + 1))) >= 0]
        if found:
            self.stopped = True
            self.text = self.text[:min(found)]
            end = len(self.text)
        else:
            end = len(self.text) - (0 if final else self._open_stop())
        new, self.sent = self.text[self.sent:end], max(self.sent, end)
        return new

    def finish(self) -> str:
        """Whatever is held back once no more tokens come."""
        return self.add(b"", final=True)

    def _open_stop(self) -> int:
        """The length of the longest end of the text that a stop string starts with."""
        for k in range(min(len(self.text), max(map(len, self.stops), default=1) - 1), 0, -1):
            tail = self.text[-k:]
            if any(s.startswith(tail) for s in self.stops):
                return k
        return 0


@dataclass
class Outcome:
    tokens: int = 0
    logprob_sum: float = 0.0
    finish_reason: str = "length"

    def usage(self, prompt_tokens: int) -> dict[str, Any]:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": self.tokens,
                "total_tokens": prompt_tokens + self.tokens,
                "mean_logprob": self.logprob_sum / self.tokens if self.tokens else None}


def pieces(model: GPT, encoder: tiktoken.Encoding, job: Job, outcome: Outcome,
           cancelled: Callable[[], bool] = lambda: False) -> Iterator[str]:
    """The reply as text pieces as they are sampled (the caller holds the model); `outcome`
    fills in as they come. Stops early, between tokens, once `cancelled()`."""
    reply = Reply(job.stops)
    if cancelled():
        return
    for _, token, logprob in steps(model, [job.prompt], job.max_tokens, temperature=job.temperature,
                                   top_k=job.top_k, top_p=job.top_p, stop_tokens=DEFAULT_STOPS, seed=job.seed,
                                   vocab_size=encoder.n_vocab, logprobs=True):
        outcome.tokens += 1
        outcome.logprob_sum += logprob
        if text := reply.add(encoder.decode_single_token_bytes(token)):
            yield text
        if reply.stopped or cancelled():
            break
    if text := reply.finish():
        yield text
    if reply.stopped or outcome.tokens < job.max_tokens:
        outcome.finish_reason = "stop"


# --- the app --------------------------------------------------------------------------------------

def _json_bytes(status: int, body: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    return ({"type": "http.response.start", "status": status, "headers": headers},
            {"type": "http.response.body", "body": data})


class BodyLimit:
    """ASGI middleware: a 413 for a request body over `limit` bytes, declared or streamed."""

    def __init__(self, app: Any, limit: int = MAX_BODY):
        self.app, self.limit = app, limit

    async def _refuse(self, send: Any) -> None:
        refusal = ApiError(413, f"the request body is over the limit of {self.limit} bytes",
                           code="request_too_large")
        for message in _json_bytes(413, refusal.body()):
            await send(message)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:  # the server holds the client to it
            if length.isdigit() and int(length) > self.limit:
                return await self._refuse(send)
            return await self.app(scope, receive, send)
        chunks: list[bytes] = []
        size, more = 0, True
        while more:  # chunked: read it all here, then hand it on
            message = await receive()
            if message["type"] != "http.request":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return await self._refuse(send)
            more = message.get("more_body", False)
        body: list[bytes] | None = [b"".join(chunks)]

        async def replay() -> Any:
            nonlocal body
            if body is not None:
                data, body = body[0], None
                return {"type": "http.request", "body": data, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _validation_message(errors: Sequence[Any]) -> tuple[str, str | None]:
    """One readable message (and the top-level field) for pydantic / FastAPI validation errors."""
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"][:1]  # the top-level field
    if e.get("type") == "json_invalid":
        return f"the request body is not valid JSON ({e.get('ctx', {}).get('error', 'decode error')})", None
    if not loc:
        return ("the request body must be a JSON object, sent with Content-Type: application/json "
                f"({e.get('msg')})", None)
    if e.get("type") == "missing":
        return f"missing required parameter: '{loc[0]}'", loc[0]
    return f"invalid value for '{loc[0]}': {e.get('msg')} (got {e.get('input')!r:.80})", loc[0]


def create_app(model: GPT, encoder: tiktoken.Encoding, name: str) -> FastAPI:
    """The FastAPI app serving `model` as `name`; `app.state.lock` is held while it generates."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException
    from starlette.requests import Request

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lmforge-serve")
    lock, closing = threading.Lock(), threading.Event()
    created = int(time.time())
    max_seq_len = model.config.max_seq_len

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        closing.set()  # generations stop at their next token
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="lmforge serve", summary=f"OpenAI-compatible chat completions from {name}",
                  lifespan=lifespan)
    app.state.lock = lock
    app.add_middleware(BodyLimit)

    def error(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(e.errors())
        return error(ApiError(400, message, param=param))

    @app.exception_handler(Exception)
    async def _failed(_: Request, e: Exception) -> JSONResponse:  # logged by the server as well
        return error(ApiError(500, f"the server failed: {type(e).__name__}: {e}", kind="server_error"))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, e: HTTPException) -> JSONResponse:
        message = {404: f"Invalid URL ({request.method} {request.url.path})",
                   405: f"{request.method} is not allowed on {request.url.path} (allowed: "
                        f"{(e.headers or {}).get('Allow', 'none')})"}.get(e.status_code, str(e.detail))
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return JSONResponse(ApiError(e.status_code, message, code=code).body(), status_code=e.status_code,
                            headers=e.headers)

    def card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "lmforge"}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": name}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id}")
    async def one_model(model_id: str) -> dict[str, Any]:
        if model_id != name:
            raise ApiError(404, f"the model {model_id!r} does not exist; this server serves {name!r}",
                           param="model", code="model_not_found")
        return card()

    def run(job: Job, outcome: Outcome, emit: Callable[[str], None], cancelled: Callable[[], bool]) -> None:
        with lock:
            for text in pieces(model, encoder, job, outcome, lambda: cancelled() or closing.is_set()):
                emit(text)

    @app.post("/v1/chat/completions", response_model=None)
    async def completions(body: ChatRequest) -> JSONResponse | StreamingResponse:
        job = prepare(body, encoder, max_seq_len)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        loop = asyncio.get_running_loop()
        outcome = Outcome()
        if not body.stream:
            parts: list[str] = []
            await loop.run_in_executor(pool, run, job, outcome, parts.append, lambda: False)
            return JSONResponse({**head, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "".join(parts)}, "logprobs": None,
                 "finish_reason": outcome.finish_reason}], "usage": outcome.usage(len(job.prompt))})

        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            return _sse({**head, "object": "chat.completion.chunk", "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}], **extra})

        async def events() -> AsyncIterator[str]:
            queue: asyncio.Queue[str | None] = asyncio.Queue()
            gone = threading.Event()

            def put(item: str | None) -> None:
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, item)
                except RuntimeError:  # the event loop is closed: nobody is listening
                    gone.set()

            def work() -> None:
                try:
                    run(job, outcome, put, gone.is_set)
                finally:
                    put(None)

            done = loop.run_in_executor(pool, work)
            try:
                yield chunk({"role": "assistant", "content": ""})
                while (text := await queue.get()) is not None:
                    yield chunk({"content": text})
                try:
                    await done
                except Exception as e:  # the response has started: report it in the stream
                    log.exception("generation failed")
                    yield _sse(ApiError(500, f"generation failed: {e}", kind="server_error").body())
                    return
                yield chunk({}, outcome.finish_reason)
                if include_usage:
                    yield _sse({**head, "object": "chat.completion.chunk", "choices": [],
                                "usage": outcome.usage(len(job.prompt))})
                yield "data: [DONE]\n\n"
            finally:
                gone.set()  # a client that left stops the generation at its next token

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, allow_nan=False)}\n\n"


# --- the command ----------------------------------------------------------------------------------

def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def serve(args: argparse.Namespace) -> int:
    """`lmforge serve`: load the model, then answer requests until Ctrl-C."""
    import uvicorn

    model, encoder = load(args.model, device=args.device)
    name = args.name or Path(args.model).resolve().name
    app = create_app(model, encoder, name)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    if not _loopback(args.host):
        print(f"lmforge serve: warning: --host {args.host} is not a loopback address: anyone who can reach "
              f"this machine on port {args.port} can use the model (there is no authentication)",
              file=sys.stderr)
    cfg = model.config
    print(f"lmforge serve: {name} ({cfg.n_params():,} parameters, context {cfg.max_seq_len}) at "
          f"http://{host}:{args.port}/v1  (OpenAI base_url; Ctrl-C stops)", flush=True)
    uvicorn.run(app, host=args.host.strip("[]"), port=args.port, log_level=args.log_level)
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("serve", help="serve a chat model over an OpenAI-compatible HTTP API "
                       "(/v1/chat/completions)")
    s.add_argument("--model", required=True,
                   help="model directory with a chat template (e.g. data/sft/model)")
    s.add_argument("--name", default=None, help="the model id clients see (default: the directory's name)")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default: %(default)s, this machine only)")
    s.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    s.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    s.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level (default: %(default)s)")
    s.set_defaults(func=lambda args: serve(args))

