"""``chat`` and ``serve`` on llama-cpp-python (compiled on install; chosen with ``LIFEALIGN_LLAMA_BINDING=llama-cpp-python``):
the base model's GGUF with every memory as a llama.cpp LoRA adapter, switched per answer, one sequence at a time.

All adapters are loaded at start (``llama_adapter_lora_init``); a switch sets the one in use with
``llama_set_adapters_lora`` at scale 1 (none for base) and clears the KV cache, whose entries the old adapter
computed. Within one memory, the next turn reuses the cached prefix of the conversation.

Decoding is chat's: greedy with transformers' repetition penalty 1.1, applied here to the logits llama.cpp returns
(NumPy, over every token of the prompt and the answer so far, as transformers does: llama.cpp's own penalty sampler
looks only at the last ``penalty_last_n`` tokens, 64 by default, and only at the tokens it was fed, not the prompt).
With a temperature (the server), transformers' sampling order: penalty, temperature, top-k 50 (its default),
top-p. The prompt is the GGUF's chat template rendered as transformers renders it (llama-cpp-python's
``Jinja2ChatFormatter``), tokenized with special tokens: the same token ids as the transformers path.
llama.cpp multiplies Q4_1 weights with 8-bit-quantized activations, so logits differ from transformers' fp32 ones
in the last digits: greedy answers agree token by token until two candidates are nearly tied.
"""

from __future__ import annotations

import atexit
import codecs
import ctypes
import threading
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, ClassVar

import numpy as np

from .errors import InputError
from .llama_gguf import LLAMA_CPP, TemplateTokenizer, cached_adapter
from .memory.bank import Bank, BankState
from .model import ModelError
from .session import AUTO, Session, adapter_folders, bank_model, check_domain, routing
from .system import llama_threads as threads

REPETITION_PENALTY = 1.1  # chat's (chat.py)
TOP_K = 50  # transformers' default for sampling


def open_llama_session(bank_dir: Path, home: Path, recipe, domain: str = AUTO, version: int | None = None,
                       note: Callable[[str], None] | None = None, n_threads: int | None = None) -> LlamaSession:
    """The base GGUF in llama.cpp with every adapter of a bank version (default: the current one) loaded."""
    bank = Bank(bank_dir)
    state = bank.load(version)
    check_domain(state, domain)  # a wrong domain is reported before anything loads
    n_threads = n_threads or threads()
    session = open_llama_base(bank_model(bank, recipe), home, n_threads)
    for field_, value in routing(bank, state, recipe, home, llama_threads=n_threads).items():  # as the other sessions' **routing(...)
        setattr(session, field_, value)
    session.load_adapters(state, note)
    session.set_domain(domain)
    return session


def open_llama_base(model: str, home: Path, n_threads: int | None = None) -> LlamaSession:
    """The base model's GGUF in llama.cpp, with no bank and no adapter yet."""
    from llama_cpp import Llama

    from .export import base_gguf

    path = base_gguf(model)
    n = n_threads or threads()
    llm = Llama(model_path=str(path), n_ctx=0, n_threads=n, n_threads_batch=n, verbose=False)  # n_ctx=0: the model's own context
    ref = weakref.ref(llm)  # freed before the interpreter tears llama_cpp down (else its __del__ prints a TypeError at exit)
    atexit.register(lambda: ref() is not None and ref().close())
    return LlamaSession(model=llm, tokenizer=GGUFTokenizer(llm), state=None, domain=AUTO, threshold=None, embedder_factory=lambda: None,
                        home=Path(home), base_gguf=path)


