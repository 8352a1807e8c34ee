"""Whether and how llama.cpp answers ``chat`` and ``serve``: the binding, why llama.cpp cannot run for given options
(engines.py's ``auto`` falls back to torch on it), and opening a bank version's llama.cpp session on the binding.

The base is the base model's own GGUF (the embedded Q4_1 file for the default model: :func:`export.base_gguf`),
the weights the transformers path de-quantizes, so both engines run the same model; every memory is a GGUF LoRA
adapter exported once into a cache (llama_gguf.py, which both bindings share). Two bindings run it. The default
is xllamacpp (xllama.py: a prebuilt wheel, a dependency, llama.cpp's server with continuous batching across
memories); llama-cpp-python (llamacpp_py.py: compiled on install, one sequence at a time) is used instead where
``LIFEALIGN_LLAMA_BINDING=llama-cpp-python``. Nothing here imports torch or transformers: ``chat --domain NAME``
on a bank whose adapters are cached starts without them (``auto`` routing imports the embedder when the first
prompt is routed).
"""


from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from typing import Callable

from .errors import InputError
from .memory.bank import Bank
from .model import DEFAULT_MODEL, DEFAULT_MODEL_NAME, resolve_quant
from .session import AUTO, Session
from .system import llama_threads as threads  # in system.py: export uses it too, and must not import this module

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


def why_not_llama_cpp(bank_dir: Path | None, recipe, unmerged: bool) -> str | None:
    """Why llama.cpp cannot answer for these options (one line naming the way out), or None where it can."""
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


def open_llama_cpp(bank_dir: Path, home: Path, recipe, domain: str = AUTO, version: int | None = None,
                   note: Callable[[str], None] | None = None, slots: int = 1, context: int | None = None) -> Session:
    """The llama.cpp session of a bank version on the binding asked for (``slots``: xllamacpp's parallel sequences,
    ``context`` tokens each)."""
    if binding() == "xllamacpp":
        from .xllama import open_xllama_session

        return open_xllama_session(bank_dir, home, recipe, domain, version, note, slots=slots, context=context)
    from .llamacpp_py import open_llama_session

    return open_llama_session(bank_dir, home, recipe, domain, version, note)
