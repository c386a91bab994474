"""The OpenAI-compatible HTTP server around gpt.serving.engine (FastAPI on uvicorn).

    POST /v1/completions        prompt (string or list of strings)
    POST /v1/chat/completions   messages, rendered with CHAT_TEMPLATE (plain text, for base models)
    GET  /v1/models             the one model served
    GET  /health                503 while the model loads and compiles, then 200
    GET  /metrics               Prometheus text

The model runs in a process of its own (gpt.serving.remote.EngineProcess) or on a thread of
this one (gpt.serving.engine.Engine); handlers only tokenize, submit and relay the engine's
outputs (handed over with loop.call_soon_threadsafe), so no torch call runs in an async handler.
Bad requests get 400 with OpenAI's error body {"error": {message, type, param, code}} naming
the field; a full queue gets 429 at once. docs/serving.md has the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from gpt.errors import GptError
from gpt.serving.engine import (
    Engine,
    EngineStoppedError,
    Output,
    QueueFullError,
    RequestError,
    SamplingParams,
    merge_outputs,
)
from gpt.serving.remote import EngineProcess
from gpt.tokenizer import Tokenizer

CHAT_STOP = "\nUser:"
CHAT_TEMPLATE_DOC = """\
{system content}\\n\\n          (each system message, if any)
User: {user content}\\n
Assistant: {assistant content}\\n
...
Assistant:                      (the model continues from here; generation also stops at "\\nUser:")"""


# -- request bodies ---------------------------------------------------------------------------
class _Body(BaseModel):
    # strict: "16" is not an int and "true" is not a bool, as in OpenAI's API; unknown fields are ignored
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _Common(_Body):
    model: str | None = None
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = Field(default=0, description="extension: 0 (or -1) = off")
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    ignore_eos: bool = False  # extension (benchmarks)
    return_token_ids: bool = False  # extension: each choice also carries its token ids


class CompletionBody(_Common):
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default for completions
    logprobs: int | None = None
    echo: bool = False


class ChatMessage(_Body):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[dict[str, Any]]


class ChatBody(_Common):
    messages: list[ChatMessage]
    logprobs: bool = False
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None, code=None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or ("invalid_request_error" if status == 400 else "server_error")


def error_response(e: ApiError) -> JSONResponse:
    body = {"error": {"message": e.message, "type": e.type, "param": e.param, "code": e.code}}
    return JSONResponse(body, status_code=e.status)


def render_chat(messages: list[ChatMessage]) -> str:
    """The plain-text chat template (CHAT_TEMPLATE_DOC)."""
    out = []
    for i, m in enumerate(messages):
        if isinstance(m.content, str):
            text = m.content
        else:
            parts = []
            for j, part in enumerate(m.content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise ApiError(400, "only text content parts are supported", f"messages.{i}.content.{j}")
                parts.append(part["text"])
            text = "".join(parts)
        if m.role in ("system", "developer"):
            out.append(f"{text}\n\n")
        elif m.role == "user":
            out.append(f"User: {text}\n")
        else:
            out.append(f"Assistant: {text}\n")
    return "".join(out) + "Assistant:"


def token_text(tokenizer: Tokenizer, token: int) -> str:
    """A token's own text for logprobs (a sentencepiece piece with its leading space)."""
    sp = getattr(tokenizer, "sp", None)
    if sp is not None:
        return sp.id_to_piece(token).replace("\u2581", " ")
    return tokenizer.decode([token])


# -- the app ------------------------------------------------------------------------------------
@dataclass
class ServerState:
    model_name: str
    engine: Engine | EngineProcess | None = None
    tokenizer: Tokenizer | None = None
    load_error: str | None = None


