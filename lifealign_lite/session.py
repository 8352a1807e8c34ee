"""The session layer: a conversation over one bank version on one engine; ``chat``, ``serve``, ``eval``, ``route`` and the judge use it.

:class:`Session` is what does not depend on the engine: the bank version, the domain choice (a domain, ``auto``,
``core`` or ``base``), routing (:func:`routing`: the one place that decides the embedder and the threshold), the
history, and :meth:`Session.ask`, which is the engine's :meth:`Engine.generate` plus the history. An engine is a
subclass that implements :class:`Engine`: loading the bank's adapters, making one of them active, and generating:

- ``chat.ChatSession`` (torch): every adapter added directly into fp32 weights, or held by PEFT (merged, or run
  unmerged as LoRA layers on a 4-bit base or with ``--unmerged``);
- ``xllama.XLlamaSession`` and ``llamacpp_py.LlamaSession`` (llama.cpp): every memory a GGUF LoRA adapter.

``engines.open_chat`` picks the engine and opens its session. Nothing here imports torch or transformers.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar, ContextManager, Protocol, runtime_checkable

from .errors import InputError
from .memory.adapter import BankError
from .memory.bank import Bank
from .memory.router import CORE, Route, prompt_text
from .memory.state import BankState

BASE = "base"
AUTO = "auto"


@dataclass
class ChatTurn:
    text: str
    memory: str  # the adapter that answered: a domain, "core" or "base"
    route: Route | None
    first_token_s: float
    tokens: int
    seconds: float
    interrupted: bool = False  # stopped by Ctrl-C before the answer was complete


@runtime_checkable
class Engine(Protocol):
    """What answers: a base model with every adapter of a bank version loaded, one of them in use at a time.

    ``engine`` names it for status lines; ``concurrent`` says whether :meth:`generate` may run in several threads
    at once (serve's lock is skipped); ``embedder_shares_model`` whether the ``base`` routing embedder reads this
    engine's model (with the adapter off).
    """

    engine: ClassVar[str]
    concurrent: ClassVar[bool]
    embedder_shares_model: ClassVar[bool]

    def load_adapters(self, state: BankState) -> None:
        """Load every adapter of ``state`` (each slot under its domain's name, and the core), none of them active."""

    def use_version(self, state: BankState) -> None:
        """Swap in the adapters of another bank version, keeping the base model (the server's hot reload)."""

    def activate(self, memory: str) -> None:
        """Make ``memory`` (a domain, core or base) the adapter in use."""

    def using(self, memory: str) -> ContextManager:
        """Within the block, the model answers (or scores) with ``memory``'s adapter (base: none)."""

    def seed(self, seed: int) -> None:
        """Seed the sampling of the next answers (the server's ``seed``)."""

    def generate(self, prompt: str | list[dict], memory: str, on_token: Callable[[str], None], max_new_tokens: int = 256,
                 stop: threading.Event | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> tuple[str, int]:
        """Answer ``prompt`` with ``memory``, without touching any history: a conversation (list of messages) goes
        through the chat template, a text is continued as it is. Greedy (repetition penalty 1.1) unless
        ``temperature`` > 0. Pieces of text go to ``on_token``; setting ``stop`` ends it at the next token; Ctrl-C
        stops it too and is raised again. Returns the text and the number of new tokens."""

    def answer_tokens(self, answer: str, generated: int) -> int:
        """The token count ``ask`` reports for ``answer`` (``generated``: what :meth:`generate` counted, 0 if interrupted)."""


def check_domain(state: BankState, domain: str) -> None:
    """Raise unless ``domain`` is auto or a memory of ``state`` (the session openers call it before anything loads)."""
    if domain not in (AUTO, *memories(state)):
        known = ", ".join(sorted(state.domains)) or "none yet"
        raise BankError(f"unknown domain {domain!r}; known domains: {known} (or auto, core, base)")


def memories(state: BankState) -> list[str]:
    """The memories of a bank version: every domain, the core if there is one, and base."""
    return sorted(state.domains) + ([CORE] if state.core_dir() else []) + [BASE]


def adapter_folders(state: BankState) -> list[tuple[str, Path]]:
    """(memory name, PEFT adapter folder) of every adapter of ``state``: each slot under its domain's name, then the core."""
    return [(name, state.slot_dir(name)) for name in sorted(state.domains)] + ([(CORE, state.core_dir())] if state.core_dir() else [])


@dataclass
class Session:
    """The engine-independent part of a session; an engine subclass implements :class:`Engine`. On its own (no
    engine: :func:`routing_session`) it only routes."""

    model: object
    tokenizer: object
    state: BankState
    domain: str  # a domain name, auto, core or base
    threshold: float | None  # None or < 0: each domain's calibrated novelty threshold
    embedder_factory: Callable[[], object]
    gate: float = 0.0  # the recipe's route_gate: the core answers below this top probability of the classifier
    active: str | None = None
    history: list[dict] = field(default_factory=list)
    _embedder: object | None = None
    _router: object | None = None
    engine: ClassVar[str] = "none"
    concurrent: ClassVar[bool] = False
    embedder_shares_model: ClassVar[bool] = False

    def available(self) -> list[str]:
        return memories(self.state)

    def set_domain(self, domain: str) -> None:
        check_domain(self.state, domain)
        self.domain = domain

    def route(self, conversation) -> Route:
        """Route a prompt (a text, or a conversation as a list of messages) as ``route`` and the server do."""
        if self._embedder is None:
            self._embedder = self.embedder_factory()
        if self._router is None:
            self._router = self.state.router()
        text = prompt_text(conversation)
        fixed = self.threshold if self.threshold is not None and self.threshold >= 0 else None
        own_states = getattr(self._embedder, "name", "") == "base" and self.embedder_shares_model  # keys hold base states: no adapter in
        with self.using(BASE) if own_states else contextlib.nullcontext():
            embedding = self._embedder([text])[0]
        return self._router.route(embedding, text, fixed, self.gate)

    def memory_of(self, route: Route) -> str:
        """The memory that answers a routed prompt: the domain routed to, or base where the core was and there is none."""
        return route.domain if route.domain != CORE or self.state.core_dir() else BASE

    def memory_for(self, conversation) -> tuple[str, Route | None]:
        if self.domain != AUTO:
            return self.domain, None
        r = self.route(conversation)
        return self.memory_of(r), r

    def ask(self, text: str, on_token: Callable[[str], None] | None = None, max_new_tokens: int = 256, keep_history: bool = True) -> ChatTurn:
        """Answer ``text`` (with the conversation so far) with the memory the domain choice gives, streaming pieces of
        text to ``on_token``: :meth:`Engine.generate` plus the history.

        Ctrl-C while answering stops generation (at the next token) and returns the partial answer with
        ``interrupted`` set, so an interactive caller can go back to its prompt.
        """
        if max_new_tokens < 1:  # before routing: nothing to answer
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        messages = self.history + [{"role": "user", "content": text}]
        memory, r = self.memory_for(messages)
        pieces, first, interrupted, generated = [], None, False, 0

        def emit(piece: str) -> None:
            nonlocal first
            if first is None:
                first = time.perf_counter() - t0
            pieces.append(piece)
            if on_token:
                on_token(piece)

        try:
            generated = self.generate(messages, memory, emit, max_new_tokens)[1]
        except KeyboardInterrupt:
            interrupted = True
        answer = "".join(pieces).strip()
        if keep_history:
            self.history = messages + [{"role": "assistant", "content": answer}]
        return ChatTurn(answer, memory, r, first or 0.0, self.answer_tokens(answer, generated), time.perf_counter() - t0, interrupted)

    def answer_tokens(self, answer: str, generated: int) -> int:
        return len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])

    def activate(self, memory: str) -> None:
        self.active = memory

    @contextlib.contextmanager
    def using(self, memory: str):
        self.activate(memory)
        yield

    def load_adapters(self, state: BankState) -> None:
        raise NotImplementedError("a session without an engine only routes")

    def use_version(self, state: BankState) -> None:
        self.load_adapters(state)

    def seed(self, seed: int) -> None:
        raise NotImplementedError("a session without an engine only routes")

    def generate(self, prompt, memory, on_token, max_new_tokens=256, stop=None, temperature=0.0, top_p=1.0, seed=None) -> tuple[str, int]:
        raise NotImplementedError("a session without an engine only routes")


def routing_embedder(kind: str, model: str, home: Path, base=None, llama_threads: int = 0):
    """The one place that builds a bank's routing embedder (on the first routed prompt only): MiniLM, or the base
    model's own hidden states (``base`` when the caller holds the transformers model already, else ``model`` loaded in fp32).
    ``llama_threads``: llama.cpp's threads in this process (a llama.cpp engine's), whose speed needs torch kept to one
    thread (:func:`system.one_torch_thread`)."""
    from .memory.router import make_embedder
    from .system import one_torch_thread

    one_torch_thread(llama_threads)
    if kind == "base" and base is None:
        from .model import load_base

        base = load_base(model, home, "none")
    return make_embedder(kind, base)


def bank_model(bank: Bank, recipe) -> str:
    """The base model a bank was built on (its manifest's), else the recipe's."""
    return (bank.manifest().get("base") or {}).get("name") or recipe.model


def routing(bank: Bank, state: BankState, recipe, home: Path, base=None, llama_threads: int = 0) -> dict:
    """The routing every session of ``state`` does, as ``threshold`` and ``embedder_factory`` (a session's fields): the
    bank's ``router`` on the bank's base model (``base``: that model, loaded already), and the recipe's
    ``route_threshold`` and ``route_gate``. ``route``, ``chat --domain auto`` (either engine) and serve's ``model: auto`` all take it from here.
    ``llama_threads``: a llama.cpp engine's threads (see :func:`routing_embedder`)."""
    kind, model = state.meta.get("router", recipe.router), bank_model(bank, recipe)
    return {"threshold": recipe.route_threshold, "gate": recipe.route_gate,
            "embedder_factory": lambda: routing_embedder(kind, model, home, base, llama_threads)}


def routing_session(bank_dir: Path, home: Path, recipe, state: BankState | None = None) -> Session:
    """A session that only routes (no engine): what ``route`` reports."""
    bank = Bank(bank_dir)
    state = state or bank.load()
    return Session(model=None, tokenizer=None, state=state, domain=AUTO, **routing(bank, state, recipe, home))
