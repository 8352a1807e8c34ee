"""The adapter bank on disk: long-term core, one slot per domain, domain keys, replay buffer, history.

Layout (every adapter is a PEFT folder that ``PeftModel.from_pretrained`` loads as it is)::

    BANK/manifest.json            base model, current version, version log (replaced atomically)
    BANK/versions/000003/
        state.json                domains (rank, pairs seen, lineage of every update), task order
        core/                     the consolidated long-term adapter (the rank SLMC left it, <= bank_rank; 16-bit)
        slots/<domain>/           the domain's adapter (its own rank <= bank_rank, the core's target modules; 16-bit)
        keys/<domain>.safetensors routing keys: embeddings of up to 300 stored prompts of the domain (unit vectors;
                                  one file per domain, so a version shares every domain's it did not change;
                                  older banks: all domains in one keys.safetensors)
        key_texts.json            the routed text of those prompts, in the same order
        router.safetensors        the router refit from all keys at this version (classifier, novelty thresholds)
        history/<NNNN>.safetensors  denoised update of task NNNN (16-bit): the span SLMC projects against
                                  (older banks: the consolidated updates, same span, all in one history.safetensors)
        fisher.safetensors        (only with ewc_lambda > 0) accumulated diagonal Fisher of the targeted matrices
        replay.jsonl              bounded replay buffer of past pairs
        checksums.json            SHA-256 and size of every other file of the version (written last)
    BANK/runs/                    short-term adapters and run summaries of each align
    BANK/.lock                    held by the process writing the bank

A version is written into a temporary folder, fsynced and renamed into ``versions/``; the manifest's
``current`` pointer is then replaced atomically. A process killed at any instant leaves the previous
version whole. Files a new version shares with its parent are hard links, so versions cost little disk: a
file rewritten with the same bytes is linked back to the parent's copy before the commit, so a version costs only
what changed; ``Bank.gc`` removes versions beyond the newest N, which frees every file no kept version links.

Adapters are stored at the rank SLMC leaves each module (PEFT's ``rank_pattern``; every rank bounded by
``bank_rank``; PEFT loads adapters of different ranks side by side) with 16-bit factors (``STORAGE_DTYPE``,
chosen by measurement: docs/PERFORMANCE.md); they are read back as float32 and SLMC computes in float64.
Banks written before (rank padded to ``bank_rank``, float32, one history file) load as they are.

Every file of a version is recorded in its ``checksums.json`` (whatever the file is: new kinds of files are
covered as they appear); a file shared with the parent keeps the parent's record, so damage to the shared
file shows in both versions. :meth:`Bank.load` verifies the whole version once when it opens it (not per
read), so chat, eval, export and align stop before they use a damaged file, with one line naming the file,
the version and the newest intact version to roll back to. Versions written before checksums existed are
opened after a structural check (every JSON and safetensors file parses) and reported as unverified.
Only safetensors weights belong in a bank: a pickle-based file (``.bin``, ``.pt``, ...) is refused by name.

Over 400 lines on purpose: the layout, the commit protocol, verification and the readers of every file of a
version change together (a new file kind is written, checksummed, shared and read here), and splitting them
would spread the crash-safety argument over several modules.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..errors import LifeAlignError
from ..files import atomic_write as _atomic_write, fsync_dir as _fsync_dir, fsync_tree as _fsync_tree
from ..data import DataError, Pair, file_sha256, load_pairs, write_pairs
from ..model import PEFT_PREFIX
from .consolidate import LowRank
from .router import Router, fit_router

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

FORMAT = 1
CHECKSUMS = "checksums.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # weights that can run code when loaded
_LORA_A, _LORA_B = ".lora_A.weight", ".lora_B.weight"
# fp16 over bf16: its 10-bit mantissa keeps the factors 8 times more precisely, and balanced LoRA factors lie far
# inside fp16's range (measured on the four-domain bank: docs/PERFORMANCE.md)
# (torch.float16: the module attribute is made on first use, so that reading a bank imports no torch; see __getattr__)
HISTORY_DIR = "history"
KEYS_DIR = "keys"


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


class BankError(LifeAlignError, RuntimeError):
    """A bank that cannot be used as asked: missing, corrupted, locked, or built on another base model."""


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# -- adapters as {module name: LowRank} ---------------------------------------------------------------

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
        raise BankError(f"{cfg_path}: corrupted adapter config ({_why(exc)}); try `lifealign-lite memory verify`") from None
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
        raise BankError(f"{weights}: corrupted adapter weights ({_why(exc)}); try `lifealign-lite memory verify`") from None
    return out, config


def _why(exc: Exception) -> str:
    """An exception as a short phrase for a one-line error."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:80]}" if text else type(exc).__name__


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


