"""``chat`` and ``serve`` on llama.cpp from a prebuilt wheel: xllamacpp (MIT), llama.cpp's own server in-process.

Why xllamacpp: a 34 MB abi3 manylinux wheel that installs without a compiler (llama-cpp-python compiles
llama.cpp, about 25 minutes on 2 cores), kept in step with llama.cpp's releases, and it exposes llama.cpp's
server: continuous batching over parallel slots, and a per-request ``lora`` list choosing among adapters loaded
once. llama-cpp-python stays supported (llamacpp_py.py, with ``LIFEALIGN_LLAMA_BINDING=llama-cpp-python``).

One :class:`LlamaServer` holds the base model's GGUF with every memory of a bank version as a LoRA adapter
(exported once into the cache: llama_gguf.cached_adapter), each at scale 0 until a request names it. A request
names its memory's adapter at scale 1 (base: none); llama.cpp's server decodes the slots in flight together,
one batch per adapter set (its batching rule: slots with different adapters take turns). Each slot keeps its
own KV cache and reuses a conversation's prefix; llama.cpp's RAM prompt cache is off, because it restores KV
computed under another adapter (it keys entries by tokens only). A new bank version starts a second server
with the new adapters; requests already running finish on the old one, which is freed after them.

Decoding is chat's: greedy with repetition penalty 1.1 over the prompt and the answer (llama.cpp's penalty
sampler over the whole slot context, as transformers applies it), or transformers' sampling order with a
temperature: penalty, top-k 50, top-p, temperature. The prompt is the GGUF's chat template rendered by llama.cpp
(``/apply-template``) and tokenized with special tokens: the same token ids as the transformers path
(``tests/test_llamacpp.py``). Nothing here imports torch or transformers.
"""

from __future__ import annotations

import json
import queue
import secrets
import signal
import socket
import threading
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, Iterator

from .errors import InputError
from .llama_gguf import LLAMA_CPP, TemplateTokenizer
from .memory.bank import Bank, BankState
from .model import ModelError
from .session import AUTO, Session, adapter_folders, bank_model, check_domain, routing

REPETITION_PENALTY = 1.1  # chat's (chat.py)
TOP_K = 50  # transformers' default for sampling
SERVE_SLOTS = 8  # parallel sequences of `serve`
SLOT_CONTEXT = 2048  # tokens of one conversation in `serve` (prompt and answer); beyond it a request gets a 400


def importable() -> bool:
    """Whether xllamacpp is installed and its library loads."""
    try:
        import xllamacpp  # noqa: F401
    except (ImportError, OSError):
        return False
    return True


SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PENDING: dict[int, object] = {}  # handlers to put back from the main thread (a server started by a hot reload in a worker)
SIGNAL_WAKERS: list[Callable[[], None]] = []  # each asks the main thread to call restore_signals soon (serve: its event loop)


