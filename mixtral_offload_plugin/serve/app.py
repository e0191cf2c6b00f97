"""The OpenAI-compatible HTTP app (FastAPI on Starlette): `/v1/chat/completions`, `/v1/completions`, `/v1/models`,
and `/health`; streamed replies as server-sent events ending with `data: [DONE]`.

`create_app(engine, api_key=...)` builds it around a `ServeEngine`; every route but /health wants
`Authorization: Bearer <key>` when a key is set (401 otherwise). Errors are OpenAI's JSON shape (protocol.py). A
client that goes away cancels its generation: a stream when its response is abandoned, a plain request when the
connection closes while it waits. Tool calls come back as `tool_calls` (streamed as deltas, one per call, once the
reply is complete). Knows nothing about loading models or binding sockets (cli.py).
"""


import asyncio  # no `from __future__ import annotations`: FastAPI reads the routes' annotations at runtime
import hmac
import json
from collections.abc import AsyncIterator
from typing import Any

from ..errors import ConstraintError
from .engine import Reply, ServeEngine
from .protocol import (
    ApiError,
    Request,
    chat_request,
    completion_request,
    envelope,
    finish_reason,
    new_id,
    tool_calls_json,
    usage,
)


def create_app(engine: ServeEngine, *, api_key: str | None = None) -> Any:
    """The FastAPI app serving `engine` (see the module docstring)."""
    try:
        from fastapi import Depends, FastAPI
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.concurrency import run_in_threadpool
        from starlette.exceptions import HTTPException
        from starlette.requests import Request as HttpRequest
    except ImportError as exc:
        msg = "the server needs fastapi and uvicorn: pip install 'mixtral-offload-plugin[serve]'"
        raise ImportError(msg) from exc

    async def authenticate(request: HttpRequest) -> None:
        # a dependency, not an HTTP middleware: Starlette's BaseHTTPMiddleware hides a client's disconnect
        if api_key is None or request.url.path == "/health":
            return
        given = request.headers.get("authorization", "")
        token = given[7:].strip() if given.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            what = "Incorrect API key provided" if token else "No API key provided (Authorization: Bearer <key>)"
            raise ApiError(401, what, code="invalid_api_key")

    app = FastAPI(title="mixtral-offload", docs_url=None, redoc_url=None, dependencies=[Depends(authenticate)])
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: HttpRequest, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            err = ApiError(404, f"no route {request.method} {request.url.path}; this server offers "
                                "/v1/chat/completions, /v1/completions and /v1/models", code="unknown_url")
        else:  # 405 and the like: Starlette's own, in OpenAI's shape
            err = ApiError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    async def body_of(request: HttpRequest) -> Any:
        try:
            return json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ApiError(400, f"the request body is not JSON: {exc}") from None

    async def start(req: Request) -> Reply:
        engine.check_model(req.model)
        reply = await run_in_threadpool(engine.start, req)  # compiling a constraint takes a moment
        return reply.begin()

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "active": engine.active}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine)]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> dict[str, Any]:
        engine.check_model(name)
        return _model_card(engine)

    @app.post("/v1/chat/completions")
    async def chat(request: HttpRequest) -> Any:
        req = chat_request(await body_of(request), engine.default_max_tokens)
        reply = await start(req)
        if req.stream:
            return StreamingResponse(_sse(_chat_chunks(req, reply)), media_type="text/event-stream")
        text = await _collect(request, reply)
        return _chat_response(req, reply, text)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest) -> Any:
        req = completion_request(await body_of(request), 16)
        reply = await start(req)
        if req.stream:
            return StreamingResponse(_sse(_completion_chunks(req, reply)), media_type="text/event-stream")
        text = await _collect(request, reply)
        r = reply.result
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason(r.finish_reason, False)}
        return envelope("text_completion", new_id("cmpl"), req.model, [choice],
                        usage=usage(r.prompt_tokens, r.tokens, r.reused_tokens))

    return app


def _model_card(engine: ServeEngine) -> dict[str, Any]:
    return {"id": engine.model_id, "object": "model", "created": 0, "owned_by": "mixtral-offload"}


