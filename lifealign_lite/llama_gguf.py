"""What both llama.cpp bindings (xllama.py, llamacpp_py.py) share: every memory's GGUF LoRA adapter, exported once into
a cache under the home folder, and a tokenizer face over a binding's chat template. Nothing here imports torch."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Callable

LLAMA_CPP = "llama.cpp"  # the engine's name (chat's status line, ``--engine``)
CACHE = Path("cache") / "gguf"  # under the home folder


def cached_adapter(folder: Path, base_path: Path, home: Path, name: str, note: Callable[[str], None] | None = None) -> Path:
    """The llama.cpp adapter file of the bank entry ``folder``, exported on first use and kept under ``home``.

    Named by the SHA-256 of the entry's config and weights and of the base GGUF's file name, so an entry that did
    not change between versions (a hard link) is exported once, and a changed one gets a file of its own. The file
    is written atomically: an interrupted export leaves nothing a later session would load.
    """
    digest = hashlib.sha256(Path(base_path).name.encode())
    for part in ("adapter_config.json", "adapter_model.safetensors"):
        digest.update(b"\0" + (Path(folder) / part).read_bytes())
    out = Path(home) / CACHE / f"{digest.hexdigest()}.gguf"
    if not out.is_file():
        from .export import adapter_gguf

        if note:
            note(f"exporting {name} once as a llama.cpp adapter ({out.name[:12]}...)")
        out.parent.mkdir(parents=True, exist_ok=True)
        adapter_gguf(Path(folder), Path(base_path), out, f"lifealign-lite {name}")
    return out




class TemplateTokenizer:
    """The calls chat and the server make of a transformers tokenizer (``tokenizer(text)["input_ids"]`` and
    ``apply_chat_template``), answered from a binding's ``render`` (the GGUF's chat template) and ``encode``."""

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        raise NotImplementedError

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        raise NotImplementedError

    def __call__(self, text: str, add_special_tokens: bool = True, **_) -> dict:
        return {"input_ids": self.encode(text, add_special_tokens)}

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, tokenize: bool = True, return_dict: bool = False, **_):
        text = self.render(messages, add_generation_prompt)
        if not tokenize:
            return text
        ids = self.encode(text)
        return {"input_ids": ids} if return_dict else ids
