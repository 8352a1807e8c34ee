"""The adapter bank on disk: the lock, the version transaction (begin, commit or abort), the manifest, rollback, gc
and repair; and why a crash at any instant loses nothing.

Layout (every adapter is a PEFT folder that ``PeftModel.from_pretrained`` loads as it is)::

    BANK/manifest.json            base model, current version, version log (replaced atomically)
    BANK/versions/000003/
        state.json                domains (rank, pairs seen, lineage of every update), task order, base model
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

The other files of memory/ own the rest: ``adapter.py`` the adapter file format, ``state.py`` the readers of a
version, ``integrity.py`` its checksums and verification.

Crash safety, in one place. A version is written into a temporary folder (``versions/.tmp-*``) under the lock,
fsynced and renamed into ``versions/``; the manifest's ``current`` pointer is then replaced atomically
(``files.atomic_write``). A process killed before the rename leaves a temporary folder the next writer removes; one
killed between the rename and the manifest leaves a complete version that no manifest lists (the previous one
stays current); a new bank's manifest is written before its first version is renamed, so versions never exist
without one unless a user deletes it. Files a new version shares with its parent are hard links, never written
through (``_replace_file``): a file rewritten with the same bytes is linked back to the parent's copy before the
commit, so a version costs only what changed, and the parent's bytes never change. ``gc`` records a removal in
the manifest before it deletes folders, so rollback never offers a half-removed version.

Nothing is started over silently: a missing or unreadable manifest with versions on disk stops every command,
``align`` included, with one line naming ``memory repair``, which rebuilds the manifest from the versions that
verify (the old manifest is kept aside). :meth:`Bank.load` verifies the whole version once when it opens it (not
per read), so chat, eval, export and align stop before they use a damaged file, with one line naming the file, the
version and the newest intact version to roll back to.
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
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..data import file_sha256, write_pairs
from ..files import atomic_write as _atomic_write, fsync_dir as _fsync_dir, fsync_tree as _fsync_tree
from .adapter import BankError, save_file, save_lowrank, save_tensors, why
from .consolidate import LowRank
from .integrity import CHECKSUMS, VersionCheck, adopt_version, record_checksums, verify_version, version_files
from .router import fit_router
from .state import HISTORY_DIR, KEYS_DIR, BankState, PendingVersion, read_state

if TYPE_CHECKING:  # annotations only: torch is imported where tensors are made
    import torch

FORMAT = 1
REPAIR = "`lifealign-lite memory repair --bank {root}` rebuilds it from the versions on disk that verify"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


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
        """A bank is here: a manifest, or versions on disk (whose manifest is then missing: :meth:`manifest` says so)."""
        return self.manifest_path.is_file() or bool(self.versions_on_disk())

    def versions_on_disk(self) -> list[int]:
        versions = self.root / "versions"
        return sorted(int(p.name) for p in versions.iterdir() if p.name.isdigit() and p.is_dir()) if versions.is_dir() else []

    def manifest_problem(self) -> str | None:
        """Why the manifest cannot be used (one line that names the way out), or None (a bank with no version yet
        has no manifest, and that is no problem)."""
        if not self.manifest_path.is_file():
            on_disk = self.versions_on_disk()
            if not on_disk:
                return None
            return (f"{self.manifest_path}: missing, but version(s) {_span(on_disk)} are on disk; nothing was changed; "
                    f"{REPAIR.format(root=self.root)}")
        try:
            why_not = _manifest_problem(json.loads(self.manifest_path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, RecursionError, ValueError) as exc:
            why_not = why(exc)
        if why_not:
            return f"{self.manifest_path}: corrupted manifest ({why_not}); nothing was changed; {REPAIR.format(root=self.root)}"
        return None

    def manifest(self) -> dict:
        if problem := self.manifest_problem():
            raise BankError(problem)
        if not self.manifest_path.is_file():
            return {"format": FORMAT, "current": 0, "base": None, "versions": []}
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

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
        data = read_state(folder)
        if isinstance(data, str):
            raise BankError(f"{folder / 'state.json'}: {data}; bank version {version} is damaged; {self.way_out(version)}")
        return BankState(version=version, folder=folder, domains=data["domains"], tasks=data["tasks"], meta=data["meta"], event=data.get("event", ""))

    def verify(self, version: int) -> VersionCheck:
        """Check every file of a version against its recorded SHA-256 and size (:func:`integrity.verify_version`)."""
        return verify_version(self.version_dir(version), version)

    def adopt(self) -> list[VersionCheck]:
        """``memory verify --adopt``: record checksums for every version on disk written before they existed (each
        file must parse as what its name says); versions that have them are only verified. Under the lock."""
        checks = [adopt_version(self.version_dir(v), v) for v in self.versions_on_disk()]
        self._verified.clear()
        return checks

    def way_out(self, damaged: int) -> str:
        """What to do about a damaged or missing version: roll back to the newest intact one, or list the damage."""
        manifest = self.manifest()
        listed = sorted({v["version"] for v in manifest["versions"]} - {damaged} - set(manifest.get("removed", [])), reverse=True)
        intact = next((v for v in listed if v < damaged and self.verify(v).intact), None)
        intact = intact or next((v for v in listed if self.verify(v).intact), None)
        if intact is None:
            return "no intact version is left: `lifealign-lite memory rollback 0` empties the bank (versions stay on disk); `lifealign-lite memory verify --all` lists the damage"
        return f"roll back to the newest intact version with `lifealign-lite memory rollback {intact}`, or list the damage with `lifealign-lite memory verify --all`"

    # the transaction: begin, then commit or abort --------------------------------------------------------
    @contextmanager
    def transaction(self, parent: BankState, event: str, base_identity: dict) -> Iterator[PendingVersion]:
        """A new version from ``parent``, committed when the block ends normally (the new state is then
        ``pending.committed``) and aborted, leaving ``parent`` current and the disk as it was, when it raises.
        The caller holds the lock."""
        pending = self.begin(parent, event)
        try:
            yield pending
            pending.committed = self.commit(pending, base_identity)
        except BaseException:
            self.abort(pending)
            raise

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
        ``base_identity`` (name and fingerprint) is recorded in a new bank's manifest and in the version's state."""
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
            _replace_file(folder / "fisher.safetensors", lambda p: save_tensors(p, pending.fisher))
        if pending.replay is not None:
            _replace_file(folder / "replay.jsonl", lambda p: write_pairs(p, pending.replay))
        _share_unchanged(folder, pending.parent)
        state, manifest = pending.state, self.manifest()
        base = manifest.get("base") or {k: base_identity[k] for k in ("name", "fingerprint")}
        data = {"format": FORMAT, "domains": state.domains, "tasks": state.tasks, "meta": state.meta, "event": state.event, "created": now(),
                "base": base}  # what `memory repair` restores the manifest's base from
        _replace_file(folder / "state.json", lambda p: p.write_text(json.dumps(data, indent=2)))
        _replace_file(folder / CHECKSUMS, lambda p: p.write_text(json.dumps(record_checksums(folder, pending.parent), indent=1)))
        _fsync_tree(folder)
        manifest["base"] = base
        if not self.manifest_path.is_file():  # a new bank: its manifest exists before its first version does
            self._write_manifest(manifest)
        version = max(self.versions_on_disk() + [0]) + 1
        final = self.version_dir(version)
        os.rename(folder, final)
        _fsync_dir(final.parent)
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
        on_disk = self.versions_on_disk()
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

    def repair(self) -> dict:
        """``memory repair``: rebuild a missing or unreadable manifest from the versions on disk that verify (under the
        lock). The newest intact version becomes current; a damaged manifest is kept aside, never deleted. Returns
        what was done: ``versions`` listed, ``damaged`` left out, ``current``, ``kept_aside`` (or ``repaired`` False
        when the manifest was fine)."""
        if not self.manifest_problem():
            return {"repaired": False, "current": self.manifest()["current"] if self.manifest_path.is_file() else 0}
        checks = [self.verify(v) for v in self.versions_on_disk()]
        intact = [c.version for c in checks if c.intact]
        if not intact:
            raise BankError(f"{self.root}: no version on disk verifies, so there is nothing to rebuild the manifest from; nothing was changed; "
                            "`lifealign-lite memory verify --all` lists the damage (`memory verify --adopt` records checksums for a bank written before them)")
        states = {v: read_state(self.version_dir(v)) for v in intact}
        base = next((states[v]["base"] for v in reversed(intact) if isinstance(states[v].get("base"), dict)), None) or self._base_from_runs(states[intact[-1]])
        kept_aside = None
        if self.manifest_path.exists():
            kept_aside = self.manifest_path.with_name(f"manifest.json.damaged-{datetime.now(timezone.utc):%Y%m%dT%H%M%S}")
            os.replace(self.manifest_path, kept_aside)
        log = [{"version": v, "parent": p, "event": states[v].get("event", ""), "created": states[v].get("created", "")}
               for p, v in zip([0] + intact, intact)]
        log.append({"version": intact[-1], "parent": intact[-1], "event": f"repair: manifest rebuilt from version(s) {_span(intact)} on disk", "created": now()})
        self._write_manifest({"format": FORMAT, "current": intact[-1], "base": base, "versions": log})
        self._verified = set(intact)
        return {"repaired": True, "versions": intact, "damaged": [c.version for c in checks if not c.intact], "current": intact[-1],
                "base": base, "kept_aside": str(kept_aside) if kept_aside else None}

    def _base_from_runs(self, state: dict) -> dict | None:
        """The base model of a version written before state.json recorded it: from the summary of a run it consolidated."""
        for info in state["domains"].values():
            for entry in reversed(info.get("lineage", [])):
                try:
                    model = json.loads((self.root / "runs" / str(entry.get("run")) / "summary.json").read_text(encoding="utf-8"))["model"]
                    return {"name": model["name"], "fingerprint": model["fingerprint"]}
                except (OSError, ValueError, KeyError, TypeError):
                    continue
        return None

    def remove_domain(self, name: str, base_identity: dict) -> BankState:
        """A new version without the domain's slot, key and replay pairs (what it taught the core stays there)."""
        self.require()
        state = self.load()
        state.slot_dir(name)  # raises for an unknown domain
        with self.transaction(state, f"rm {name}", base_identity) as pending:
            shutil.rmtree(pending.folder / "slots" / name)
            del pending.state.domains[name]
            pending.keys = {k: v for k, v in state.keys().items() if k != name}
            pending.key_texts = {k: v for k, v in state.key_texts().items() if k != name}
            pending.router = fit_router(pending.keys, pending.key_texts, state.meta.get("route_quantile", 0.05))
            pending.replay = [p for p in state.replay() if p.domain != name]
        return pending.committed

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