async def _collect(request: Any, reply: Reply) -> str:
    """The whole reply's text (the text outside tool calls, for chat); the generation is cancelled when the client
    disconnects while it runs."""

    async def watch() -> None:
        while not await request.is_disconnected():
            await asyncio.sleep(0.1)
        reply.gen.cancel()

    watcher = asyncio.create_task(watch())
    try:
        parts = []
        async for text in reply.pieces():
            parts.append(reply.reader.feed(text) if reply.reader is not None else text)
        if reply.reader is not None:
            parts.append(reply.reader.end()[0])
        return "".join(parts)
    except (ApiError, asyncio.CancelledError):
        raise
    except Exception as exc:
        raise failure(exc) from exc
    finally:
        watcher.cancel()


def failure(exc: Exception) -> ApiError:
    """A generation that failed while running: 400 when the request's constraint could not be followed with its
    other options (the client can fix that), else 500."""
    if isinstance(exc, ConstraintError):
        return ApiError(400, str(exc), param="response_format")
    return ApiError(500, f"the generation failed: {exc}")


def _chat_response(req: Request, reply: Reply, text: str) -> dict[str, Any]:
    r, reader = reply.result, reply.reader
    called = reader is not None and reader.parsed is not None
    message: dict[str, Any] = {"role": "assistant", "content": text or (None if called else "")}
    if called:
        calls, extra = _calls_of(reader)
        message["tool_calls"] = calls
        message["content"] = "\n".join(t for t in (text, extra) if t) or None
    choice = {"index": 0, "message": message, "logprobs": None,
              "finish_reason": finish_reason(r.finish_reason, called and bool(message.get("tool_calls")))}
    return envelope("chat.completion", new_id("chatcmpl"), req.model, [choice],
                    usage=usage(r.prompt_tokens, r.tokens, r.reused_tokens))


def _calls_of(reader: Any) -> tuple[list[dict[str, Any]], str]:
    """The tool calls read from a reply, and text that looked like a call but could not be told apart as one. A call
    cut short (by max_tokens) whose tool can be told goes out with its argument text as written, as other providers
    send one; the client's JSON reader then refuses it."""
    parsed = reader.parsed
    calls = tool_calls_json(parsed.calls)
    extra = []
    for bad in parsed.invalid:
        if bad.name is not None:
            calls.append({"id": new_id("call"), "type": "function",
                          "function": {"name": bad.name, "arguments": bad.arguments_text or ""}})
        else:
            extra.append(bad.raw)
    return calls, "\n".join([parsed.content, *extra]).strip()


async def _sse(chunks: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
    except ApiError as exc:  # the stream has started: the error goes in it, as OpenAI's API does
        yield f"data: {json.dumps(exc.body())}\n\n"
    except Exception as exc:
        yield f"data: {json.dumps(failure(exc).body())}\n\n"
    yield "data: [DONE]\n\n"


async def _chat_chunks(req: Request, reply: Reply) -> AsyncIterator[dict[str, Any]]:
    rid, reader = new_id("chatcmpl"), reply.reader

    def chunk(delta: dict[str, Any], reason: str | None = None) -> dict[str, Any]:
        return envelope("chat.completion.chunk", rid, req.model,
                        [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}])

    yield chunk({"role": "assistant", "content": ""})
    async for text in reply.pieces():
        out = reader.feed(text) if reader is not None else text
        if out:
            yield chunk({"content": out})
    called = False
    if reader is not None:
        text, parsed = reader.end()
        if text:
            yield chunk({"content": text})
        if parsed is not None:
            calls, extra = _calls_of(reader)
            if extra:
                yield chunk({"content": extra})
            for i, call in enumerate(calls):
                yield chunk({"tool_calls": [{"index": i, **call}]})
            called = bool(calls)
    r = reply.result
    yield chunk({}, finish_reason(r.finish_reason, called))
    if req.include_usage:
        yield envelope("chat.completion.chunk", rid, req.model, [],
                       usage=usage(r.prompt_tokens, r.tokens, r.reused_tokens))


async def _completion_chunks(req: Request, reply: Reply) -> AsyncIterator[dict[str, Any]]:
    rid = new_id("cmpl")

    def chunk(text: str, reason: str | None = None) -> dict[str, Any]:
        return envelope("text_completion", rid, req.model,
                        [{"index": 0, "text": text, "logprobs": None, "finish_reason": reason}])

    async for text in reply.pieces():
        yield chunk(text)
    r = reply.result
    yield chunk("", finish_reason(r.finish_reason, False))
    if req.include_usage:
        yield envelope("text_completion", rid, req.model, [], usage=usage(r.prompt_tokens, r.tokens, r.reused_tokens))
