"""``serve``: an OpenAI-compatible HTTP server that answers each request with the right memory.

The request's ``model`` names the memory: a domain, ``core``, ``base``, or ``auto`` (also an omitted ``model``),
which routes the whole conversation with the bank's router exactly as ``chat`` does. One lock covers routing,
switching the merged adapter and generating, so requests in flight never see another request's adapter: the
model holds one merged adapter at a time (chat's design), and a CPU gains nothing from running two
generations at once (batching same-memory requests was measured not clearly faster: docs/PERFORMANCE.md).
Each request first reads the manifest's ``current`` pointer (one small file): a version committed by ``align``
while serving is swapped in for the next request, once the running one has finished.

Over 400 lines on purpose: the OpenAI-compatible request checks, streaming and the upstream relay share one request
model; split, each half would restate it.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from .chat import AUTO, BASE, ChatSession
from .errors import InputError
from .memory.bank import Bank, BankError
from .memory.router import CORE

LOOPBACK = ("127.0.0.1", "localhost", "::1")
MAX_BODY_BYTES = 1_000_000
DRAIN_FACTOR = 16  # an oversized body is read (and dropped) up to this many times the limit, so the client sees the 413
DEFAULT_MAX_TOKENS = 256
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A bad request: answered with an OpenAI-style error object and ``status``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(self.status, "invalid_request_error")
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One checked generation request."""

    prompt: str | list[dict]  # a conversation (chat completions) or a plain text (completions)
    model: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the token counts


# -- checking requests -------------------------------------------------------------------------------------

def _number(body: dict, key: str, default, low: float, high: float, integer: bool = False):
    value = body.get(key)
    if value is None:
        return default
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise RequestError(400, f"'{key}' must be {kind}, got {json.dumps(value)[:40]}", key, "invalid_type")
    if not low <= value <= high:
        raise RequestError(400, f"'{key}' must be between {low:g} and {high:g}, got {value}", key, "invalid_value")
    return value


def _content(message, i: int) -> str:
    if not isinstance(message, dict):
        raise RequestError(400, f"messages[{i}] must be an object with 'role' and 'content'", "messages", "invalid_type")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RequestError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {json.dumps(role)[:40]}", "messages", "invalid_value")
    if isinstance(content, list):  # content parts: only text ones
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise RequestError(400, f"messages[{i}].content: only text parts are supported", "messages", "invalid_value")
        content = "".join(p["text"] for p in content)
    if not isinstance(content, str):
        raise RequestError(400, f"messages[{i}].content must be a string, got {json.dumps(content)[:40]}", "messages", "invalid_type")
    return content


def parse_job(body, kind: str, max_tokens_cap: int) -> Job:
    """Check a chat-completions (``kind="chat"``) or completions request body; raise RequestError (400) on the first problem."""
    if not isinstance(body, dict):
        raise RequestError(400, "the request body must be a JSON object", None, "invalid_type")
    if kind == "chat":
        messages = body.get("messages")
        if messages is None:
            raise RequestError(400, "'messages' is required", "messages", "missing_required_parameter")
        if not isinstance(messages, list):
            raise RequestError(400, "'messages' must be a list of {role, content} objects", "messages", "invalid_type")
        if not messages:
            raise RequestError(400, "'messages' is empty; give at least one message", "messages", "invalid_value")
        prompt = [{"role": m["role"], "content": _content(m, i)} for i, m in enumerate(messages)]
    else:
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if prompt is None:
            raise RequestError(400, "'prompt' is required", "prompt", "missing_required_parameter")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError(400, "'prompt' must be a non-empty string", "prompt", "invalid_type")
    model = body.get("model") or AUTO
    if not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", "model", "invalid_type")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", min(DEFAULT_MAX_TOKENS, max_tokens_cap), 1, float("inf"), integer=True)
    if max_tokens > max_tokens_cap:
        raise RequestError(400, f"'max_tokens' is {max_tokens}, above this server's cap of {max_tokens_cap} (serve --max-tokens-cap)",
                           "max_tokens", "max_tokens_above_cap")
    _number(body, "n", 1, 1, 1, integer=True)  # one choice per request
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(400, "'stop' must be a string or a list of at most 4 non-empty strings", "stop", "invalid_type")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise RequestError(400, "'stream' must be true or false", "stream", "invalid_type")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or not isinstance(options.get("include_usage", False), bool):
        raise RequestError(400, "'stream_options' must be an object like {\"include_usage\": true}", "stream_options", "invalid_type")
    return Job(prompt=prompt, model=model, max_tokens=max_tokens, temperature=float(_number(body, "temperature", 0.0, 0, 2)),
               top_p=float(_number(body, "top_p", 1.0, 0, 1)), stop=stop, seed=_number(body, "seed", None, -2**63, 2**64 - 1, integer=True),
               stream=stream, include_usage=stream and options.get("include_usage", False))


