"""``chat``: answer with the right long-term memory.

Every adapter of the bank version (core and every slot) is read once as fp32 weight updates ``B @ A``; the
active one is added into the fp32 base weights, so each answer runs the plain transformers model at its own
speed (no LoRA layers, no autocast, no PEFT import), and switching domain copies the touched weights back
from their originals (kept once) before adding another. ``auto`` routes each turn's whole conversation with
the bank's router. A 4-bit base (``--quant nf4``) or ``--unmerged`` goes through PEFT instead.
"""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, ClassVar

from .errors import InputError
from .memory.adapter import BankError, read_adapter
from .memory.bank import Bank
from .memory.state import BankState
from .memory.consolidate import LowRank
from .memory.router import CORE, Route, prompt_text
from .system import quiet

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

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


@dataclass
class ChatSession:
    """A base model with the bank's adapters loaded, one of them merged in at a time.

    ``direct`` selects the direct fp32 merge of ``updates`` (memory name -> {module name: update}); without it,
    ``model`` is a PEFT model holding the adapters (merged in by PEFT when ``merge``, else run as separate LoRA layers).
    """

    model: object
    tokenizer: object
    state: BankState
    domain: str  # a domain name, auto, core or base
    threshold: float | None  # None or < 0: each domain's calibrated novelty threshold
    embedder_factory: Callable[[], object]
    merge: bool = True
    active: str | None = None
    history: list[dict] = field(default_factory=list)
    _embedder: object | None = None
    _router: object | None = None
    updates: dict[str, dict[str, LowRank]] = field(default_factory=dict)
    _originals: dict[str, torch.Tensor] = field(default_factory=dict)  # module name -> its base weight
    direct: bool = False  # adapters merged as fp32 updates (``updates``) instead of through PEFT
    engine: ClassVar[str] = "torch"  # what answers, for status lines (xllama.XLlamaSession, llamacpp_py.LlamaSession: llama.cpp)
    embedder_shares_model: ClassVar[bool] = True  # the "base" routing embedder reads this session's model (adapter off)

    def available(self) -> list[str]:
        return sorted(self.state.domains) + ([CORE] if self.state.core_dir() else []) + [BASE]

    def set_domain(self, domain: str) -> None:
        if domain not in (AUTO, *self.available()):
            known = ", ".join(sorted(self.state.domains)) or "none yet"
            raise BankError(f"unknown domain {domain!r}; known domains: {known} (or auto, core, base)")
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
        if own_states:
            self.activate(BASE)
        with self.model.disable_adapter() if own_states and hasattr(self.model, "peft_config") else contextlib.nullcontext():
            embedding = self._embedder([text])[0]
        return self._router.route(embedding, text, fixed)

    def activate(self, name: str) -> None:
        """Make ``name`` (a domain, core or base) the adapter in use."""
        if name == self.active:
            return
        if self.direct:
            self._merge_update(self.updates.get(name, {}))
        elif hasattr(self.model, "peft_config"):
            if self.merge and self.active not in (None, BASE):
                self.model.unmerge_adapter()
            if name != BASE:
                self.model.set_adapter(name)
                if self.merge:
                    self.model.merge_adapter()
        self.active = name

    def _merge_update(self, update: dict[str, LowRank]) -> None:
        """Set each weight an update touches to base + B @ A, and every other touched weight back to base.

        Copying from the kept original (instead of subtracting the old update) leaves no rounding behind.
        """
        import torch

        with torch.no_grad():
            for module, original in self._originals.items():
                if module not in update:
                    self.model.get_submodule(module).weight.copy_(original)
            for module, low_rank in update.items():
                weight = self.model.get_submodule(module).weight
                if module not in self._originals:
                    self._originals[module] = weight.detach().clone()
                torch.add(self._originals[module], (low_rank.B @ low_rank.A).to(weight.dtype), out=weight)

    def seed(self, seed: int) -> None:
        """Seed the sampling of the next answers (the server's ``seed``)."""
        import torch

        torch.manual_seed(seed)

    def memory_for(self, conversation) -> tuple[str, Route | None]:
        if self.domain != AUTO:
            return self.domain, None
        r = self.route(conversation)
        return (r.domain if r.domain != CORE or self.state.core_dir() else BASE), r

    def ask(self, text: str, on_token: Callable[[str], None] | None = None, max_new_tokens: int = 256, keep_history: bool = True) -> ChatTurn:
        """Answer ``text`` (with the conversation so far), streaming pieces of text to ``on_token``.

        Ctrl-C while answering stops generation (at the next token) and returns the partial answer with
        ``interrupted`` set, so an interactive caller can go back to its prompt.
        """
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if max_new_tokens < 1:  # generate() would raise in its thread and leave the streamer waiting forever
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        t0 = time.perf_counter()
        messages = self.history + [{"role": "user", "content": text}]
        memory, r = self.memory_for(messages)
        self.activate(memory)
        enc = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = threading.Event()
        kwargs = dict(**enc, max_new_tokens=max_new_tokens, do_sample=False, repetition_penalty=1.1, streamer=streamer,
                      pad_token_id=self.tokenizer.pad_token_id, use_cache=True, stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]))
        run = self.model.disable_adapter() if memory == BASE and hasattr(self.model, "peft_config") else contextlib.nullcontext()

        def generate():
            with torch.no_grad(), run:
                self.model.generate(**kwargs)

        thread = threading.Thread(target=generate, daemon=True)  # daemon: an exit never waits for an answer
        pieces, first, interrupted = [], None, False
        try:
            thread.start()
            for piece in streamer:
                if first is None:
                    first = time.perf_counter() - t0
                pieces.append(piece)
                if on_token:
                    on_token(piece)
        except KeyboardInterrupt:
            interrupted = True
            stop.set()  # generate() checks it after every token
        thread.join()
        answer = "".join(pieces).strip()
        if keep_history:
            self.history = messages + [{"role": "assistant", "content": answer}]
        n_tokens = len(self.tokenizer(answer, add_special_tokens=False)["input_ids"])
        return ChatTurn(answer, memory, r, first or 0.0, n_tokens, time.perf_counter() - t0, interrupted)

    def generate(self, prompt: str | list[dict], memory: str, on_token: Callable[[str], None], max_new_tokens: int = 256,
                 stop: threading.Event | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> tuple[str, int]:
        """Answer ``prompt`` with ``memory`` (a domain, core or base), without touching the history: the server's entry point.

        A conversation (list of messages) goes through the chat template, a text is continued as it is. Greedy
        decoding (with chat's repetition penalty) unless ``temperature`` > 0. Pieces of text go to ``on_token``;
        setting ``stop`` ends generation at the next token; ``seed`` seeds the sampling. Returns the text and the number of new tokens.
        """
        import torch
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if seed is not None:
            self.seed(seed)
        self.activate(memory)
        if isinstance(prompt, str):
            enc = self.tokenizer(prompt, return_tensors="pt")
        else:
            enc = self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        device = next(self.model.parameters()).device
        enc = {k: v.to(device) for k, v in enc.items()}
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        stop = stop or threading.Event()
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        kwargs = dict(**enc, max_new_tokens=max_new_tokens, repetition_penalty=1.1, streamer=streamer, pad_token_id=self.tokenizer.pad_token_id,
                      use_cache=True, stopping_criteria=StoppingCriteriaList([_StopOnEvent(stop)]), **sampling)
        run = self.model.disable_adapter() if memory == BASE and hasattr(self.model, "peft_config") else contextlib.nullcontext()
        new_tokens = []

        def generate():
            with torch.no_grad(), run:
                new_tokens.append(self.model.generate(**kwargs).shape[1] - enc["input_ids"].shape[1])

        thread = threading.Thread(target=generate, daemon=True)
        thread.start()
        pieces = []
        try:
            for piece in streamer:
                pieces.append(piece)
                on_token(piece)
        finally:
            stop.set()  # a failing on_token must not leave generate() running
            thread.join()
        return "".join(pieces), new_tokens[0] if new_tokens else 0

    def load_adapters(self, state: BankState) -> None:
        """Load every adapter of ``state`` (each slot under its domain's name, and the core), none of them active.

        With ``direct``, each is read as fp32 updates for the direct merge; otherwise PEFT holds them (it merges
        into 4-bit weights, de-quantizing and re-quantizing, or runs them as LoRA layers).
        """
        adapters = [(name, state.slot_dir(name)) for name in sorted(state.domains)] + ([(CORE, state.core_dir())] if state.core_dir() else [])
        self.state, self.active, self._router = state, None, None
        if self.direct:
            self.updates = {name: read_adapter(folder)[0] for name, folder in adapters}
            return
        if not adapters:
            return
        from peft import PeftModel

        with quiet():
            for i, (name, folder) in enumerate(adapters):
                if i == 0:
                    self.model = PeftModel.from_pretrained(self.model, str(folder), adapter_name=name)
                else:
                    self.model.load_adapter(str(folder), adapter_name=name)
        self.model.eval()

    def use_version(self, state: BankState) -> None:
        """Swap in the adapters of another bank version, keeping the base model (the server's hot reload)."""
        if self.direct:
            self._merge_update({})  # every touched weight back to the base
        elif hasattr(self.model, "peft_config"):
            if self.merge and self.active not in (None, BASE):
                self.model.unmerge_adapter()
            self.model = self.model.unload()
        self.load_adapters(state)


class _StopOnEvent:
    """A transformers stopping criterion: stop every sequence once ``event`` is set (from another thread)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        import torch

        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def open_session(bank_dir: Path, home: Path, recipe, domain: str = AUTO, merge: bool = True, version: int | None = None,
                 note: Callable[[str], None] | None = None) -> ChatSession:
    """Load the base model and every adapter of a bank version (default: the current one) for chatting.

    Answers run in fp32 whatever the recipe's training autocast: merged into fp32 weights, an adapter's small
    change is kept (merged and then cast to bf16 by autocast it was rounded away: preference accuracy 0.50
    against 0.42 unmerged and 0.42 in fp32 on 12 hh-helpful dev pairs), and casting every weight to bf16 at
    every step under autocast cost more than it saved (docs/PERFORMANCE.md, ``bench chat``).
    """
    from .model import load_base

    bank = Bank(bank_dir)
    state = bank.load(version)
    # a wrong domain is reported before the slow imports and the model load
    ChatSession(model=None, tokenizer=None, state=state, domain=AUTO, threshold=0, embedder_factory=lambda: None).set_domain(domain)
    base = load_base(recipe.model, home, recipe.quant, trust_remote_code=recipe.trust_remote_code, note=note)
    bank.check_base(base.info.identity())
    base.model.eval()
    session = ChatSession(model=base.model, tokenizer=base.tokenizer, state=state, domain=AUTO, threshold=recipe.route_threshold,
                          embedder_factory=lambda: routing_embedder(state.meta.get("router", recipe.router), recipe.model, home, base), merge=merge,
                          direct=merge and base.info.quant == "none")
    session.load_adapters(state)
    session.set_domain(domain)
    return session


def routing_embedder(kind: str, model: str, home: Path, base=None):
    """The one place that builds a bank's routing embedder (chat on either engine, serve and ``route`` call it, on the
    first routed prompt only): MiniLM, or the base model's own hidden states (``base`` when the caller holds the
    transformers model already, else ``model`` loaded in fp32)."""
    from .memory.router import make_embedder

    if kind == "base" and base is None:
        from .model import load_base

        base = load_base(model, home, "none")
    return make_embedder(kind, base)


def routing_session(bank_dir: Path, home: Path, recipe, state: BankState | None = None) -> ChatSession:
    """A session that only routes (no model): what ``route`` reports, with the embedder (the bank's ``router``, on
    the bank's base model) and the threshold (the recipe's ``route_threshold``) that ``chat --domain auto`` and
    serve's ``model: auto`` use."""
    bank = Bank(bank_dir)
    state = state or bank.load()
    kind, model = state.meta.get("router", recipe.router), (bank.manifest().get("base") or {}).get("name") or recipe.model
    return ChatSession(model=None, tokenizer=None, state=state, domain=AUTO, threshold=recipe.route_threshold,
                       embedder_factory=lambda: routing_embedder(kind, model, home))
