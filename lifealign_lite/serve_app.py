"""The HTTP side of ``serve``: the FastAPI application over serve.py's :class:`~lifealign_lite.serve.Engine`.

Nothing here waits on the engine in a way that blocks another request: each generation runs in a thread of its
own and hands its events to the request's own asyncio queue, ``/health`` answers from the event loop without
touching the engine, and ``/v1/models`` and ``/v1/bank`` skip the bank refresh while a torch generation holds the
lock. A streaming client that goes away cancels its generation, which stops at the next token. One access-log
line per request (method, path, status, memory, tokens, seconds) goes to ``access_log`` when one is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .serve import Answer, Engine, check_bind, start
from .serve_api import RequestError, parse_job
from .xllama import SIGNAL_WAKERS, restore_signals

if TYPE_CHECKING:
    from .session import Session

MAX_BODY_BYTES = 1_000_000
DRAIN_FACTOR = 16  # an oversized body is read (and dropped) up to this many times the limit, so the client sees the 413


@contextlib.asynccontextmanager
async def _signal_lifespan(app):
    """While the event loop runs on the main thread (uvicorn's), a llama.cpp server started by a hot reload in a
    worker thread has Ctrl-C and SIGTERM handed back at once (restore_signals on the loop), not at the next request."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    loop = asyncio.get_running_loop()

    def wake() -> None:
        loop.call_soon_threadsafe(restore_signals)

    SIGNAL_WAKERS.append(wake)
    try:
        yield
    finally:
        SIGNAL_WAKERS.remove(wake)


def create_app(engine: Engine, api_key: str | None = None, max_tokens_cap: int = 1024, max_body_bytes: int = MAX_BODY_BYTES,
               access_log: Callable[[str], None] | None = None):
    """The FastAPI application: /v1/models, /v1/chat/completions, /v1/completions, /v1/bank, /health."""
    app = FastAPI(title="lifealign-lite", docs_url=None, redoc_url=None, lifespan=_signal_lifespan)

    def error(exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(RequestError)
    async def _request_error(request, exc: RequestError):
        return error(exc)

    @app.exception_handler(HTTPException)
    async def _http_error(request, exc: HTTPException):  # unknown paths, wrong methods
        return error(RequestError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}"))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error(RequestError(400, str(exc)))

    @app.middleware("http")
    async def _auth_and_log(request: Request, call_next):
        t0 = time.perf_counter()
        restore_signals()  # after a hot reload started a llama.cpp server in a worker thread: Ctrl-C and SIGTERM stop uvicorn again
        if api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            response = error(RequestError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key"))
        else:
            response = await call_next(request)
        if access_log is None:
            return response
        body = response.body_iterator if hasattr(response, "body_iterator") else None

        def line() -> None:
            memory, tokens = getattr(request.state, "memory", None) or "-", getattr(request.state, "tokens", None)
            access_log(f"{request.method} {request.url.path} {response.status_code} memory={memory} "
                       f"tokens={'-' if tokens is None else tokens} {time.perf_counter() - t0:.2f}s")

        if body is None:
            line()
            return response

        async def logged() -> AsyncIterator[bytes]:
            try:
                async for chunk in body:
                    yield chunk
            finally:
                line()

        response.body_iterator = logged()
        return response

    async def read_json(request: Request):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_body_bytes:
            await drain(request.stream())
            raise RequestError(413, f"request body of {declared} bytes is over the limit of {max_body_bytes}", None, "body_too_large")
        body, stream = b"", request.stream()
        async for chunk in stream:
            body += chunk
            if len(body) > max_body_bytes:
                await drain(stream)
                raise RequestError(413, f"request body is over the limit of {max_body_bytes} bytes", None, "body_too_large")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as exc:
            raise RequestError(400, f"the request body is not valid JSON ({exc})", None, "invalid_json") from None

    async def drain(stream) -> None:
        """Read and drop the rest of an oversized body (up to DRAIN_FACTOR times the limit) before answering 413.

        Answering while the client is still sending makes the server close a socket with unread data: the client
        then sees a broken pipe or a reset instead of the 413 (1 run in 3 of the test). Beyond the cap the
        connection is closed anyway, so a hostile client cannot keep the server reading.
        """
        seen = 0
        async for chunk in stream:
            seen += len(chunk)
            if seen > DRAIN_FACTOR * max_body_bytes:
                break

    @app.get("/health")
    async def health():  # on the event loop: never queued behind the engine or the thread pool
        return {"status": "ok", "version": engine.session.state.version}

    @app.get("/v1/models")
    def models():
        engine.refresh_now()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lifealign-lite"} for n in engine.models()]}

    @app.get("/v1/bank")
    def bank():
        return engine.bank_info()

    async def generate(request: Request, kind: str):
        job = parse_job(await read_json(request), kind, max_tokens_cap)
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        cancel = start(engine, job, lambda event: loop.call_soon_threadsafe(events.put_nowait, event))
        try:
            first = await events.get()
        except asyncio.CancelledError:
            cancel.set()
            raise
        if first[0] == "error":
            cancel.set()
            return error(first[1])
        answer: Answer = first[1]
        request.state.memory = answer.memory
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = {"x-lifealign-memory": answer.memory}
        meta = {"memory": answer.memory, "route": answer.route, "bank_version": answer.version}
        if job.stream:
            return StreamingResponse(_sse(events, cancel, kind, rid, created, job.model, meta, job.include_usage, request.state),
                                     media_type="text/event-stream", headers=headers)
        try:
            while (event := await events.get())[0] == "text":
                pass
        finally:
            cancel.set()  # a client gone while waiting (the task is cancelled): the generation stops at its next token
        if event[0] == "error":
            return error(event[1])
        done: Answer = event[1]
        request.state.tokens = done.tokens
        choice = ({"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason} if kind == "chat"
                  else {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None})
        body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created, "model": job.model,
                "choices": [choice], "usage": _usage(done), "lifealign": meta}
        return JSONResponse(body, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "text")

    return app


def _usage(done: Answer) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.tokens, "total_tokens": done.prompt_tokens + done.tokens}


async def _sse(events: asyncio.Queue, cancel, kind: str, rid: str, created: int, model: str, meta: dict, include_usage: bool,
               state) -> AsyncIterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason (with ``include_usage``,
    then one with no choices and the token counts, as OpenAI's ``stream_options``), then ``data: [DONE]``.
    A client that goes away cancels this generator, and ``finally`` sets ``cancel``: the generation stops at the next token."""
    obj = "chat.completion.chunk" if kind == "chat" else "text_completion"

    def chunk(delta: str | None, finish: str | None, first: bool = False) -> str:
        if kind == "chat":
            d = ({"role": "assistant", "content": ""} if first else {}) | ({"content": delta} if delta is not None else {})
            choice = {"index": 0, "delta": d, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model, 'choices': [choice], 'lifealign': meta})}\n\n"

    try:
        if kind == "chat":
            yield chunk(None, None, first=True)
        while True:
            event = await events.get()
            if event[0] == "text":
                yield chunk(event[1], None)
            elif event[0] == "done":
                done: Answer = event[1]
                state.tokens = done.tokens
                yield chunk(None, done.finish_reason)
                if include_usage:
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model, 'choices': [], 'usage': _usage(done)})}\n\n"
                break
            else:
                yield f"data: {json.dumps(event[1].body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()


def serve(session: Session, bank_dir: Path, host: str, port: int, api_key: str | None, max_tokens_cap: int,
          log: Callable[[str], None] = print, upstream: str | None = None, upstream_key: str | None = None, quiet: bool = False) -> None:
    """Serve until interrupted; with ``upstream`` (an OpenAI-compatible base URL) route here and generate there.
    One access-log line per request goes to ``log`` unless ``quiet``."""
    import uvicorn

    check_bind(host, port, api_key)
    engine = Engine(session, bank_dir, log, upstream, upstream_key)
    engine.refresh()
    uvicorn.run(create_app(engine, api_key, max_tokens_cap, access_log=None if quiet else log), host=host, port=port, log_level="warning")