def adapter_rank(folder: Path) -> int | None:
    """The rank ``r`` an adapter folder's config records (None when it cannot be read)."""
    try:
        return int(json.loads((Path(folder) / "adapter_config.json").read_text())["r"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _save_lowrank(path: Path, update: dict[str, LowRank]) -> None:
    tensors = {}
    for name, u in update.items():
        tensors[f"{name}.B"], tensors[f"{name}.A"] = u.B.to(_storage_dtype()).contiguous(), u.A.to(_storage_dtype()).contiguous()
    save_file(tensors, str(path))


def _load_lowrank(path: Path) -> dict[str, LowRank]:
    tensors = load_file(str(path))
    return {key[:-2]: LowRank(tensors[key].float(), tensors[key[:-2] + ".A"].float()) for key in tensors if key.endswith(".B")}


def _load_lowrank_list(path: Path) -> list[dict[str, LowRank]]:
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
            return [self._load(p, _load_lowrank) for p in sorted(folder.glob("*.safetensors"))]
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
            raise BankError(f"{path}: corrupted ({_why(exc)}); list the damage with `lifealign-lite memory verify`") from None


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


@dataclass
class VersionCheck:
    """What verifying one version found: ``problems`` is a list of (file relative to the version, what is wrong)."""

    version: int
    folder: Path
    files: int = 0
    verified: bool = True  # False: the version has no checksums (written before they existed); checked for structure only
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def file_checksum(path: Path) -> dict:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def _version_files(folder: Path) -> list[str]:
    rels = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    return sorted(rel for rel in rels if rel != CHECKSUMS)


def _structure_problem(path: Path) -> str | None:
    """Why a file of a version without checksums cannot be what its name says, or None."""
    try:
        if path.suffix == ".json":
            json.loads(path.read_text(encoding="utf-8"))
        elif path.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                fh.keys()
        elif path.suffix == ".jsonl":
            load_pairs(path)
    except DataError as exc:
        return f"not a valid replay buffer ({exc.problems[0][len(str(path)) + 1:].strip()[:80]})"
    except Exception as exc:  # noqa: BLE001 - whatever fails to parse is damaged
        return f"does not parse ({_why(exc)})"
    return None


def _state_problem(data) -> str | None:
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


class Bank:
    """A versioned adapter bank folder."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._verified: set[int] = set()  # versions this object has verified (each is checked once)

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
            manifest = json.loads(self.manifest_path.read_text(encoding="utf-8"))
            why = _manifest_problem(manifest)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            why = _why(exc)
        if why:
            raise BankError(f"{self.manifest_path}: corrupted manifest ({why}); the versions are kept under {self.root / 'versions'}: "
                            "restore manifest.json from a backup or align into a new --bank") from None
        return manifest

    def _write_manifest(self, manifest: dict) -> None:
        _atomic_write(self.manifest_path, json.dumps(manifest, indent=2))

    def check_base(self, base_identity: dict) -> None:
        """Refuse a bank built on another base model (``base_identity``: name and fingerprint, ``ModelInfo.identity()``)."""
        base = self.manifest().get("base")
        if base and base.get("fingerprint") != base_identity.get("fingerprint"):
            raise BankError(
                f"{self.root}: this bank was built on {base.get('name')!r} (fingerprint {base.get('fingerprint')}), "
                f"not {base_identity.get('name')!r}; use --bank with another folder or --model {base.get('name')}"
            )

    # versions ------------------------------------------------------------------------------------------
    def version_dir(self, version: int) -> Path:
        return self.root / "versions" / f"{version:06d}"

    def load(self, version: int | None = None) -> BankState:
        """The state of ``version`` (default: the current one). Version 0 is the empty bank.

        The version's files are verified (:meth:`verify`) the first time this object opens it; damage raises one
        ``BankError`` line naming the file, the version and the newest intact version to roll back to.
        """
        manifest = self.manifest()
        version = manifest["current"] if version is None else version
        if version == 0:
            return BankState()
        folder = self.version_dir(version)
        if not folder.is_dir():
            raise BankError(f"{folder}: missing; the bank's version {version} is not on disk; {self.way_out(version)}")
        if version not in self._verified:
            check = self.verify(version)
            if check.problems:
                rel, what = check.problems[0]
                more = f" (and {len(check.problems) - 1} more damaged files)" if len(check.problems) > 1 else ""
                raise BankError(f"{folder / rel}: {what}; bank version {version} is damaged{more}; {self.way_out(version)}")
            self._verified.add(version)
        data = self._read_state(folder)
        if isinstance(data, str):
            raise BankError(f"{folder / 'state.json'}: {data}; bank version {version} is damaged; {self.way_out(version)}")
        return BankState(version=version, folder=folder, domains=data["domains"], tasks=data["tasks"], meta=data["meta"], event=data.get("event", ""))

    @staticmethod
    def _read_state(folder: Path) -> dict | str:
        """A version's parsed state.json, or why it cannot be used."""
        path = folder / "state.json"
        if not path.is_file():
            return "missing"
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            return f"corrupted ({_why(exc)})"
        why = _state_problem(data)
        return f"corrupted ({why})" if why else data

    def verify(self, version: int) -> VersionCheck:
        """Check every file of a version against its recorded SHA-256 and size (structure only where none is recorded)."""
        folder = self.version_dir(version)
        check = VersionCheck(version=version, folder=folder)
        if not folder.is_dir():
            check.problems.append(("", "version folder missing"))
            return check
        files = _version_files(folder)
        check.files = len(files)
        recorded = None
        if (folder / CHECKSUMS).exists():
            try:
                recorded = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))["files"]
                if not isinstance(recorded, dict):
                    raise ValueError("'files' is not a mapping")
            except Exception as exc:  # noqa: BLE001
                check.problems.append((CHECKSUMS, f"corrupted ({_why(exc)})"))
                return check
        check.verified = recorded is not None
        for rel in files:
            path = folder / rel
            if path.suffix in PICKLE_SUFFIXES:
                check.problems.append((rel, "not safetensors; a bank holds weights as safetensors only (pickle files can run code): remove it"))
            elif not path.is_file():
                check.problems.append((rel, "not a regular file"))
            elif recorded is None:
                if why := _structure_problem(path):
                    check.problems.append((rel, why))
            elif rel not in recorded:
                check.problems.append((rel, f"not recorded in {CHECKSUMS} (added after the version was written)"))
            else:
                want, got = recorded[rel], file_checksum(path)
                if got["size"] != want.get("size"):
                    check.problems.append((rel, f"{got['size']} bytes, {want.get('size')} recorded (truncated or overwritten)"))
                elif got["sha256"] != want.get("sha256"):
                    check.problems.append((rel, "content differs from its recorded SHA-256"))
        for rel in sorted(set(recorded or {}) - set(files)):
            check.problems.append((rel, "missing"))
        if check.intact:
            data = self._read_state(folder)
            if isinstance(data, str):
                check.problems.append(("state.json", data))
            else:
                for name in data["domains"]:
                    for part in ("adapter_config.json", "adapter_model.safetensors"):
                        if not (folder / "slots" / name / part).is_file():
                            check.problems.append((f"slots/{name}/{part}", "missing"))
        return check

    def way_out(self, damaged: int) -> str:
        """What to do about a damaged or missing version: roll back to the newest intact one, or list the damage."""
        manifest = self.manifest()
        listed = sorted({v["version"] for v in manifest["versions"]} - {damaged} - set(manifest.get("removed", [])), reverse=True)
        intact = next((v for v in listed if v < damaged and self.verify(v).intact), None)
        intact = intact or next((v for v in listed if self.verify(v).intact), None)
        if intact is None:
            return "no intact version is left: `lifealign-lite memory rollback 0` empties the bank (versions stay on disk); `lifealign-lite memory verify --all` lists the damage"
        return f"roll back to the newest intact version with `lifealign-lite memory rollback {intact}`, or list the damage with `lifealign-lite memory verify --all`"

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
        return PendingVersion(state=state, folder=tmp, parent=parent.folder)

    def commit(self, pending: PendingVersion, base_identity: dict) -> BankState:
        """Finish a version: write its small files, fsync, rename into place, then move the manifest pointer.
        ``base_identity`` (name and fingerprint) is recorded in a new bank's manifest."""
        folder = pending.folder
        if pending.keys is not None:
            _write_keys(folder, pending.keys)
        if pending.key_texts is not None:
            _replace_file(folder / "key_texts.json", lambda p: p.write_text(json.dumps(pending.key_texts), encoding="utf-8"))
        if pending.router is not None:
            tensors, metadata = pending.router.tensors()
            _replace_file(folder / "router.safetensors", lambda p: save_file(tensors, str(p), metadata=metadata))
        if pending.history is not None:
            _write_history(folder, pending.history)
        if pending.fisher is not None:
            _replace_file(folder / "fisher.safetensors", lambda p: _save_tensors(p, pending.fisher))
        if pending.replay is not None:
            _replace_file(folder / "replay.jsonl", lambda p: write_pairs(p, pending.replay))
        _share_unchanged(folder, pending.parent)
        state = pending.state
        data = {"format": FORMAT, "domains": state.domains, "tasks": state.tasks, "meta": state.meta, "event": state.event, "created": now()}
        _replace_file(folder / "state.json", lambda p: p.write_text(json.dumps(data, indent=2)))
        sums = {"format": FORMAT, "algorithm": "sha256", "files": _checksums(folder, pending.parent)}
        _replace_file(folder / CHECKSUMS, lambda p: p.write_text(json.dumps(sums, indent=1)))
        _fsync_tree(folder)
        manifest = self.manifest()
        existing = [int(p.name) for p in (self.root / "versions").iterdir() if p.name.isdigit()]
        version = max(existing + [0]) + 1
        final = self.version_dir(version)
        os.rename(folder, final)
        _fsync_dir(final.parent)
        manifest["base"] = manifest.get("base") or {k: base_identity[k] for k in ("name", "fingerprint")}
        manifest["versions"].append({"version": version, "parent": manifest["current"], "event": state.event, "created": data["created"]})
        manifest["current"] = version
        self._write_manifest(manifest)
        self._verified.add(version)  # just written and recorded
        return self.load(version)

    def abort(self, pending: PendingVersion) -> None:
        shutil.rmtree(pending.folder, ignore_errors=True)

    def rollback(self, version: int) -> BankState:
        self.require()
        manifest = self.manifest()
        known = [v["version"] for v in manifest["versions"]]
        if version in manifest.get("removed", []):
            kept = sorted(set(known) - set(manifest["removed"]))
            raise BankError(f"version {version} was removed by `lifealign-lite memory gc`; kept versions: {', '.join(map(str, kept)) or 'none'}")
        if version != 0 and version not in known:
            raise BankError(f"no version {version} in {self.root}; versions: {', '.join(map(str, known)) or 'none'}")
        state = self.load(version)  # raises if that version is damaged
        # the log records the move: version becomes current again, coming from the version that was current
        manifest["versions"].append({"version": version, "parent": manifest["current"], "event": f"rollback from {manifest['current']} to {version}", "created": now()})
        manifest["current"] = version
        self._write_manifest(manifest)
        return state

    def gc(self, keep: int) -> tuple[list[int], int]:
        """Remove every version but the ``keep`` newest and the current one; returns the removed versions and bytes freed.

        Files are hard links, so removing a version frees exactly the files no kept version shares. The manifest
        records the removal first: a process killed halfway leaves folders that the next ``gc`` removes, never a
        version that rollback offers but cannot open.
        """
        if keep < 1:
            raise BankError(f"--keep must be at least 1 (the current version is always kept), got {keep}")
        self.require()
        manifest = self.manifest()
        versions = self.root / "versions"
        on_disk = sorted(int(p.name) for p in versions.iterdir() if p.name.isdigit()) if versions.is_dir() else []
        kept = set(on_disk[-keep:]) | {manifest["current"]}
        drop = [v for v in on_disk if v not in kept]
        if not drop:
            return [], 0
        before = folder_size(versions)
        manifest["removed"] = sorted(set(manifest.get("removed", [])) | set(drop))
        self._write_manifest(manifest)
        for v in drop:
            shutil.rmtree(self.version_dir(v))
            self._verified.discard(v)
        _fsync_dir(versions)
        return drop, before - folder_size(versions)

    def remove_domain(self, name: str, base_identity: dict) -> BankState:
        """A new version without the domain's slot, key and replay pairs (what it taught the core stays there)."""
        self.require()
        state = self.load()
        state.slot_dir(name)  # raises for an unknown domain
        pending = self.begin(state, event=f"rm {name}")
        try:
            shutil.rmtree(pending.folder / "slots" / name)
            del pending.state.domains[name]
            pending.keys = {k: v for k, v in state.keys().items() if k != name}
            pending.key_texts = {k: v for k, v in state.key_texts().items() if k != name}
            pending.router = fit_router(pending.keys, pending.key_texts, state.meta.get("route_quantile", 0.05))
            pending.replay = [p for p in state.replay() if p.domain != name]
            return self.commit(pending, base_identity)
        except BaseException:
            self.abort(pending)
            raise

    def require(self) -> None:
        """Refuse to act on a folder that holds no bank (before anything, the lock included, creates it)."""
        if not self.exists():
            raise BankError(f"{self.root}: no bank here (no manifest.json); check --bank, or align a domain first")

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

