"""``serve``: an OpenAI-compatible HTTP server that answers each request with the right memory (the engine side;
the HTTP application is serve_app.py, the request models serve_api.py).

The request's ``model`` names the memory: a domain, ``core``, ``base``, or ``auto`` (also an omitted ``model``),
which routes the whole conversation with the bank's router exactly as ``chat`` does. On llama.cpp (the default
engine) requests run side by side: every memory is a LoRA adapter loaded once, chosen per request, and
llama.cpp's server decodes the requests in flight together (continuous batching; requests with the same memory
share one batch). The torch engine holds one merged adapter at a time, so there one lock covers routing,
switching and generating. Each request first reads the manifest's ``current`` pointer (one small file): a version
committed by ``align`` while serving is swapped in for the next request; requests already running finish on the
version they began with (llama.cpp) or before the swap (torch).
"""

from __future__ import annotations

import contextlib
import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import InputError
from .memory.bank import Bank, BankError
from .memory.router import CORE
from .serve_api import Job, RequestError
from .session import AUTO, Session

LOOPBACK = ("127.0.0.1", "localhost", "::1")


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
    """The model with the bank's adapters, shared by all requests.

    ``lock`` serializes generation on a session that holds one adapter at a time (torch); a session with
    ``concurrent`` set (llama.cpp) generates without it. ``swap`` covers reading the bank and routing.
    """

    def __init__(self, session: Session, bank_dir: Path, log: Callable[[str], None] = print, upstream: str | None = None,
                 upstream_key: str | None = None):
        self.session, self.bank, self.log = session, Bank(bank_dir), log
        self.upstream, self.upstream_key = upstream.rstrip("/") if upstream else None, upstream_key
        self.lock, self.swap = threading.Lock(), threading.Lock()
        self.concurrent = session.concurrent

    def models(self) -> list[str]:
        return self.session.available() + [AUTO]

    def refresh(self) -> None:
        """Use the bank's current version if a newer one was committed (call with ``swap`` held, and on torch ``lock``)."""
        try:
            current = self.bank.manifest()["current"]
            if current != self.session.state.version:
                self.session.use_version(self.bank.load(current))
                self.log(f"serving bank version {current}")
        except BankError as exc:  # a damaged new version: keep serving the one in memory
            self.log(f"bank version not switched: {exc}")

    def refresh_now(self) -> None:
        """Refresh without waiting on a generation: on torch, skipped while one runs (the next request refreshes)."""
        if not self.concurrent and not self.lock.acquire(blocking=False):
            return
        try:
            with self.swap:
                self.refresh()
        finally:
            if not self.concurrent:
                self.lock.release()

    def run(self, job: Job, emit: Callable[[tuple], None], cancel: threading.Event) -> None:
        """Route and generate ``job``, calling ``emit`` with ("start", Answer), ("text", str) ..., ("done", Answer) or ("error", RequestError)."""
        with contextlib.nullcontext() if self.concurrent else self.lock:
            try:
                with self.swap:
                    answer = self._route(job)
            except RequestError as exc:
                emit(("error", exc))
                return
            emit(("start", answer))
            if not self.upstream:
                self._generate(job, answer, emit, cancel)
                return
            answer.prompt_tokens = _prompt_tokens(self.session.tokenizer, job.prompt)
        self._forward(job, answer, emit, cancel)  # outside the lock: the upstream engine serves requests side by side

    def _route(self, job: Job) -> Answer:
        self.refresh()
        if job.model not in self.models():
            raise RequestError(404, f"unknown model {job.model!r}; known models: {', '.join(self.models())}", "model", "model_not_found")
        s, route = self.session, None
        if job.model == AUTO:
            r = s.route(job.prompt)
            memory = s.memory_of(r)
            route = {"domain": r.domain, "scores": r.scores, "similarity": r.similarity, "threshold": r.threshold, "gate": r.gate}
        else:
            memory = job.model
        return Answer(memory=memory, route=route, version=s.state.version)

    def _generate(self, job: Job, answer: Answer, emit: Callable[[tuple], None], cancel: threading.Event) -> None:
        """Generate here (with the lock held, unless the session is concurrent). ``cancel`` is the client's (set when it
        went away); the session gets an event of its own, set at a stop string or once the client is gone."""
        s = self.session
        scanner, halt = StopScanner(job.stop), threading.Event()

        def on_token(piece: str) -> None:
            text = scanner.feed(piece)
            if text:
                emit(("text", text))
            if scanner.stopped or cancel.is_set():
                halt.set()

        _, answer.tokens = s.generate(job.prompt, answer.memory, on_token, max_new_tokens=job.max_tokens, stop=halt,
                                      temperature=job.temperature, top_p=job.top_p, seed=job.seed)
        rest = scanner.flush()
        if rest:
            emit(("text", rest))
        answer.text = scanner.text
        answer.finish_reason = "stop" if scanner.stopped or answer.tokens < job.max_tokens else "length"
        if cancel.is_set() and not scanner.stopped:
            self.log(f"generation stopped after {answer.tokens} tokens: the client went away")
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
        self.refresh_now()
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


def start(engine: Engine, job: Job, emit: Callable[[tuple], None]) -> threading.Event:
    """Run ``job`` in a thread of its own (it always finishes and releases the lock); its events go to ``emit``.
    Returns the event that stops its generation at the next token (a client that went away sets it)."""
    cancel = threading.Event()

    def work():
        try:
            engine.run(job, emit, cancel)
        except InputError as exc:  # the request cannot be answered as asked (a conversation longer than a slot's context)
            emit(("error", RequestError(400, str(exc), "messages", "context_length_exceeded")))
        except Exception as exc:  # noqa: BLE001 - reported to the client, the server keeps serving
            engine.log(f"generation failed: {exc!r}")
            emit(("error", RequestError(500, f"generation failed: {exc}", None, "server_error")))

    threading.Thread(target=work, daemon=True).start()
    return cancel


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
