"""The engine choice of ``chat`` and ``serve`` (``--engine auto|torch|llama.cpp``): which engine answers
(:func:`engine_for`) and opening a bank version's session on it (:func:`open_chat`). The torch session is
chat.py's, the llama.cpp ones llamacpp.py opens (on xllama.py or llamacpp_py.py). Nothing here imports torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from .errors import InputError
from .llama_gguf import LLAMA_CPP
from .llamacpp import why_not_llama_cpp
from .model import ModelError
from .session import AUTO, Session

TORCH = "torch"
ENGINES = (AUTO, TORCH, LLAMA_CPP)


def engine_for(engine: str, bank_dir: Path | None, recipe, unmerged: bool = False) -> str:
    """The engine that answers: ``torch`` or ``llama.cpp``.

    ``auto`` picks llama.cpp when the binding imports (xllamacpp, a dependency), the base model has a GGUF (the embedded default model),
    the bank was built on that model, ``--quant`` resolves to none and ``--unmerged`` is not asked; else torch.
    An explicit ``llama.cpp`` that cannot run raises one line naming why.
    """
    if engine not in ENGINES:
        raise InputError(f"unknown engine {engine!r}; use {', '.join(ENGINES)}")
    if engine == TORCH:
        return TORCH
    why = why_not_llama_cpp(bank_dir, recipe, unmerged)
    if why is None:
        return LLAMA_CPP
    if engine == LLAMA_CPP:
        raise ModelError(f"--engine llama.cpp: {why}")
    return TORCH


def open_chat(bank_dir: Path, home: Path, recipe, engine: str = AUTO, domain: str = AUTO, merge: bool = True, version: int | None = None,
              note: Callable[[str], None] | None = None, slots: int = 1, context: int | None = None) -> Session:
    """Open a bank version's session on the engine :func:`engine_for` picks (chat's and the server's entry point;
    ``merge=False``: PEFT's unmerged LoRA layers, torch only; ``slots``: the server's parallel sequences of
    ``context`` tokens each, llama.cpp only)."""
    if engine_for(engine, bank_dir, recipe, unmerged=not merge) == TORCH:
        from .chat import open_session

        return open_session(bank_dir, home, recipe, domain=domain, merge=merge, version=version, note=note)
    from .llamacpp import open_llama_cpp

    return open_llama_cpp(bank_dir, home, recipe, domain, version, note, slots=slots, context=context)
