"""One version of the bank as read: :class:`BankState` (its domains, tasks and settings, and readers for each of its
files), the :class:`PendingVersion` being written, and the check that a ``state.json`` is one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..data import DataError, Pair, load_pairs
from .adapter import BankError, load_file, load_lowrank, load_lowrank_list, why
from .consolidate import LowRank
from .router import Router, fit_router

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

HISTORY_DIR = "history"
KEYS_DIR = "keys"


@dataclass
class BankState:
    """What one version holds, in memory. Adapters are read lazily from ``folder``."""

    version: int = 0
    folder: Path | None = None
    domains: dict[str, dict] = field(default_factory=dict)  # name -> {rank, pairs_seen, updated, lineage}
    tasks: list[str] = field(default_factory=list)  # domain of each consolidated task, in order
    meta: dict = field(default_factory=dict)  # bank_rank, target_modules
    event: str = ""

    def core_dir(self) -> Path | None:
        return self.folder / "core" if self.folder and (self.folder / "core").is_dir() else None

    def slot_dir(self, domain: str) -> Path:
        if domain not in self.domains:
            known = ", ".join(sorted(self.domains)) or "none yet"
            raise BankError(f"unknown domain {domain!r}; known domains: {known}")
        return self.folder / "slots" / domain

    def keys(self) -> dict[str, torch.Tensor]:
        folder = self.folder / KEYS_DIR if self.folder else None
        if folder is not None and folder.is_dir():
            return {p.stem: self._load(p, load_file)["key"] for p in sorted(folder.glob("*.safetensors"))}
        return self._optional("keys.safetensors", load_file, {})

    def key_texts(self) -> dict[str, list[str]]:
        return self._optional("key_texts.json", lambda p: json.loads(p.read_text(encoding="utf-8")), {})

    def router(self, quantile: float | None = None) -> Router:
        """This version's router; versions written before routers were stored get one refit from their keys."""
        keys = self.keys()
        path = self.folder / "router.safetensors" if self.folder else None
        if path is not None and path.exists():
            return self._load(path, lambda p: Router.from_file(p, keys))
        return fit_router(keys, self.key_texts(), self.meta.get("route_quantile", 0.05) if quantile is None else quantile)

    def history(self) -> list[dict[str, LowRank]]:
        """The consolidated update of every task, in task order (one file per task; older banks: one file)."""
        folder = self.folder / HISTORY_DIR if self.folder else None
        if folder is not None and folder.is_dir():
            return [self._load(p, load_lowrank) for p in sorted(folder.glob("*.safetensors"))]
        return self._optional("history.safetensors", load_lowrank_list, [])

    def fisher(self) -> dict[str, torch.Tensor]:
        return self._optional("fisher.safetensors", load_file, {})

    def replay(self) -> list[Pair]:
        path = self.folder / "replay.jsonl" if self.folder else None
        if not path or not path.exists() or path.stat().st_size == 0:
            return []
        try:
            return load_pairs(path)
        except DataError as exc:
            raise BankError(f"{path}: corrupted replay buffer ({exc.problems[0]}); list the damage with `lifealign-lite memory verify`") from None

    def _optional(self, name: str, loader, empty):
        """A file of this version read with ``loader``, or ``empty`` when the version has none."""
        path = self.folder / name if self.folder else None
        return self._load(path, loader) if path and path.exists() else empty

    @staticmethod
    def _load(path: Path, loader):
        try:
            return loader(path)
        except Exception as exc:  # noqa: BLE001
            raise BankError(f"{path}: corrupted ({why(exc)}); list the damage with `lifealign-lite memory verify`") from None


@dataclass
class PendingVersion:
    """A version being written: adapters and files go into ``folder`` until ``Bank.commit``."""

    state: BankState
    folder: Path
    parent: Path | None = None  # the parent version's folder, whose checksums shared files keep
    keys: dict[str, torch.Tensor] | None = None
    key_texts: dict[str, list[str]] | None = None
    router: Router | None = None
    history: list[dict[str, LowRank]] | None = None
    replay: list[Pair] | None = None
    fisher: dict[str, torch.Tensor] | None = None
    committed: BankState | None = None  # the new version, once ``Bank.transaction`` has committed it


def state_problem(data) -> str | None:
    """Why a parsed state.json cannot be a version's state, or None."""
    if not isinstance(data, dict):
        return "not a JSON object"
    for key, kind in (("domains", dict), ("tasks", list), ("meta", dict)):
        if not isinstance(data.get(key), kind):
            return f"'{key}' is missing or not a {'list' if kind is list else 'mapping'}"
    for name, info in data["domains"].items():
        if not isinstance(info, dict):
            return f"domain {name!r} is not a mapping"
        seen = info.get("pairs_seen")
        if isinstance(seen, bool) or not isinstance(seen, int) or seen < 0:
            return f"domain {name!r}: pairs_seen is {json.dumps(seen)}, not a count"
        if not isinstance(info.get("lineage", []), list):
            return f"domain {name!r}: lineage is not a list"
    if not all(isinstance(t, str) for t in data["tasks"]):
        return "'tasks' holds something other than domain names"
    meta = data["meta"]
    if meta and (not isinstance(meta.get("bank_rank"), int) or not isinstance(meta.get("target_modules"), list)):
        return "'meta' lacks bank_rank or target_modules"
    return None


def read_state(folder: Path) -> dict | str:
    """A version's parsed state.json, or why it cannot be used."""
    path = folder / "state.json"
    if not path.is_file():
        return "missing"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        return f"corrupted ({why(exc)})"
    problem = state_problem(data)
    return f"corrupted ({problem})" if problem else data
