"""Integrity of a bank version: the SHA-256 and size of every file (``checksums.json``, written last), verifying a
version against them, and the one-time adoption of versions written before checksums existed.

Every file of a version is recorded (whatever the file is: new kinds of files are covered as they appear); a file
shared with the parent keeps the parent's record, so damage to the shared file shows in both versions. A version
without ``checksums.json`` is damaged, not "unverified": nothing vouches for its files, and whatever was hashed
from it would be recorded as good in the next version. Banks written before checksums existed are adopted once, on
request (``memory verify --adopt``: every file must parse as what its name says). Only safetensors weights belong
in a bank: a pickle-based file (``.bin``, ``.pt``, ...) is refused by name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..data import DataError, file_sha256, load_pairs
from ..files import atomic_write
from .adapter import why
from .state import read_state

CHECKSUMS = "checksums.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")  # weights that can run code when loaded
ADOPT_HINT = ("if the bank was written before checksums existed, `lifealign-lite memory verify --adopt` records them once; "
              "otherwise its files cannot be vouched for")


@dataclass
class VersionCheck:
    """What verifying one version found: ``problems`` is a list of (file relative to the version, what is wrong)."""

    version: int
    folder: Path
    files: int = 0
    adopted: bool = False  # checksums were recorded now (``memory verify --adopt``)
    problems: list[tuple[str, str]] = field(default_factory=list)

    @property
    def intact(self) -> bool:
        return not self.problems


def file_checksum(path: Path) -> dict:
    return {"sha256": file_sha256(path), "size": path.stat().st_size}


def version_files(folder: Path) -> list[str]:
    rels = (p.relative_to(folder).as_posix() for p in folder.rglob("*") if not p.is_dir())
    return sorted(rel for rel in rels if rel != CHECKSUMS)


def record_checksums(folder: Path, parent: Path | None) -> dict:
    """``checksums.json``'s content for a version: SHA-256 and size of every file; a file still hard-linked to the
    parent's keeps the parent's record."""
    try:  # the parent was verified when it was opened; an unreadable record only means hashing everything
        inherited = json.loads((parent / CHECKSUMS).read_text(encoding="utf-8"))["files"] if parent is not None else {}
    except (OSError, ValueError, KeyError, TypeError):
        inherited = {}
    out = {}
    for rel in version_files(folder):
        path, old = folder / rel, parent / rel if parent is not None else None
        if rel in inherited and old is not None and old.exists() and os.path.samefile(path, old):
            out[rel] = inherited[rel]
        else:
            out[rel] = file_checksum(path)
    return {"format": 1, "algorithm": "sha256", "files": out}


def verify_version(folder: Path, version: int) -> VersionCheck:
    """Check every file of a version against its recorded SHA-256 and size; a missing record is damage."""
    check = VersionCheck(version=version, folder=folder)
    if not folder.is_dir():
        check.problems.append(("", "version folder missing"))
        return check
    files = version_files(folder)
    check.files = len(files)
    if not (folder / CHECKSUMS).exists():
        check.problems.append((CHECKSUMS, f"missing ({ADOPT_HINT})"))
        return check
    try:
        recorded = json.loads((folder / CHECKSUMS).read_text(encoding="utf-8"))["files"]
        if not isinstance(recorded, dict):
            raise ValueError("'files' is not a mapping")
    except Exception as exc:  # noqa: BLE001
        check.problems.append((CHECKSUMS, f"corrupted ({why(exc)})"))
        return check
    for rel in files:
        path = folder / rel
        if bad := _not_a_bank_file(path):
            check.problems.append((rel, bad))
        elif rel not in recorded:
            check.problems.append((rel, f"not recorded in {CHECKSUMS} (added after the version was written)"))
        else:
            want, got = recorded[rel], file_checksum(path)
            if got["size"] != want.get("size"):
                check.problems.append((rel, f"{got['size']} bytes, {want.get('size')} recorded (truncated or overwritten)"))
            elif got["sha256"] != want.get("sha256"):
                check.problems.append((rel, "content differs from its recorded SHA-256"))
    for rel in sorted(set(recorded) - set(files)):
        check.problems.append((rel, "missing"))
    if check.intact:
        _check_state(folder, check)
    return check


def adopt_version(folder: Path, version: int) -> VersionCheck:
    """Record checksums for a version written before they existed, once every file parses as what its name says
    (a version that has them is only verified). ``adopted`` says whether this call wrote them."""
    if (folder / CHECKSUMS).exists() or not folder.is_dir():
        return verify_version(folder, version)
    for stale in folder.glob(f".{CHECKSUMS}.*.tmp"):  # an adoption killed before its rename
        stale.unlink()
    check = VersionCheck(version=version, folder=folder)
    files = version_files(folder)
    check.files = len(files)
    for rel in files:
        if bad := _not_a_bank_file(folder / rel) or _structure_problem(folder / rel):
            check.problems.append((rel, bad))
    if check.intact:
        _check_state(folder, check)
    if check.intact:
        atomic_write(folder / CHECKSUMS, json.dumps(record_checksums(folder, None), indent=1))
        check.adopted = True
    return check


def _not_a_bank_file(path: Path) -> str | None:
    if path.suffix in PICKLE_SUFFIXES:
        return "not safetensors; a bank holds weights as safetensors only (pickle files can run code): remove it"
    if not path.is_file():
        return "not a regular file"
    return None


def _check_state(folder: Path, check: VersionCheck) -> None:
    """state.json parses as a version's state and every domain it lists has its slot's files."""
    data = read_state(folder)
    if isinstance(data, str):
        check.problems.append(("state.json", data))
        return
    for name in data["domains"]:
        for part in ("adapter_config.json", "adapter_model.safetensors"):
            if not (folder / "slots" / name / part).is_file():
                check.problems.append((f"slots/{name}/{part}", "missing"))


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
        return f"does not parse ({why(exc)})"
    return None
