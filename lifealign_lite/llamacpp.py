"""The engine choice of ``chat`` and ``serve`` (``--engine auto|torch|llama.cpp``) and what both llama.cpp bindings
share: the base model's GGUF with every memory as a llama.cpp LoRA adapter, exported once into a cache.

The base is the base model's own GGUF (the embedded Q4_1 file for the default model: :func:`export.base_gguf`),
the weights the transformers path de-quantizes, so both engines run the same model. Each memory (every domain's
slot and the core) is exported once as a GGUF LoRA adapter (:func:`export.adapter_gguf`, checked structurally)
and cached under ``LIFEALIGN_HOME/cache/gguf/<sha256>.gguf``, named by the SHA-256 of the entry's adapter files and
the base GGUF's name: a second session loads the cached file without exporting (or importing torch).

Two bindings run it. The default is xllamacpp (xllama.py: a prebuilt wheel, a dependency, llama.cpp's server with
continuous batching across memories); llama-cpp-python (llamacpp_py.py: compiled on install, one sequence at a
time) is used instead where ``LIFEALIGN_LLAMA_BINDING=llama-cpp-python``. Nothing here imports torch or
transformers: ``chat --domain NAME`` on a bank whose adapters are cached starts without them (``auto`` routing
imports the embedder when the first prompt is routed).
"""


from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

from .chat import AUTO, ChatSession
from .errors import InputError
from .llama_gguf import LLAMA_CPP
from .memory.bank import Bank
from .model import DEFAULT_MODEL, DEFAULT_MODEL_NAME, ModelError, resolve_quant
from .system import llama_threads as threads  # in system.py: export uses it too, and must not import this module

TORCH = "torch"
ENGINES = (AUTO, TORCH, LLAMA_CPP)
BINDING_ENV = "LIFEALIGN_LLAMA_BINDING"  # xllamacpp (the default) or llama-cpp-python
BINDINGS = ("xllamacpp", "llama-cpp-python")
INSTALL = {"xllamacpp": "pip install xllamacpp (a dependency of lifealign-lite: run scripts/setup.sh again, or pip install -e .)",
           "llama-cpp-python": f"pip install llama-cpp-python (it compiles llama.cpp, about 25 minutes on 2 cores), or unset {BINDING_ENV}"}


def binding() -> str:
    """The llama.cpp binding asked for: ``LIFEALIGN_LLAMA_BINDING``, else xllamacpp."""
    name = os.environ.get(BINDING_ENV, "").strip() or BINDINGS[0]
    if name not in BINDINGS:
        raise InputError(f"{BINDING_ENV}={name!r}: use {' or '.join(BINDINGS)}")
    return name


def llama_cpp_importable() -> bool:
    """Whether the binding asked for is installed and its library loads."""
    module = "xllamacpp" if binding() == "xllamacpp" else "llama_cpp"
    if importlib.util.find_spec(module) is None:
        return False
    try:
        importlib.import_module(module)
    except (ImportError, OSError):  # OSError: the compiled library does not load on this machine
        return False
    return True


def cuda_visible() -> bool:
    """Whether an NVIDIA GPU is visible, asked without importing torch: what ``--quant auto`` depends on (NF4 on a GPU)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    gpus = Path("/proc/driver/nvidia/gpus")
    return gpus.is_dir() and any(gpus.iterdir())


def _is_default(spec: str | None) -> bool:
    return spec in (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "", None)


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
    why = _why_not_llama_cpp(bank_dir, recipe, unmerged)
    if why is None:
        return LLAMA_CPP
    if engine == LLAMA_CPP:
        raise ModelError(f"--engine llama.cpp: {why}")
    return TORCH


def _why_not_llama_cpp(bank_dir: Path | None, recipe, unmerged: bool) -> str | None:
    if unmerged:
        return "--unmerged runs PEFT's LoRA layers, which only the torch engine has; leave out --unmerged or use --engine torch"
    quant = resolve_quant(recipe.quant, "cuda" if cuda_visible() else "cpu")
    if quant != "none":
        return f"--quant {quant} is a bitsandbytes precision of the torch engine; use --quant none or --engine torch"
    if not _is_default(recipe.model):
        return f"the base model {recipe.model!r} has no GGUF here (only the embedded {DEFAULT_MODEL_NAME} has); use --engine torch"
    base = (Bank(bank_dir).manifest().get("base") or {}).get("name") if bank_dir else None
    if base is not None and not _is_default(base):
        return f"the bank was built on {base!r}, which has no GGUF here; use --engine torch"
    if not llama_cpp_importable():
        return f"{binding()} is not installed: {INSTALL[binding()]}"
    return None


def open_chat(bank_dir: Path, home: Path, recipe, engine: str = AUTO, domain: str = AUTO, merge: bool = True, version: int | None = None,
              note: Callable[[str], None] | None = None, slots: int = 1) -> ChatSession:
    """Open a chat session on the engine :func:`engine_for` picks (chat's and the server's entry point; the server
    asks xllamacpp for ``slots`` parallel sequences)."""
    if engine_for(engine, bank_dir, recipe, unmerged=not merge) == LLAMA_CPP:
        if binding() == "xllamacpp":
            from .xllama import open_xllama_session

            return open_xllama_session(bank_dir, home, recipe, domain, version, note, slots=slots)
        from .llamacpp_py import open_llama_session

        return open_llama_session(bank_dir, home, recipe, domain, version, note)
    from .chat import open_session

    return open_session(bank_dir, home, recipe, domain=domain, merge=merge, version=version, note=note)