def create_app(load: Callable[[], Engine | EngineProcess], model_name: str = "gpt", drain_s: float = 5.0) -> FastAPI:
    """The ASGI app. `load` builds and starts the engine (model loading, compiling); it runs on a
    thread of its own at startup, and /health says 503 until it returns a ready engine."""
    state = ServerState(model_name)

    def loader() -> None:
        try:
            engine = load()
            engine.wait_ready()
            state.tokenizer = engine.tokenizer
            state.engine = engine
        except (GptError, OSError, RuntimeError) as e:
            state.load_error = str(e).splitlines()[0] if str(e) else type(e).__name__

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        threading.Thread(target=loader, name="gpt-loader", daemon=True).start()
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.stop, drain_s)

    app = FastAPI(title="gpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.gpt = state

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, e: ApiError) -> JSONResponse:
        if e.status == 400 and state.engine is not None:
            state.engine.request_rejected("bad_request")
        return error_response(e)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, e: Exception) -> JSONResponse:
        msg = (str(e).splitlines() or [""])[0]
        return error_response(ApiError(500, f"internal error: {type(e).__name__}: {msg}"))

    def ready_engine() -> Engine | EngineProcess:
        if state.engine is None:
            why = state.load_error or "the model is still loading"
            raise ApiError(503, why, type_="service_unavailable")
        return state.engine

    @app.get("/health")
    async def health() -> Response:
        if state.engine is not None and state.engine.error is None:
            return JSONResponse({"status": "ok"})
        status = "error" if state.load_error or (state.engine and state.engine.error) else "loading"
        return JSONResponse({"status": status, "detail": state.load_error}, status_code=503)

    @app.get("/metrics")
    async def metrics_text() -> Response:
        e = state.engine
        if e is None:
            return PlainTextResponse("# the model is still loading\n", status_code=503)
        try:
            text = await asyncio.to_thread(e.metrics_text)  # the engine may be in another process
        except GptError as err:
            return PlainTextResponse(f"# {err}\n", status_code=503)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> Response:
        data = [{"id": state.model_name, "object": "model", "created": int(time.time()), "owned_by": "gpt"}]
        return JSONResponse({"object": "list", "data": data})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        engine = ready_engine()
        body = await parse_body(request, CompletionBody)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise ApiError(400, "prompt is an empty list; send at least one prompt", "prompt")
        if body.echo:
            raise ApiError(400, "echo is not supported; drop it or set it to false", "echo")
        if body.logprobs is not None and not 0 <= body.logprobs <= 20:
            raise ApiError(400, f"logprobs={body.logprobs} must be between 0 and 20", "logprobs")
        params = sampling_params(body, body.max_tokens, body.logprobs, [])
        encoded = [encode(engine.tokenizer, p, "prompt" if len(prompts) == 1 else f"prompt.{i}")
                   for i, p in enumerate(prompts)]  # fmt: skip
        return await run(request, engine, body, encoded, params, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        engine = ready_engine()
        body = await parse_body(request, ChatBody)
        if not body.messages:
            raise ApiError(400, "messages is empty; send at least one message", "messages")
        top = body.top_logprobs
        if top is not None and not 0 <= top <= 20:
            raise ApiError(400, f"top_logprobs={top} must be between 0 and 20", "top_logprobs")
        if top is not None and not body.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs=true", "top_logprobs")
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        params = sampling_params(body, max_tokens, (top or 0) if body.logprobs else None, [CHAT_STOP])
        prompt = render_chat(body.messages)
        return await run(request, engine, body, [encode(engine.tokenizer, prompt, "messages")], params, chat=True)

    async def run(request, engine, body, encoded, params, chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[int, Output]] = asyncio.Queue()
        reqs = []

        def sink_for(i: int):
            def sink(out: Output) -> None:  # engine thread
                try:
                    loop.call_soon_threadsafe(queue.put_nowait, (i, out))
                except RuntimeError:  # the loop has closed (server shutdown)
                    pass

            return sink

        try:
            for i, ids in enumerate(encoded):
                try:
                    reqs.append(engine.submit(ids, SamplingParams(**vars(params)), sink_for(i)))
                except RequestError as e:
                    param = e.param
                    if param == "prompt" and chat:
                        param = "messages"
                    elif param == "prompt" and len(encoded) > 1:
                        param = f"prompt.{i}"
                    raise ApiError(400, str(e), param) from None
        except QueueFullError as e:
            for r in reqs:
                engine.cancel(r)
            engine.request_rejected("queue_full")
            raise ApiError(429, str(e), None, "rate_limit_error", "queue_full") from None
        except EngineStoppedError as e:
            raise ApiError(503, str(e), None, "service_unavailable") from None
        except ApiError:
            for r in reqs:
                engine.cancel(r)
            raise
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        fmt = _Formatter(state, engine.tokenizer, body, rid, chat, len(encoded))
        if body.stream:
            return StreamingResponse(stream(request, engine, reqs, queue, fmt), media_type="text/event-stream")
        parts: dict[int, list[Output]] = {i: [] for i in range(len(encoded))}
        left = len(encoded)
        try:
            while left:
                try:
                    i, out = await asyncio.wait_for(queue.get(), 0.25)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        return Response(status_code=499)
                    continue
                parts[i].append(out)
                left -= out.finish_reason is not None
        finally:
            for r in reqs:
                engine.cancel(r)  # a no-op for finished requests; frees the slot of a gone client
        outs = [merge_outputs(parts[i]) for i in range(len(encoded))]
        if any(o.finish_reason == "error" for o in outs):
            raise ApiError(500, "the model failed on this request (see the server's log); retry it")
        return JSONResponse(fmt.whole(outs))

    async def stream(request, engine, reqs, queue, fmt) -> AsyncIterator[str]:
        left = len(reqs)
        usage = [0, 0]
        try:
            if fmt.chat:
                yield fmt.sse(fmt.chunk(0, role=True))
            while left:
                i, out = await queue.get()
                if out.finish_reason is not None:
                    left -= 1
                    usage[0] += out.prompt_tokens
                    usage[1] += out.completion_tokens
                if out.finish_reason == "error":
                    yield fmt.sse({"error": {"message": "the model failed on this request (see the server's log)",
                                             "type": "server_error", "param": None, "code": None}})  # fmt: skip
                    continue
                if out.text or out.finish_reason is not None or (out.logprobs and fmt.wants_logprobs):
                    yield fmt.sse(fmt.chunk(i, out=out))
            if fmt.include_usage:
                yield fmt.sse(fmt.usage_chunk(*usage))
            yield "data: [DONE]\n\n"
        finally:  # also on a client that disconnected (Starlette cancels this generator)
            for r in reqs:
                engine.cancel(r)

    return app


async def parse_body(request: Request, model: type[_Body]) -> Any:
    raw = await request.body()
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"the request body is not valid JSON ({e}); send a JSON object") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        body = model.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = [str(x) for x in err["loc"] if not (isinstance(x, str) and x in _TYPE_TAGS)]
        param = ".".join(loc) or None
        raise ApiError(400, f"{param or 'body'}: {err['msg']}", param) from None
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported; only n=1", "n")
    return body


