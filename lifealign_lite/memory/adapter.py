"""The bank's adapter files: a PEFT LoRA folder read as weight updates and written from them, and the low-rank
tensor files (history) of a version.

Adapters are stored at the rank SLMC leaves each module (PEFT's ``rank_pattern``; every rank bounded by
``bank_rank``; PEFT loads adapters of different ranks side by side) with 16-bit factors (``STORAGE_DTYPE``,
chosen by measurement: docs/PERFORMANCE.md); they are read back as float32 and SLMC computes in float64.
Banks written before (rank padded to ``bank_rank``, float32, one history file) load as they are.
Hand-written rather than PEFT's ``save_pretrained``/``load_peft_weights``: docs/ARCHITECTURE.md says why.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import LifeAlignError
from ..model import PEFT_PREFIX
from .consolidate import LowRank

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
# fp16 over bf16: its 10-bit mantissa keeps the factors 8 times more precisely, and balanced LoRA factors lie far
# inside fp16's range (measured on the four-domain bank: docs/PERFORMANCE.md)
# (torch.float16: the module attribute is made on first use, so that reading a bank imports no torch; see __getattr__)


class BankError(LifeAlignError, RuntimeError):
    """A bank that cannot be used as asked: missing, corrupted, locked, or built on another base model."""


def __getattr__(name: str):
    """``STORAGE_DTYPE`` (torch.float16), imported when first asked for: chat on llama.cpp reads a bank without torch."""
    if name == "STORAGE_DTYPE":
        import torch

        return torch.float16
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _storage_dtype():
    """The storage precision: ``STORAGE_DTYPE`` as set on this module (a measurement script sets it), else float16."""
    return globals().get("STORAGE_DTYPE") or __getattr__("STORAGE_DTYPE")


def load_file(path: str) -> dict:
    """safetensors' reader for torch, imported on first use (reading a manifest or checksums needs no torch)."""
    from safetensors.torch import load_file as load

    return load(path)


def save_file(tensors: dict, path: str, metadata: dict | None = None) -> None:
    from safetensors.torch import save_file as save

    save(tensors, path, metadata=metadata)


def why(exc: Exception) -> str:
    """An exception as a short phrase for a one-line error."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


def read_adapter(folder: Path) -> tuple[dict[str, LowRank], dict]:
    """Read a PEFT LoRA folder as weight updates ``scale * B @ A`` per module, plus its config.

    Each module's scale is its alpha over its rank (``alpha_pattern`` and the rank of its A factor, which follows
    ``rank_pattern``), so adapters whose modules have different ranks read right."""
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (cfg_path, weights):
        if not path.is_file():
            raise BankError(f"{path}: missing; the bank entry is incomplete (try `lifealign-lite memory rollback`)")
    try:
        config = json.loads(cfg_path.read_text())
        alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
        alpha_pattern = dict(config.get("alpha_pattern") or {})
        config["r"]  # noqa: B018 - a config without r is no LoRA config
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupted file
        raise BankError(f"{cfg_path}: corrupted adapter config ({why(exc)}); try `lifealign-lite memory verify`") from None
    try:
        tensors = load_file(str(weights))
        out = {}
        for key, a in tensors.items():
            if key.endswith(_LORA_A):
                name = key[len(PEFT_PREFIX):-len(_LORA_A)] if key.startswith(PEFT_PREFIX) else key[:-len(_LORA_A)]
                b = tensors[key[: -len(_LORA_A)] + _LORA_B]
                a_m = float(next((v for k, v in alpha_pattern.items() if re.match(rf"(.*\.)?({k})$", name)), alpha))
                scale = a_m / (a.shape[0] ** 0.5 if rslora else a.shape[0])
                out[name] = LowRank(b.float() * scale, a.float())
    except Exception as exc:  # noqa: BLE001
        raise BankError(f"{weights}: corrupted adapter weights ({why(exc)}); try `lifealign-lite memory verify`") from None
    return out, config


def write_adapter(folder: Path, update: dict[str, LowRank], rank: int, target_modules: list[str], base_name: str) -> Path:
    """Write updates as a PEFT LoRA folder (scaling 1, ``STORAGE_DTYPE`` factors), each module at its own rank.

    ``r`` is the largest module rank and PEFT's ``rank_pattern`` / ``alpha_pattern`` give the others (alpha = rank:
    scaling 1), so nothing is zero-padded; a zero update is stored as rank 1 (PEFT needs r >= 1). ``rank`` is the
    bank's upper bound."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    too_big = [f"{name} (rank {u.rank})" for name, u in update.items() if u.rank > rank]
    if too_big:
        raise ValueError(f"{too_big[0]} exceeds the bank rank {rank}; compress first")
    import torch

    ranks = {name: max(u.rank, 1) for name, u in update.items()}
    r = max(ranks.values(), default=1)
    tensors = {}
    for name, u in update.items():
        b = torch.zeros(u.shape[0], ranks[name], dtype=_storage_dtype())
        a = torch.zeros(ranks[name], u.shape[1], dtype=_storage_dtype())
        b[:, : u.rank], a[: u.rank] = u.B, u.A
        tensors[f"{PEFT_PREFIX}{name}{_LORA_B}"] = b.contiguous()
        tensors[f"{PEFT_PREFIX}{name}{_LORA_A}"] = a.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    pattern = {re.escape(name): k for name, k in sorted(ranks.items()) if k != r}  # PEFT reads the keys as regular expressions
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": r, "lora_alpha": r, "lora_dropout": 0.0,
        "rank_pattern": pattern, "alpha_pattern": pattern,
        "target_modules": sorted(target_modules), "bias": "none", "base_model_name_or_path": base_name,
        "inference_mode": True, "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def replace_adapter(folder: Path, update: dict[str, LowRank], rank: int, target_modules: list[str], base_name: str) -> Path:
    """(Re)write an adapter folder inside a pending version without touching the parent's hard-linked files."""
    if folder.exists():
        shutil.rmtree(folder)
    return write_adapter(folder, update, rank, target_modules, base_name)


def adapter_rank(folder: Path) -> int | None:
    """The rank ``r`` an adapter folder's config records (None when it cannot be read)."""
    try:
        return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


# -- tensor files of a version (keys, Fisher, history) -----------------------------------------------------------

def save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def save_lowrank(path: Path, update: dict[str, LowRank]) -> None:
    tensors = {}
    for name, u in update.items():
        tensors[f"{name}.B"], tensors[f"{name}.A"] = u.B.to(_storage_dtype()).contiguous(), u.A.to(_storage_dtype()).contiguous()
    save_file(tensors, str(path))


def load_lowrank(path: Path) -> dict[str, LowRank]:
    tensors = load_file(str(path))
    return {key[:-2]: LowRank(tensors[key].float(), tensors[key[:-2] + ".A"].float()) for key in tensors if key.endswith(".B")}


def load_lowrank_list(path: Path) -> list[dict[str, LowRank]]:
    """The single history file of banks written before 16-bit storage."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        count = int((f.metadata() or {}).get("count", 0))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    items: list[dict[str, LowRank]] = [{} for _ in range(count)]
    for key in tensors:
        if key.endswith(".B"):
            i, name = key[:-2].split(".", 1)
            items[int(i)][name] = LowRank(tensors[key].float(), tensors[key[:-2] + ".A"].float())
    return items
