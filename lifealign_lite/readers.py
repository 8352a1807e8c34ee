"""Where preference rows come from: a JSON Lines file read line by line with the standard library, or through
Hugging Face ``datasets`` a dataset folder (``save_to_disk``), a parquet file, a JSON array file, or a hub dataset id
when online. A CSV or TSV file is refused in one line that says how to convert it.

:func:`read_objects` yields ``(where, object)`` for every row, ``where`` being ``FILE:LINE`` or ``SOURCE: row N``;
problems that are not one row's content (bad JSON, bad UTF-8) go to the caller's list. What a row must hold is
checked by :mod:`lifealign_lite.data`.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Iterator

from .errors import DataError
from .system import hub_offline_reason

FORMAT_HINT = (
    'each line must be one JSON object like {"prompt": "...", "chosen": "...", '
    '"rejected": "..."} (plain) or with lists of {"role", "content"} messages '
    "(conversational)"
)


def json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "a list"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def is_blank(s: str) -> bool:
    return s.strip() == ""


def read_objects(p: Path, name: str, problems: list[str]) -> Iterable[tuple[str, dict]]:
    """(where, record) of every pair in the source; problems that are not one record's go to ``problems``."""
    if p.is_dir() and any((p / f).is_file() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
        return _dataset_rows(name, lambda: _load_from_disk(p))
    if p.is_file() and (p.suffix == ".parquet" or (p.suffix == ".json" and _starts_with_array(p))):
        return _dataset_rows(name, lambda: _load_file(p))
    if not p.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", name) and not name.endswith((".jsonl", ".json", ".parquet")):
        return _dataset_rows(name, lambda: _load_hub(name))
    return _jsonl_objects(p, name, problems)


def _starts_with_array(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"[")


def _load_from_disk(p: Path):
    from datasets import load_from_disk

    return load_from_disk(str(p))


def _load_file(p: Path):
    from datasets import load_dataset

    return load_dataset("parquet" if p.suffix == ".parquet" else "json", data_files=str(p), split="train")


def _load_hub(name: str):
    from datasets import load_dataset


    why = hub_offline_reason()
    if why:
        raise DataError([f"{name}: no such file, and as a hub dataset id it needs the hub, which cannot be reached ({why}); "
                         "give a local .jsonl/.parquet/.json file or a dataset folder"])
    return load_dataset(name, split="train")


def _dataset_rows(name: str, load) -> list[tuple[str, dict]]:
    """The rows of a Hugging Face dataset (one split: ``train``, else the only one), numbered from 1."""
    try:
        ds = load()
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - any loader failure is the source's problem, said in one line
        raise DataError([f"{name}: cannot read it as a dataset ({type(exc).__name__}: {str(exc).splitlines()[0][:200]})"]) from None
    if hasattr(ds, "keys"):  # a DatasetDict
        splits = list(ds.keys())
        if "train" not in splits and len(splits) != 1:
            raise DataError([f"{name}: a dataset with splits {', '.join(splits)} and no 'train'; save the split to use on its own"])
        ds = ds["train" if "train" in splits else splits[0]]
    return [(f"{name}: row {i}", dict(row)) for i, row in enumerate(ds, start=1)]


def _jsonl_objects(p: Path, name: str, problems: list[str]) -> Iterator[tuple[str, dict]]:
    """The JSON objects of a JSON Lines file, with ``FILE:LINE``; bad lines go to ``problems`` (in line order,
    between the records' own problems, since this is read lazily)."""
    if not p.exists():
        raise DataError([f"{name}: no such file; check the path (relative paths are resolved "
                         f"from {os.getcwd()})"])
    if p.is_dir():
        raise DataError([f"{name}: is a directory, not a file; give the path of a .jsonl file "
                         "with one preference pair per line, or a Hugging Face dataset folder (save_to_disk)"])
    if not p.is_file():  # a FIFO, socket or device would block or never end
        raise DataError([f"{name}: not a regular file (a pipe, socket or device); save the pairs to a .jsonl file "
                         "and pass its path"])
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError([f"{name}: cannot read the file ({e.strerror or e}); check its permissions"]) from e

    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    table = _delimited_kind(p, lines)
    if table:
        raise DataError([f"{name}: looks like {table} (a header line and separated columns), not JSON Lines; convert it, "
                         f"for example: {_convert_hint(name, table)}"])
    for lineno, bline in enumerate(lines, start=1):
        if bline.endswith(b"\r"):
            bline = bline[:-1]
        if lineno == 1 and bline.startswith(b"\xef\xbb\xbf"):
            bline = bline[3:]  # UTF-8 byte order mark
        where = f"{name}:{lineno}"
        try:
            text = bline.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(
                f"{where}: not valid UTF-8 (byte 0x{bline[e.start]:02x} at byte {e.start + 1} of "
                "the line); re-save the file as UTF-8"
            )
            continue
        if is_blank(text):
            continue
        try:
            obj = json.loads(text)
            if "\\u" in text:  # an escape may spell a lone surrogate, which no encoder (nor tokenizer) accepts
                json.dumps(obj, ensure_ascii=False).encode("utf-8")
        except json.JSONDecodeError as e:
            if "\r" in text:
                problems.append(f"{where}: invalid JSON, and the line holds carriage returns (CR-only line endings, as old Mac "
                                "files have?); save the file with LF (or CRLF) line endings, one JSON object per line")
            else:
                problems.append(f"{where}: invalid JSON ({e.msg} at column {e.colno}); {FORMAT_HINT}")
            continue
        except RecursionError:
            problems.append(f"{where}: invalid JSON (nested too deeply); {FORMAT_HINT}")
            continue
        except UnicodeEncodeError as e:
            problems.append(f"{where}: a \\u escape encodes a lone UTF-16 surrogate ({e.object[e.start]!a}), which is not text; "
                            "write the character itself or its full surrogate pair")
            continue
        except ValueError as e:  # e.g. an integer over Python's 4300-digit conversion limit
            problems.append(f"{where}: invalid JSON ({str(e).split(';')[0][:90]}); {FORMAT_HINT}")
            continue
        if not isinstance(obj, dict):
            problems.append(f"{where}: line is {json_type(obj)}, not a JSON object; {FORMAT_HINT}")
            continue
        yield where, obj




def _delimited_kind(p: Path, lines: list[bytes]) -> str | None:
    """``"CSV"`` or ``"TSV"`` when the file is a table rather than JSON Lines: named .csv/.tsv, or a first line that
    is not JSON but a header naming the pair's fields between commas or tabs."""
    first = next((b.strip() for b in lines if b.strip()), b"").lstrip(b"\xef\xbb\xbf")
    if not first or first[:1] in (b"{", b"["):
        return None
    head = first.decode("utf-8", "replace").lower()
    for sep, kind in (("\t", "TSV"), (",", "CSV")):
        named = p.suffix.lower() == f".{kind.lower()}"
        if named or (sep in head and {"chosen", "rejected"} <= {c.strip().strip('"') for c in head.split(sep)}):
            return kind
    return None


def _convert_hint(name: str, kind: str) -> str:
    out = str(Path(name).with_suffix(".jsonl"))
    sep = ", delimiter='\\t'" if kind == "TSV" else ""
    return (f"python -c \"from datasets import load_dataset; load_dataset('csv', data_files={name!r}{sep})['train']"
            f".to_json({out!r})\" (columns prompt, chosen, rejected)")