class StopScanner:
    """Cut a streamed text at the first stop string, holding back only what could still begin one."""

    def __init__(self, stops: list[str]):
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False

    def feed(self, piece: str) -> str:
        """The text that is safe to send after ``piece`` arrived (sets ``stopped`` at a stop string; later pieces are dropped)."""
        if self.stopped:
            return ""
        self.text += piece
        cuts = [self.text.find(s) for s in self.stops if s in self.text]
        if cuts:
            self.text, self.stopped = self.text[: min(cuts)], True
            return self.flush()
        hold = max((len(s) - 1 for s in self.stops), default=0)
        safe = max(self.sent, len(self.text) - hold)
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent :], len(self.text)
        return out


# -- the engine: one session, one lock, hot reload ---------------------------------------------------------

@dataclass
class Answer:
    memory: str
    route: dict | None
    version: int
    text: str = ""
    tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str = "stop"


class Engine:
    """The model with the bank's adapters, shared by all requests; :meth:`run` serializes them."""

    def __init__(self, session: ChatSession, bank_dir: Path, log: Callable[[str], None] = print, upstream: str | None = None,
                 upstream_key: str | None = None):
        self.session, self.bank, self.log = session, Bank(bank_dir), log
        self.upstream, self.upstream_key = upstream.rstrip("/") if upstream else None, upstream_key
        self.lock = threading.Lock()

    def models(self) -> list[str]:
        return self.session.available() + [AUTO]

    def refresh(self) -> None:
        """Use the bank's current version if a newer one was committed (call with the lock held, or before serving)."""
        try:
            current = self.bank.manifest()["current"]
            if current != self.session.state.version:
                self.session.use_version(self.bank.load(current))
                self.log(f"serving bank version {current}")
        except BankError as exc:  # a damaged new version: keep serving the one in memory
            self.log(f"bank version not switched: {exc}")

    def run(self, job: Job, emit: Callable[[tuple], None], cancel: threading.Event) -> None:
        """Route and generate ``job``, calling ``emit`` with ("start", Answer), ("text", str) ..., ("done", Answer) or ("error", RequestError)."""
        with self.lock:
            try:
                self.refresh()
                if job.model not in self.models():
                    raise RequestError(404, f"unknown model {job.model!r}; known models: {', '.join(self.models())}", "model", "model_not_found")
                s = self.session
                route = None
                if job.model == AUTO:
                    r = s.route(job.prompt)
                    memory = r.domain if r.domain != CORE or s.state.core_dir() else BASE
                    route = {"domain": r.domain, "scores": r.scores, "similarity": r.similarity, "threshold": r.threshold}
                else:
                    memory = job.model
            except RequestError as exc:
                emit(("error", exc))
                return
            answer = Answer(memory=memory, route=route, version=s.state.version)
            emit(("start", answer))
            if self.upstream:
                answer.prompt_tokens = _prompt_tokens(s.tokenizer, job.prompt)
            else:
                self._generate(job, answer, emit, cancel)
                return
        self._forward(job, answer, emit, cancel)  # outside the lock: the upstream engine serves requests side by side

    def _generate(self, job: Job, answer: Answer, emit: Callable[[tuple], None], cancel: threading.Event) -> None:
        """Generate here (with the lock held)."""
        s = self.session
        if job.seed is not None:
            s.seed(job.seed)
        scanner = StopScanner(job.stop)

        def on_token(piece: str) -> None:
            text = scanner.feed(piece)
            if text:
                emit(("text", text))
            if scanner.stopped:
                cancel.set()

        _, answer.tokens = s.generate(job.prompt, answer.memory, on_token, max_new_tokens=job.max_tokens, stop=cancel,
                                      temperature=job.temperature, top_p=job.top_p)
        rest = scanner.flush()
        if rest:
            emit(("text", rest))
        answer.text = scanner.text
        answer.finish_reason = "stop" if scanner.stopped or answer.tokens < job.max_tokens else "length"
        answer.prompt_tokens = _prompt_tokens(s.tokenizer, job.prompt)
        emit(("done", answer))

    def _forward(self, job: Job, answer: Answer, emit: Callable[[tuple], None], cancel: threading.Event) -> None:
        """Generate on the upstream OpenAI-compatible engine, with ``model`` set to the memory chosen here."""
        import urllib.error
        import urllib.request

        chat = not isinstance(job.prompt, str)
        body = {"model": answer.memory, "max_tokens": job.max_tokens, "temperature": job.temperature, "top_p": job.top_p, "stream": True,
                **({"messages": job.prompt} if chat else {"prompt": job.prompt}), **({"stop": job.stop} if job.stop else {}),
                **({"seed": job.seed} if job.seed is not None else {})}
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {self.upstream_key}"} if self.upstream_key else {})}
        request = urllib.request.Request(f"{self.upstream}/{'chat/completions' if chat else 'completions'}", data=json.dumps(body).encode(),
                                         headers=headers, method="POST")
        pieces = []
        try:
            with urllib.request.urlopen(request, timeout=600) as response:
                for line in response:
                    line = line.decode().strip()
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if "error" in data:
                        raise RequestError(502, f"upstream {self.upstream}: {data['error'].get('message')}", None, "upstream_error")
                    choice = data["choices"][0]
                    piece = choice["delta"].get("content") if chat else choice.get("text")
                    if piece:
                        pieces.append(piece)
                        emit(("text", piece))
                    answer.finish_reason = choice.get("finish_reason") or answer.finish_reason
                    if cancel.is_set():
                        break
        except urllib.error.HTTPError as exc:
            message = json.loads(exc.read() or b"{}").get("error", {}).get("message", exc.reason)
            emit(("error", RequestError(502, f"upstream {self.upstream} answered {exc.code}: {message}", None, "upstream_error")))
            return
        except (urllib.error.URLError, OSError) as exc:
            emit(("error", RequestError(502, f"upstream {self.upstream} unreachable: {exc}", None, "upstream_error")))
            return
        except RequestError as exc:
            emit(("error", exc))
            return
        answer.text = "".join(pieces)
        answer.tokens = len(self.session.tokenizer(answer.text, add_special_tokens=False)["input_ids"])
        emit(("done", answer))

    def bank_info(self) -> dict:
        with self.lock:
            self.refresh()
            state = self.session.state
        from .memory.bank import folder_size

        sizes = {name: folder_size(state.slot_dir(name)) for name in sorted(state.domains)}
        if state.core_dir():
            sizes[CORE] = folder_size(state.core_dir())
        return {"object": "bank", "root": str(self.bank.root), "version": state.version, "domains": sorted(state.domains),
                "tasks": state.tasks, "sizes_bytes": sizes}