_TYPE_TAGS = {"str", "list[str]", "int", "float", "bool", "list[dict[str,any]]", "function-after", "none"}


def sampling_params(body: _Common, max_tokens: int | None, logprobs: int | None, extra_stop: list[str]):
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 16:
        raise ApiError(400, f"stop has {len(stop)} strings; send at most 16", "stop")
    if any(not s for s in stop):
        raise ApiError(400, "stop contains an empty string; remove it", "stop")
    top_k = 0 if body.top_k == -1 else body.top_k
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_k=top_k,
        top_p=body.top_p,
        seed=body.seed,
        stop=stop + extra_stop,
        logprobs=logprobs,
        ignore_eos=body.ignore_eos,
    )


def encode(tokenizer: Tokenizer, text: str, param: str) -> list[int]:
    if not text:
        raise ApiError(400, f"{param} is empty; send some text to continue", param)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start]
        raise ApiError(
            400, f"{param} contains U+{ord(bad):04X}, which the tokenizer cannot encode; remove it", param
        ) from None
    try:
        return tokenizer.encode(text, bos=getattr(tokenizer, "bos_id", None) is not None)
    except GptError as e:
        raise ApiError(400, f"{param}: {e}", param) from None


class _Formatter:
    """OpenAI response and chunk bodies for one request."""

    def __init__(self, state: ServerState, tokenizer, body, rid: str, chat: bool, n_choices: int) -> None:
        self.state, self.tokenizer, self.body, self.id, self.chat = state, tokenizer, body, rid, chat
        self.created = int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.wants_logprobs = (body.logprobs is not None) if not chat else bool(body.logprobs)
        self.offsets = [0] * n_choices

    def sse(self, obj: dict) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def _head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_name}

    def logprobs(self, i: int, out: Output) -> dict | None:
        if not self.wants_logprobs:
            return None
        tt = lambda t: token_text(self.tokenizer, t)
        if self.chat:
            content = []
            for e in out.logprobs:
                s = tt(e.token)
                top = [{"token": tt(t), "logprob": lp, "bytes": list(tt(t).encode())} for t, lp in e.top]
                content.append({"token": s, "logprob": e.logprob, "bytes": list(s.encode()), "top_logprobs": top})
            return {"content": content}
        tokens, lps, tops, offs = [], [], [], []
        for e in out.logprobs:
            s = tt(e.token)
            tokens.append(s)
            lps.append(e.logprob)
            tops.append({tt(t): lp for t, lp in e.top})
            offs.append(self.offsets[i])
            self.offsets[i] += len(s)
        return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}

    def _choice(self, i: int, out: Output, delta: bool) -> dict:
        c: dict[str, Any] = {"index": i}
        if self.chat:
            if delta:
                c["delta"] = {"content": out.text} if out.text or out.finish_reason is None else {}
            else:
                c["message"] = {"role": "assistant", "content": out.text}
        else:
            c["text"] = out.text
        c["logprobs"] = self.logprobs(i, out)
        c["finish_reason"] = _finish(out.finish_reason)
        if self.body.return_token_ids:
            c["token_ids"] = out.token_ids
        return c

    def chunk(self, i: int, out: Output | None = None, role: bool = False) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        if role:
            delta = {"role": "assistant", "content": ""}
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": None}
            d = {**self._head(obj), "choices": [choice]}
        else:
            d = {**self._head(obj), "choices": [self._choice(i, out, delta=True)]}
        if self.include_usage:
            d["usage"] = None
        return d

    def usage_chunk(self, prompt: int, completion: int) -> dict:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._head(obj), "choices": [], "usage": _usage(prompt, completion)}

    def whole(self, outs: list[Output]) -> dict:
        obj = "chat.completion" if self.chat else "text_completion"
        choices = [self._choice(i, o, delta=False) for i, o in enumerate(outs)]
        usage = _usage(sum(o.prompt_tokens for o in outs), sum(o.completion_tokens for o in outs))
        return {**self._head(obj), "choices": choices, "usage": usage}


def _finish(reason: str | None) -> str | None:
    return None if reason is None else reason if reason in ("stop", "length") else "stop"


def _usage(prompt: int, completion: int) -> dict:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def serve(app: FastAPI, host: str, port: int, drain_s: float = 5.0) -> None:
    """Run the app on uvicorn until Ctrl-C / SIGTERM; in-flight requests get drain_s seconds,
    then the process returns normally (exit code 0)."""
    import uvicorn

    class _Server(uvicorn.Server):
        # uvicorn re-raises the captured signal after its graceful shutdown, which ends the process
        # with -SIGTERM; a drained, clean shutdown returns instead
        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=drain_s)
    # The engine thread and the event loop share the GIL. When a decode step's kernel returns while
    # the loop thread holds it, the engine waits up to the switch interval (5 ms by default) for it
    # back; 0.2 ms bounds that stall (stories15M, one slot: 4-7 % less time per token, PERF-NOTES.md).
    previous = sys.getswitchinterval()
    sys.setswitchinterval(2e-4)
    try:
        _Server(config).run()
    finally:
        sys.setswitchinterval(previous)