def restore_signals() -> None:
    """Put back the SIGINT and SIGTERM handlers llama.cpp's server replaced (Ctrl-C must reach Python, SIGTERM
    uvicorn). Only the main thread may set them: called elsewhere (a hot reload's server starts in a worker), it
    wakes the main thread through :data:`SIGNAL_WAKERS`, so the handlers are back within a turn of serve's event loop."""
    if not _PENDING:
        return
    if threading.current_thread() is not threading.main_thread():
        for wake in list(SIGNAL_WAKERS):
            wake()
        return
    for sig, handler in list(_PENDING.items()):
        signal.signal(sig, handler)
    _PENDING.clear()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """llama.cpp's server in this process: the base GGUF, ``adapters`` (memory name -> GGUF adapter file) loaded
    once at scale 0, ``slots`` parallel sequences of ``context`` tokens each (0: the model's own, one slot)."""

    def __init__(self, base: Path, adapters: dict[str, Path], slots: int = 1, context: int = 0, threads: int = 1):
        import xllamacpp as xlc

        p = xlc.CommonParams()
        p.model.path = str(base)
        p.n_parallel = slots
        p.n_ctx = slots * context
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = threads
        p.lora_adapters = [xlc.CommonAdapterLoraInfo(str(path), 0.0) for path in adapters.values()]
        p.lora_init_without_apply = True
        p.cache_ram_mib = 0  # its entries do not record the adapter their KV was computed with
        p.hostnames, p.port = ["127.0.0.1"], _free_port()  # its HTTP routes (/tokenize, /apply-template): loopback only,
        self.key = secrets.token_hex(16)
        p.api_keys = [self.key]  # and with a key of this process, so other users of the machine cannot reach the model
        p.verbosity = -1
        p.use_jinja = True
        self.url, self.ids, self.slots = f"http://127.0.0.1:{p.port}", {name: i for i, name in enumerate(adapters)}, slots
        handlers = {sig: signal.getsignal(sig) for sig in SIGNALS}
        self.server = xlc.Server(p)  # llama.cpp's server installs its own SIGINT and SIGTERM handlers: Python's go back
        _PENDING.update((sig, h) for sig, h in handlers.items() if h is not None)
        restore_signals()
        self.context = self._post("/props", None)["default_generation_settings"]["n_ctx"]

    def _post(self, path: str, body: dict | None) -> dict:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json", "Authorization": f"Bearer {self.key}"})
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            raise ModelError(f"llama.cpp {path}: {exc.read().decode(errors='replace')[:300]}") from None

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return self._post("/tokenize", {"content": text, "add_special": add_special, "parse_special": True})["tokens"]

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._post("/apply-template", {"messages": messages, "add_generation_prompt": add_generation_prompt})["prompt"]

    def lora(self, memory: str) -> list[dict]:
        """The request's adapter list: the memory's adapter at scale 1, every other one at 0 (base: all at 0)."""
        return [{"id": i, "scale": float(name == memory)} for name, i in self.ids.items()]

    def complete(self, prompt: str | list[int], memory: str, max_tokens: int, on_piece: Callable[[str], None], stop: Callable[[], bool],
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, plain: bool = False) -> dict:
        """Stream a completion of ``prompt`` with ``memory``'s adapter; pieces of text go to ``on_piece`` (in the
        calling thread); ``stop()`` true ends it at the next token. ``plain``: no penalty, exactly ``max_tokens``
        (the benchmark's anchor). Returns llama.cpp's usage (``prompt_tokens``, ``completion_tokens``)."""
        body = {"prompt": prompt, "max_tokens": max_tokens, "stream": True, "temperature": temperature, "top_p": top_p,
                "top_k": TOP_K if temperature > 0 else 0, "min_p": 0.0, "repeat_penalty": 1.0 if plain else REPETITION_PENALTY,
                "repeat_last_n": self.context, "lora": self.lora(memory), "cache_prompt": True, "ignore_eos": plain,
                "samplers": ["penalties", "temperature", "top_k", "top_p"], "stream_options": {"include_usage": True}}
        if seed is not None:
            body["seed"] = seed % 2**32
        usage, failure, pieces = {}, [], [0]

        def on_chunk(chunk) -> bool:
            if not isinstance(chunk, dict) or "error" in chunk or "code" in chunk:
                failure.append(chunk.get("error", chunk) if isinstance(chunk, dict) else {"message": str(chunk)})
                return True
            for choice in chunk.get("choices") or []:
                if choice.get("text"):
                    pieces[0] += 1
                    on_piece(choice["text"])
            usage.update(chunk.get("usage") or {})
            return stop()

        self.server.handle_completions(body, on_chunk)
        if failure:
            message = failure[0].get("message", failure[0])
            if failure[0].get("code") == 400 or "context" in str(message):
                raise InputError(f"llama.cpp refused the request: {message}")
            raise ModelError(f"llama.cpp failed: {message}")
        return usage or {"completion_tokens": pieces[0]}  # stopped early: no usage chunk came; one piece per token


class ServerTokenizer(TemplateTokenizer):
    """The GGUF's own vocabulary and chat template, through the session's server."""

    def __init__(self, session: XLlamaSession):
        self.session = session

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self.session.server.render(messages, add_generation_prompt)

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return self.session.server.tokenize(text, add_special_tokens)