def _prompt_tokens(tokenizer, prompt) -> int:
    if isinstance(prompt, str):
        return len(tokenizer(prompt)["input_ids"])
    return len(tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def start(engine: Engine, job: Job) -> tuple[queue.Queue, threading.Event]:
    """Run ``job`` in a thread of its own (it always finishes and releases the lock); its events arrive on the queue."""
    events: queue.Queue = queue.Queue()
    cancel = threading.Event()

    def work():
        try:
            engine.run(job, events.put, cancel)
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server keeps serving
            engine.log(f"generation failed: {exc!r}")
            events.put(("error", RequestError(500, f"generation failed: {exc}", None, "server_error")))

    threading.Thread(target=work, daemon=True).start()
    return events, cancel


# -- HTTP ---------------------------------------------------------------------------------------------------

def create_app(engine: Engine, api_key: str | None = None, max_tokens_cap: int = 1024, max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI application: /v1/models, /v1/chat/completions, /v1/completions, /v1/bank, /health."""
    app = FastAPI(title="lifealign-lite", docs_url=None, redoc_url=None)

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
    async def _auth(request: Request, call_next):
        if api_key and request.url.path != "/health" and request.headers.get("authorization") != f"Bearer {api_key}":
            return error(RequestError(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", None, "invalid_api_key"))
        return await call_next(request)

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
    def health():
        return {"status": "ok", "version": engine.session.state.version}

    @app.get("/v1/models")
    def models():
        with engine.lock:
            engine.refresh()
            names = engine.models()
        return {"object": "list", "data": [{"id": n, "object": "model", "created": 0, "owned_by": "lifealign-lite"} for n in names]}

    @app.get("/v1/bank")
    def bank():
        return engine.bank_info()

    async def generate(request: Request, kind: str):
        job = parse_job(await read_json(request), kind, max_tokens_cap)
        events, cancel = start(engine, job)
        first = await asyncio.to_thread(events.get)
        if first[0] == "error":
            return error(first[1])
        answer: Answer = first[1]
        rid = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        headers = {"x-lifealign-memory": answer.memory}
        meta = {"memory": answer.memory, "route": answer.route, "bank_version": answer.version}
        if job.stream:
            return StreamingResponse(_sse(events, cancel, kind, rid, created, job.model, meta, job.include_usage), media_type="text/event-stream", headers=headers)
        while (event := await asyncio.to_thread(events.get))[0] == "text":
            pass
        if event[0] == "error":
            return error(event[1])
        done: Answer = event[1]
        usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.tokens, "total_tokens": done.prompt_tokens + done.tokens}
        choice = ({"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": done.finish_reason} if kind == "chat"
                  else {"index": 0, "text": done.text, "finish_reason": done.finish_reason, "logprobs": None})
        body = {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created, "model": job.model,
                "choices": [choice], "usage": usage, "lifealign": meta}
        return JSONResponse(body, headers=headers)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await generate(request, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, "text")

    return app


def _sse(events: queue.Queue, cancel: threading.Event, kind: str, rid: str, created: int, model: str, meta: dict,
         include_usage: bool = False) -> Iterator[str]:
    """Server-sent events: one chunk per piece of text, a last chunk with the finish reason (with ``include_usage``,
    then one with no choices and the token counts, as OpenAI's ``stream_options``), then ``data: [DONE]``.
    A client that goes away sets ``cancel``, which stops generation at the next token."""
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
            event = events.get()
            if event[0] == "text":
                yield chunk(event[1], None)
            elif event[0] == "done":
                done: Answer = event[1]
                yield chunk(None, done.finish_reason)
                if include_usage:
                    usage = {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.tokens, "total_tokens": done.prompt_tokens + done.tokens}
                    yield f"data: {json.dumps({'id': rid, 'object': obj, 'created': created, 'model': model, 'choices': [], 'usage': usage})}\n\n"
                break
            else:
                yield f"data: {json.dumps(event[1].body())}\n\n"
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()


def check_bind(host: str, port: int, api_key: str | None) -> None:
    """Refuse to expose the model beyond this machine without an API key, and a port in use (before the model loads)."""
    import socket

    if host not in LOOPBACK and not api_key:
        raise InputError(f"binding to {host} exposes the model to the network without a key: give --api-key KEY, or bind to 127.0.0.1")
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        raise InputError(f"cannot serve on {host}:{port}: {exc.strerror or exc}; choose another --port") from None


def serve(session: ChatSession, bank_dir: Path, host: str, port: int, api_key: str | None, max_tokens_cap: int,
          log: Callable[[str], None] = print, upstream: str | None = None, upstream_key: str | None = None) -> None:
    """Serve until interrupted; with ``upstream`` (an OpenAI-compatible base URL) route here and generate there."""
    import uvicorn

    check_bind(host, port, api_key)
    engine = Engine(session, bank_dir, log, upstream, upstream_key)
    engine.refresh()
    uvicorn.run(create_app(engine, api_key, max_tokens_cap), host=host, port=port, log_level="warning")
