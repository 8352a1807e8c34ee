"""The adapter bank on disk: long-term core, one slot per domain, domain keys, replay buffer, history.

Layout (every adapter is a PEFT folder that ``PeftModel.from_pretrained`` loads as it is)::

    BANK/manifest.json            base model, current version, version log (replaced atomically)
    BANK/versions/000003/
        state.json                domains (rank, pairs seen, lineage of every update), task order
        core/                     the consolidated long-term adapter (rank <= bank_rank)
        slots/<domain>/           the domain's adapter (same rank and target modules as the core)
        keys.safetensors          routing prototypes per domain (unit vectors)
        history.safetensors       consolidated update of every task, the span SLMC projects against
        fisher.safetensors        (only with ewc_lambda > 0) accumulated diagonal Fisher of the targeted matrices
        replay.jsonl              bounded replay buffer of past pairs
    BANK/runs/                    short-term adapters and run summaries of each align
    BANK/.lock                    held by the process writing the bank

A version is written into a temporary folder, fsynced and renamed into ``versions/``; the manifest's
``current`` pointer is then replaced atomically. A process killed at any instant leaves the previous
version whole. Files a new version shares with its parent are hard links, so versions cost little disk.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from ..data import DataError, Pair, load_pairs, write_pairs
from .consolidate import LowRank

FORMAT = 1
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
PEFT_PREFIX = "base_model.model."  # how PEFT names the wrapped model's modules


class BankError(RuntimeError):
    """A bank that cannot be used as asked: missing, corrupted, locked, or built on another base model."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- adapters as {module name: LowRank} ---------------------------------------------------------------

def read_adapter(folder: Path) -> tuple[dict[str, LowRank], dict]:
    """Read a PEFT LoRA folder as weight updates ``scale * B @ A`` per module, plus its config."""
    folder = Path(folder)
    cfg_path, weights = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    for path in (cfg_path, weights):
        if not path.is_file():
            raise BankError(f"{path}: missing; the bank entry is incomplete (try `lifealign-lite memory rollback`)")
    try:
        config = json.loads(cfg_path.read_text())
        tensors = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - any parse failure is a corrupted file
        raise BankError(f"{folder}: corrupted adapter ({type(exc).__name__}: {str(exc)[:80]}); try `lifealign-lite memory rollback`") from None
    r = config["r"]
    scale = config["lora_alpha"] / (r ** 0.5 if config.get("use_rslora") else r)
    out = {}
    for key, a in tensors.items():
        if key.endswith(_LORA_A):
            name = key[len(PEFT_PREFIX):-len(_LORA_A)] if key.startswith(PEFT_PREFIX) else key[:-len(_LORA_A)]
            b = tensors[key[: -len(_LORA_A)] + _LORA_B]
            out[name] = LowRank(b.float() * scale, a.float())
    return out, config