@dataclass
class XLlamaSession(Session):
    """The llama.cpp engine on llama.cpp's server (:class:`session.Engine`): every memory a LoRA adapter chosen per
    request, so requests for different memories may run at once (``concurrent``); ``activate`` only records the memory."""

    engine: ClassVar[str] = LLAMA_CPP
    embedder_shares_model: ClassVar[bool] = False  # the routing embedder is a transformers model of its own
    concurrent: ClassVar[bool] = True  # serve runs its requests side by side
    home: Path | None = None
    base_gguf: Path | None = None
    slots: int = 1
    context: int = 0
    threads: int = 1
    server: LlamaServer | None = None
    adapter_files: dict[str, Path] = field(default_factory=dict)  # memory -> its cached GGUF adapter
    _seed: int | None = None

    def load_adapters(self, state: BankState, note: Callable[[str], None] | None = None) -> None:
        """Export (once) every adapter of ``state`` and start a server holding them in place of the running one."""
        from .llama_gguf import cached_adapter

        files = {name: cached_adapter(folder, self.base_gguf, self.home, name, note) for name, folder in adapter_folders(state)}
        server = LlamaServer(self.base_gguf, files, self.slots, self.context, self.threads)
        self.server, self.adapter_files, self.state, self.active, self._router = server, files, state, None, None

    def seed(self, seed: int) -> None:
        self._seed = seed

    def stream(self, prompt: str | list[int], memory: str, max_new_tokens: int, stop: threading.Event | None = None,
               temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, plain: bool = False, usage: dict | None = None) -> Iterator[str]:
        """Pieces of the answer as they come, in the calling thread (the completion runs in a thread of its own, so
        Ctrl-C reaches the caller); leaving the loop early stops the generation at the next token."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        server, left, pieces = self.server, threading.Event(), queue.Queue()

        def stopped() -> bool:
            return left.is_set() or (stop is not None and stop.is_set())

        def work():
            try:
                pieces.put(("done", server.complete(prompt, memory, max_new_tokens, lambda p: pieces.put(("text", p)), stopped, temperature,
                                                    top_p, seed, plain)))
            except BaseException as exc:  # noqa: BLE001 - raised again in the caller
                pieces.put(("error", exc))

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            while True:
                kind, value = pieces.get()
                if kind == "text":
                    yield value
                elif kind == "error":
                    raise value
                else:
                    if usage is not None:
                        usage.update(value)
                    return
        finally:
            left.set()
            thread.join()  # within a token: no completion outlives its caller (a thread inside llama.cpp at exit aborts the process)

    def answer_tokens(self, answer: str, generated: int) -> int:
        return generated or super().answer_tokens(answer, generated)  # llama.cpp's count; interrupted: the answer's tokens

    def generate(self, prompt: str | list[dict], memory: str, on_token: Callable[[str], None], max_new_tokens: int = 256,
                 stop: threading.Event | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> tuple[str, int]:
        """:meth:`session.Engine.generate` as one request to the server; safe to call from several threads at once."""
        text = prompt if isinstance(prompt, str) else self.server.render(prompt)
        pieces, usage = [], {}
        for piece in self.stream(text, memory, max_new_tokens, stop, temperature, top_p, self._seed if seed is None else seed, usage=usage):
            pieces.append(piece)
            on_token(piece)
        return "".join(pieces), int(usage.get("completion_tokens") or 0)


def open_xllama_session(bank_dir: Path, home: Path, recipe, domain: str = AUTO, version: int | None = None,
                        note: Callable[[str], None] | None = None, slots: int = 1, threads: int | None = None,
                        context: int | None = None) -> XLlamaSession:
    """The base GGUF in llama.cpp's server with every adapter of a bank version (default: the current one).
    ``slots`` > 1 (serve): that many parallel sequences of ``context`` tokens each (default :data:`SLOT_CONTEXT`);
    1 (chat): the model's context unless ``context`` is given."""
    from .export import base_gguf
    from .system import llama_threads

    bank = Bank(bank_dir)
    state = bank.load(version)
    check_domain(state, domain)  # a wrong domain is reported before anything loads
    threads = threads or llama_threads()
    session = XLlamaSession(model=None, tokenizer=None, state=state, domain=AUTO, **routing(bank, state, recipe, home, llama_threads=threads),
                            home=Path(home), base_gguf=base_gguf(bank_model(bank, recipe)), slots=slots,
                            context=context or (SLOT_CONTEXT if slots > 1 else 0), threads=threads)
    session.tokenizer = ServerTokenizer(session)
    session.load_adapters(state, note)
    session.set_domain(domain)
    return session


def open_xllama_base(model: str, home: Path, adapters: dict[str, Path] | None = None, threads: int | None = None) -> XLlamaSession:
    """The base model's GGUF in llama.cpp's server with ``adapters`` (name -> PEFT folder) and no bank (the benchmark's)."""
    from .export import base_gguf
    from .llama_gguf import cached_adapter
    from .system import llama_threads

    session = XLlamaSession(model=None, tokenizer=None, state=None, domain=AUTO, threshold=None, embedder_factory=lambda: None,
                            home=Path(home), base_gguf=base_gguf(model), threads=threads or llama_threads())
    session.tokenizer = ServerTokenizer(session)
    files = {name: cached_adapter(folder, session.base_gguf, session.home, name) for name, folder in (adapters or {}).items()}
    session.server, session.adapter_files = LlamaServer(session.base_gguf, files, 1, 0, session.threads), files
    return session


__all__ = ["LlamaServer", "XLlamaSession", "importable", "open_xllama_base", "open_xllama_session"]