def _manifest_problem(manifest) -> str | None:
    if not isinstance(manifest, dict):
        return "not a JSON object"
    current, versions = manifest.get("current"), manifest.get("versions")
    if isinstance(current, bool) or not isinstance(current, int) or current < 0:
        return f"'current' is {json.dumps(current)[:40]}, not a version number"
    if not isinstance(versions, list) or not all(isinstance(v, dict) and isinstance(v.get("version"), int) for v in versions):
        return "'versions' is not a list of versions"
    removed = manifest.get("removed", [])
    if not isinstance(removed, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in removed):
        return "'removed' is not a list of version numbers"
    base = manifest.get("base")
    if base is not None and not (isinstance(base, dict) and "fingerprint" in base):
        return "'base' lacks a fingerprint"
    return None


def _checksums(folder: Path, parent: Path | None) -> dict[str, dict]:
    """SHA-256 and size of every file of a version; a file still hard-linked to the parent's keeps the parent's record."""
    try:  # the parent was verified when it was opened; an unreadable record only means hashing everything
        inherited = json.loads((parent / CHECKSUMS).read_text(encoding="utf-8"))["files"] if parent is not None else {}
    except (OSError, ValueError, KeyError, TypeError):
        inherited = {}
    out = {}
    for rel in _version_files(folder):
        path, old = folder / rel, parent / rel if parent is not None else None
        if rel in inherited and old is not None and old.exists() and os.path.samefile(path, old):
            out[rel] = inherited[rel]
        else:
            out[rel] = file_checksum(path)
    return out