class GGUFTokenizer(TemplateTokenizer):
    """The GGUF's own vocabulary and chat template, answering the calls chat and the server make of a transformers
    tokenizer (``tokenizer(text)["input_ids"]`` and ``apply_chat_template``)."""

    def __init__(self, llm):
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        self.llm = llm
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise ModelError(f"{llm.model_path}: the GGUF has no chat template; use an instruct/chat model or --engine torch")
        eos, bos = (llm.detokenize([t], special=True).decode("utf-8", "replace") for t in (llm.token_eos(), llm.token_bos()))
        self._formats = {g: Jinja2ChatFormatter(template, eos_token=eos, bos_token=bos, add_generation_prompt=g) for g in (False, True)}
        self.add_bos = llm.metadata.get("tokenizer.ggml.add_bos_token", "false") == "true"
        self.pad_token_id = llm.token_eos()

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        return self._formats[add_generation_prompt](messages=messages).prompt

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of ``text``; special tokens written in it (``<|im_start|>``) are parsed, as transformers does."""
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens and self.add_bos, special=True)



@dataclass
class LlamaSession(Session):
    """The llama.cpp engine on llama-cpp-python (:class:`session.Engine`): ``model`` is a ``llama_cpp.Llama`` of the
    base GGUF, ``tokenizer`` its :class:`GGUFTokenizer`; every memory is a loaded LoRA adapter, one of them set on
    the context at a time."""

    engine: ClassVar[str] = LLAMA_CPP
    embedder_shares_model: ClassVar[bool] = False  # the routing embedder is a transformers model of its own
    home: Path | None = None
    base_gguf: Path | None = None
    adapter_files: dict[str, Path] = field(default_factory=dict)  # memory -> its cached GGUF adapter
    _loras: dict[str, object] = field(default_factory=dict)  # memory -> llama_adapter_lora pointer
    _cached: list[int] = field(default_factory=list)  # the tokens whose keys and values the context holds
    _rng: np.random.Generator = field(default_factory=np.random.default_rng)

    def load_adapters(self, state: BankState, note: Callable[[str], None] | None = None) -> None:
        """Export (once) and load every adapter of ``state`` in place of the ones loaded, none of them active."""
        import llama_cpp

        self._set_lora(None)
        for pointer in self._loras.values():
            llama_cpp.llama_adapter_lora_free(pointer)
        self.state, self.active, self._router, self._loras, self.adapter_files = state, None, None, {}, {}
        self.add_adapters(adapter_folders(state), note)

    def add_adapters(self, entries: list[tuple[str, Path]], note: Callable[[str], None] | None = None) -> None:
        """Load each (memory name, PEFT adapter folder) as a llama.cpp adapter, exported once into the cache."""
        import llama_cpp

        for name, folder in entries:
            path = cached_adapter(folder, self.base_gguf, self.home, name, note)
            pointer = llama_cpp.llama_adapter_lora_init(self.model.model, str(path).encode())
            if not pointer:
                raise ModelError(f"{path}: llama.cpp could not load this adapter of {name}; delete the file to export it again")
            self._loras[name], self.adapter_files[name] = pointer, path

    def activate(self, name: str) -> None:
        """Set ``name``'s adapter on the context (none for base) and drop the KV cache the previous one computed."""
        if name == self.active:
            return
        self._set_lora(self._loras.get(name))
        self._forget()
        self.active = name

    def _set_lora(self, pointer) -> None:
        import llama_cpp

        if self.model is None:
            return
        if pointer is None:
            rc = llama_cpp.llama_set_adapters_lora(self.model.ctx, None, 0, None)
        else:
            rc = llama_cpp.llama_set_adapters_lora(self.model.ctx, (llama_cpp.llama_adapter_lora_p_ctypes * 1)(pointer), 1,
                                                   (ctypes.c_float * 1)(1.0))
        if rc != 0:
            raise ModelError(f"llama.cpp refused to set the adapter (code {rc})")

    def _forget(self) -> None:
        """Empty the KV cache (after a switch, or a generation stopped half-way)."""
        import llama_cpp

        self.model.reset()
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.model.ctx), True)
        self._cached = []

    def seed(self, seed: int) -> None:
        self._rng = np.random.default_rng(seed)

    def generate(self, prompt: str | list[dict], memory: str, on_token: Callable[[str], None], max_new_tokens: int = 256,
                 stop: threading.Event | None = None, temperature: float = 0.0, top_p: float = 1.0,
                 seed: int | None = None) -> tuple[str, int]:
        """:meth:`session.Engine.generate` in this process, one sequence at a time."""
        if max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        if seed is not None:
            self.seed(seed)
        self.activate(memory)
        ids = self.tokenizer.encode(prompt, True) if isinstance(prompt, str) else self.tokenizer.apply_chat_template(prompt, add_generation_prompt=True)
        pieces = []

        def emit(piece: str) -> None:
            pieces.append(piece)
            on_token(piece)

        try:
            n = self._decode(ids, max_new_tokens, emit, stop, temperature, top_p)
        except BaseException:
            self._forget()
            raise
        return "".join(pieces), n

    def _decode(self, ids: list[int], max_new_tokens: int, emit: Callable[[str], None], stop: threading.Event | None = None,
                temperature: float = 0.0, top_p: float = 1.0) -> int:
        """Generate after ``ids`` until an end-of-generation token, ``max_new_tokens`` or ``stop``; pieces of text go
        to ``emit`` as soon as they are whole UTF-8. Returns the number of new tokens (the end token included, as
        transformers counts it)."""
        import llama_cpp

        llm = self.model
        if len(ids) >= llm.n_ctx():
            raise InputError(f"the conversation ({len(ids)} tokens) fills the model's context of {llm.n_ctx()} tokens; /reset it")
        max_new_tokens = min(max_new_tokens, llm.n_ctx() - len(ids))  # the answer ends where the context does
        keep = 0
        for a, b in zip(self._cached, ids[:-1]):  # the last prompt token is always evaluated: its logits choose the first
            if a != b:
                break
            keep += 1
        llm.n_tokens, self._cached = keep, ids[:keep]
        llm.eval(ids[keep:])
        self._cached = list(ids)
        vocab, n_vocab = llama_cpp.llama_model_get_vocab(llm.model), llm.n_vocab()
        seen = np.zeros(n_vocab, dtype=bool)
        seen[ids] = True
        text = codecs.getincrementaldecoder("utf-8")("replace")
        count = 0
        while count < max_new_tokens:
            logits = np.array(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(n_vocab,)), dtype=np.float32)
            token = self._pick(logits, np.flatnonzero(seen), temperature, top_p)
            count += 1
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                break
            seen[token] = True
            piece = text.decode(llm.detokenize([token]))
            if piece:
                emit(piece)
            if count == max_new_tokens or (stop is not None and stop.is_set()):
                break
            llm.eval([token])
            self._cached.append(token)
        rest = text.decode(b"", final=True)
        if rest:
            emit(rest)
        return count

    def _pick(self, logits: np.ndarray, seen: np.ndarray, temperature: float, top_p: float) -> int:
        """transformers' choice: the repetition penalty on every token seen, then greedy, or temperature, top-k, top-p and a draw."""
        scores = logits[seen]
        logits[seen] = np.where(scores < 0, scores * REPETITION_PENALTY, scores / REPETITION_PENALTY)
        if temperature <= 0:
            return int(np.argmax(logits))
        logits = logits / temperature
        kth = np.partition(logits, -TOP_K)[-TOP_K]
        logits[logits < kth] = -np.inf
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        order = np.argsort(-probs, kind="stable")
        keep = order[: int(np.searchsorted(np.cumsum(probs[order]), top_p)) + 1] if top_p < 1 else order
        p = probs[keep] / probs[keep].sum()
        return int(keep[self._rng.choice(len(keep), p=p)])