def _span(versions: list[int]) -> str:
    """Version numbers for a message: ``1-4`` when they follow each other, else listed."""
    if len(versions) > 2 and versions == list(range(versions[0], versions[-1] + 1)):
        return f"{versions[0]}-{versions[-1]}"
    return ", ".join(map(str, versions))


def _write_history(folder: Path, history: list[dict[str, LowRank]]) -> None:
    """One file per task (``history/0000.safetensors``, ...), so a new version shares every earlier task's file."""
    if (folder / "history.safetensors").exists():  # a bank written before 16-bit storage: convert on its next version
        (folder / "history.safetensors").unlink()
    if (folder / HISTORY_DIR).exists():
        shutil.rmtree(folder / HISTORY_DIR)  # hard links only: the parent's files stay
    (folder / HISTORY_DIR).mkdir()
    for i, update in enumerate(history):
        save_lowrank(folder / HISTORY_DIR / f"{i:04d}.safetensors", update)


def _write_keys(folder: Path, keys: dict[str, torch.Tensor]) -> None:
    """One file per domain (``keys/<domain>.safetensors``), so a new version shares every domain's it did not change."""
    if (folder / "keys.safetensors").exists():  # a bank written before: convert on its next version
        (folder / "keys.safetensors").unlink()
    if (folder / KEYS_DIR).exists():
        shutil.rmtree(folder / KEYS_DIR)  # hard links only: the parent's files stay
    (folder / KEYS_DIR).mkdir()
    for domain, key in keys.items():
        save_tensors(folder / KEYS_DIR / f"{domain}.safetensors", {"key": key})


def _share_unchanged(folder: Path, parent: Path | None) -> None:
    """Link back to the parent's copy every file rewritten with the same bytes, so a version costs only what changed."""
    if parent is None:
        return
    for rel in version_files(folder):
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