def _write_history(folder: Path, history: list[dict[str, LowRank]]) -> None:
    """One file per task (``history/0000.safetensors``, ...), so a new version shares every earlier task's file."""
    if (folder / "history.safetensors").exists():  # a bank written before 16-bit storage: convert on its next version
        (folder / "history.safetensors").unlink()
    if (folder / HISTORY_DIR).exists():
        shutil.rmtree(folder / HISTORY_DIR)  # hard links only: the parent's files stay
    (folder / HISTORY_DIR).mkdir()
    for i, update in enumerate(history):
        _save_lowrank(folder / HISTORY_DIR / f"{i:04d}.safetensors", update)


def _write_keys(folder: Path, keys: dict[str, torch.Tensor]) -> None:
    """One file per domain (``keys/<domain>.safetensors``), so a new version shares every domain's it did not change."""
    if (folder / "keys.safetensors").exists():  # a bank written before: convert on its next version
        (folder / "keys.safetensors").unlink()
    if (folder / KEYS_DIR).exists():
        shutil.rmtree(folder / KEYS_DIR)  # hard links only: the parent's files stay
    (folder / KEYS_DIR).mkdir()
    for domain, key in keys.items():
        _save_tensors(folder / KEYS_DIR / f"{domain}.safetensors", {"key": key})


def _share_unchanged(folder: Path, parent: Path | None) -> None:
    """Link back to the parent's copy every file rewritten with the same bytes, so a version costs only what changed."""
    if parent is None:
        return
    for rel in _version_files(folder):
        path, old = folder / rel, parent / rel
        if not old.is_file() or os.path.samefile(path, old) or path.stat().st_size != old.stat().st_size:
            continue
        if file_sha256(path) == file_sha256(old):
            path.unlink()
            os.link(old, path)


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