def write_adapter(folder: Path, update: dict[str, LowRank], rank: int, target_modules: list[str], base_name: str) -> Path:
    """Write updates as a PEFT LoRA folder with a uniform ``rank`` (zero-padded) and scaling 1."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, u in update.items():
        if u.rank > rank:
            raise ValueError(f"{name}: rank {u.rank} exceeds the bank rank {rank}; compress first")
        b = torch.zeros(u.shape[0], rank)
        a = torch.zeros(rank, u.shape[1])
        b[:, : u.rank], a[: u.rank] = u.B, u.A
        tensors[f"{PEFT_PREFIX}{name}{_LORA_B}"] = b.contiguous()
        tensors[f"{PEFT_PREFIX}{name}{_LORA_A}"] = a.contiguous()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": sorted(target_modules), "bias": "none", "base_model_name_or_path": base_name,
        "inference_mode": True, "fan_in_fan_out": False, "init_lora_weights": True, "use_rslora": False,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return folder


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _save_lowrank_list(path: Path, items: list[dict[str, LowRank]]) -> None:
    tensors = {}
    for i, upd in enumerate(items):
        for name, u in upd.items():
            tensors[f"{i}.{name}.B"], tensors[f"{i}.{name}.A"] = u.B.contiguous(), u.A.contiguous()
    save_file(tensors, str(path), metadata={"count": str(len(items))})


def _load_lowrank_list(path: Path) -> list[dict[str, LowRank]]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        count = int((f.metadata() or {}).get("count", 0))
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    items: list[dict[str, LowRank]] = [{} for _ in range(count)]
    for key in tensors:
        if key.endswith(".B"):
            i, name = key[:-2].split(".", 1)
            items[int(i)][name] = LowRank(tensors[key], tensors[key[:-2] + ".A"])
    return items


# -- one version of the bank -----------------------------------------------------------------------------

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
        return self._optional("keys.safetensors", load_file, {})

    def history(self) -> list[dict[str, LowRank]]:
        return self._optional("history.safetensors", _load_lowrank_list, [])

    def fisher(self) -> dict[str, torch.Tensor]:
        return self._optional("fisher.safetensors", load_file, {})

    def replay(self) -> list[Pair]:
        path = self.folder / "replay.jsonl" if self.folder else None
        if not path or not path.exists() or path.stat().st_size == 0:
            return []
        try:
            return load_pairs(path)
        except DataError as exc:
            raise BankError(f"{path}: corrupted replay buffer ({exc.problems[0]}); try `lifealign-lite memory rollback`") from None

    def _optional(self, name: str, loader, empty):
        """A file of this version read with ``loader``, or ``empty`` when the version has none."""
        path = self.folder / name if self.folder else None
        return self._load(path, loader) if path and path.exists() else empty

    @staticmethod
    def _load(path: Path, loader):
        try:
            return loader(path)
        except Exception as exc:  # noqa: BLE001
            raise BankError(f"{path}: corrupted ({type(exc).__name__}); try `lifealign-lite memory rollback`") from None


@dataclass
class PendingVersion:
    """A version being written: adapters and files go into ``folder`` until ``Bank.commit``."""

    state: BankState
    folder: Path
    keys: dict[str, torch.Tensor] | None = None
    history: list[dict[str, LowRank]] | None = None
    replay: list[Pair] | None = None
    fisher: dict[str, torch.Tensor] | None = None


class Bank:
    """A versioned adapter bank folder."""

    def __init__(self, root: Path):
        self.root = Path(root)

    # manifest ------------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.json"

    def exists(self) -> bool:
        return self.manifest_path.is_file()

    def manifest(self) -> dict:
        if not self.exists():
            return {"format": FORMAT, "current": 0, "base": None, "versions": []}
        try:
            return json.loads(self.manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BankError(f"{self.manifest_path}: corrupted manifest; versions are kept under {self.root / 'versions'}") from None

    def _write_manifest(self, manifest: dict) -> None:
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2))

    def check_base(self, base_info: dict) -> None:
        """Refuse a bank built on another base model."""
        base = self.manifest().get("base")
        if base and base.get("fingerprint") != base_info.get("fingerprint"):
            raise BankError(
                f"{self.root}: this bank was built on {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
                f"not {base_info.get('name')!r}; use --bank with another folder or --model {base.get('name')}"
            )

    # versions ------------------------------------------------------------------------------------------
    def version_dir(self, version: int) -> Path:
        return self.root / "versions" / f"{version:06d}"

    def load(self, version: int | None = None) -> BankState:
        """The state of ``version`` (default: the current one). Version 0 is the empty bank."""
        manifest = self.manifest()
        version = manifest["current"] if version is None else version
        if version == 0:
            return BankState()
        folder = self.version_dir(version)
        path = folder / "state.json"
        if not path.is_file():
            raise BankError(f"{path}: missing; version {version} is damaged, try `lifealign-lite memory rollback {max(version - 1, 0)}`")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BankError(f"{path}: corrupted; try `lifealign-lite memory rollback {max(version - 1, 0)}`") from None
        return BankState(version=version, folder=folder, domains=data["domains"], tasks=data["tasks"], meta=data["meta"], event=data.get("event", ""))

    def begin(self, parent: BankState, event: str) -> PendingVersion:
        """Start a new version from ``parent``: unchanged files are hard-linked into a temporary folder."""
        versions = self.root / "versions"
        versions.mkdir(parents=True, exist_ok=True)
        for stale in versions.glob(".tmp-*"):  # left by a writer that was killed (we hold the lock now)
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=versions))
        if parent.folder is not None:
            _link_tree(parent.folder, tmp)
        state = BankState(version=0, folder=tmp, domains=json.loads(json.dumps(parent.domains)), tasks=list(parent.tasks), meta=dict(parent.meta), event=event)
        return PendingVersion(state=state, folder=tmp)

    def commit(self, pending: PendingVersion, base_info: dict) -> BankState:
        """Finish a version: write its small files, fsync, rename into place, then move the manifest pointer."""
        folder = pending.folder
        if pending.keys is not None:
            _replace_file(folder / "keys.safetensors", lambda p: _save_tensors(p, pending.keys))
        if pending.history is not None:
            _replace_file(folder / "history.safetensors", lambda p: _save_lowrank_list(p, pending.history))
        if pending.fisher is not None:
            _replace_file(folder / "fisher.safetensors", lambda p: _save_tensors(p, pending.fisher))
        if pending.replay is not None:
            _replace_file(folder / "replay.jsonl", lambda p: write_pairs(p, pending.replay))
        state = pending.state
        data = {"format": FORMAT, "domains": state.domains, "tasks": state.tasks, "meta": state.meta, "event": state.event, "created": now()}
        _replace_file(folder / "state.json", lambda p: p.write_text(json.dumps(data, indent=2)))
        _fsync_tree(folder)
        manifest = self.manifest()
        existing = [int(p.name) for p in (self.root / "versions").iterdir() if p.name.isdigit()]
        version = max(existing + [0]) + 1
        final = self.version_dir(version)
        os.rename(folder, final)
        _fsync_dir(final.parent)
        manifest["base"] = manifest.get("base") or {k: base_info[k] for k in ("name", "fingerprint")}
        manifest["versions"].append({"version": version, "parent": manifest["current"], "event": state.event, "created": data["created"]})
        manifest["current"] = version
        self._write_manifest(manifest)
        return self.load(version)

    def abort(self, pending: PendingVersion) -> None:
        shutil.rmtree(pending.folder, ignore_errors=True)

    def rollback(self, version: int) -> BankState:
        manifest = self.manifest()
        known = [v["version"] for v in manifest["versions"]]
        if version != 0 and version not in known:
            raise BankError(f"no version {version} in {self.root}; versions: {', '.join(map(str, known)) or 'none'}")
        state = self.load(version)  # raises if that version is damaged
        # the log records the move: version becomes current again, coming from the version that was current
        manifest["versions"].append({"version": version, "parent": manifest["current"], "event": f"rollback from {manifest['current']} to {version}", "created": now()})
        manifest["current"] = version
        self._write_manifest(manifest)
        return state

    def remove_domain(self, name: str, base_info: dict) -> BankState:
        """A new version without the domain's slot, key and replay pairs (what it taught the core stays there)."""
        state = self.load()
        state.slot_dir(name)  # raises for an unknown domain
        pending = self.begin(state, event=f"rm {name}")
        try:
            shutil.rmtree(pending.folder / "slots" / name)
            del pending.state.domains[name]
            pending.keys = {k: v for k, v in state.keys().items() if k != name}
            pending.replay = [p for p in state.replay() if p.domain != name]
            return self.commit(pending, base_info)
        except BaseException:
            self.abort(pending)
            raise

    # locking -------------------------------------------------------------------------------------------
    @contextmanager
    def lock(self, wait_s: float = 0.0) -> Iterator[None]:
        """Exclusive write access. Another holder makes this wait up to ``wait_s`` seconds, then fail clearly."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / ".lock"
        with open(path, "a+") as fh:
            deadline = time.monotonic() + wait_s
            while True:
                try:
                    fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EAGAIN, errno.EACCES):
                        raise
                    if time.monotonic() >= deadline:
                        fh.seek(0)
                        holder = fh.read().strip() or "another process"
                        raise BankError(f"{self.root} is being written by {holder}; wait for it to finish (or pass --wait SECONDS)") from None
                    time.sleep(0.5)
            fh.seek(0)
            fh.truncate()
            fh.write(f"pid {os.getpid()}")
            fh.flush()
            try:
                yield
            finally:
                fh.seek(0)
                fh.truncate()
                fcntl.flock(fh, fcntl.LOCK_UN)


def folder_size(path: Path) -> int:
    """Bytes on disk of a folder, counting each hard-linked file once."""
    seen, total = set(), 0
    for p in Path(path).rglob("*"):
        if p.is_file():
            st = p.stat()
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


# -- file helpers ------------------------------------------------------------------------------------------

def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _replace_file(path: Path, write) -> None:
    """Write a fresh file (never through a hard link shared with an older version)."""
    if path.exists() or path.is_symlink():
        path.unlink()
    write(path)


def _link_tree(src: Path, dst: Path) -> None:
    for p in src.rglob("*"):
        target = dst / p.relative_to(src)
        if p.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(p, target)


def replace_adapter(folder: Path, update: dict[str, LowRank], rank: int, target_modules: list[str], base_name: str) -> Path:
    """(Re)write an adapter folder inside a pending version without touching the parent's hard-linked files."""
    if folder.exists():
        shutil.rmtree(folder)
    return write_adapter(folder, update, rank, target_modules, base_name)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for p in root.rglob("*"):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [root, *[p for p in root.rglob("*") if p.is_dir()]]:
        _fsync_dir(d)
