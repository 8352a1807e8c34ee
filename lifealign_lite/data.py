"""Loading, validating and writing preference data.

Sources (read by :mod:`lifealign_lite.readers`): a JSON Lines file, or through Hugging Face ``datasets`` a dataset
folder (``save_to_disk``), a parquet file, a JSON array file, or a hub dataset id when online; every row is checked
the same way, problems reported as ``FILE:LINE: ...`` or ``SOURCE: row N: ...``.

Two input formats are accepted, the ones TRL's preference trainers use:

* plain text: ``{"prompt": str, "chosen": str, "rejected": str}``
* conversational: ``{"prompt": [{"role": ..., "content": ...}, ...],
  "chosen": [{"role": "assistant", "content": ...}], "rejected": [...]}``

Both may carry an optional ``"domain"`` string; any other extra field is ignored.
Without a ``"prompt"``, the shared beginning of ``chosen`` and ``rejected`` is the prompt (TRL's implicit-prompt
format, split by TRL's ``extract_prompt``); raw HH-RLHF transcripts (``"\n\nHuman: ... \n\nAssistant: ..."``)
are turned into messages first.
After loading, every :class:`Pair` is conversational: a plain prompt ``"x"``
becomes ``[{"role": "user", "content": "x"}]`` and a plain answer ``"y"``
becomes ``[{"role": "assistant", "content": "y"}]``.

:func:`load_pairs` checks every line before returning anything and reports all
problems at once in a :class:`DataError`, each as ``FILE:LINE: what is wrong;
what to do``.

Over 400 lines on purpose: every check with its one-line message, and writing, belong together (the checks are the
format's definition); reading the sources is :mod:`lifealign_lite.readers`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from .errors import DataError, InputError
from .files import atomic_write
from .readers import FORMAT_HINT as _FORMAT_HINT, is_blank as _is_blank, json_type as _json_type, read_objects

__all__ = [
    "DataError",
    "Pair",
    "load_pairs",
    "pairs_hash",
    "file_sha256",
    "write_pairs",
    "validate_domain_name",
]

FIELDS = ("prompt", "chosen", "rejected")
ROLES = ("system", "user", "assistant")
MAX_DOMAIN_LEN = 64

_DOMAIN_RE = re.compile(r"[A-Za-z0-9._-]+")


@dataclass(frozen=True)
class Pair:
    """One preference pair, always in conversational form."""

    prompt: list[dict[str, str]]
    chosen: list[dict[str, str]]
    rejected: list[dict[str, str]]
    domain: str | None = None
    source: str = ""  # "path:line"

    def to_json(self) -> dict[str, Any]:
        """Conversational JSON object (prompt/chosen/rejected, plus domain if set).

        ``source`` is not included; the result loads back with :func:`load_pairs`.
        """
        out: dict[str, Any] = {
            "prompt": [_msg_copy(m) for m in self.prompt],
            "chosen": [_msg_copy(m) for m in self.chosen],
            "rejected": [_msg_copy(m) for m in self.rejected],
        }
        if self.domain is not None:
            out["domain"] = self.domain
        return out


def _msg_copy(m: dict[str, str]) -> dict[str, str]:
    return {"role": m["role"], "content": m["content"]}


# ---------------------------------------------------------------------------
# domain names


RESERVED_NAMES = ("core", "base", "auto")  # memories chat, eval and export name beside the domains


def _domain_name_problem(name: Any) -> str | None:
    """Why ``name`` is not a valid domain name, or None if it is."""
    if not isinstance(name, str):
        return f"it is {_json_type(name)}, not a string"
    if name == "":
        return "it is empty"
    if len(name) > MAX_DOMAIN_LEN:
        return f"it is {len(name)} characters long (at most {MAX_DOMAIN_LEN})"
    if name == "..":
        return "'..' is not allowed"
    if name in RESERVED_NAMES:
        return f"'{name}' is reserved (core: the long-term memory, base: the base model, auto: routing)"
    if "/" in name or "\\" in name:
        return "it contains a path separator ('/' or '\\')"
    if name.startswith("."):
        return "it starts with '.'"
    if not _DOMAIN_RE.fullmatch(name):
        bad = sorted({c for c in name if not _DOMAIN_RE.fullmatch(c)})
        shown = ", ".join(repr(c) for c in bad[:5])
        return f"it contains characters outside [A-Za-z0-9._-] ({shown})"
    return None


_DOMAIN_ADVICE = (
    "use 1-64 characters from A-Z a-z 0-9 . _ - that do not start with '.' "
    "(e.g. 'medical', 'customer-support')"
)


def validate_domain_name(name: str) -> str:
    """Return ``name`` if it is a safe domain name, else raise ``ValueError``.

    A domain name is used as a directory/file name, so it must be 1-64
    characters from ``[A-Za-z0-9._-]``, must not start with ``'.'`` and must not
    contain ``'/'`` or ``'\\'``.
    """
    why = _domain_name_problem(name)
    if why is not None:
        raise InputError(f"invalid domain name {_short_repr(name)}: {why}; {_DOMAIN_ADVICE}")
    return name


# ---------------------------------------------------------------------------
# helpers


def _short_repr(v: Any, limit: int = 60) -> str:
    r = repr(v)
    if len(r) > limit:
        r = r[: limit - 3] + "..."
    return r


# ---------------------------------------------------------------------------
# per-line validation


def _check_message(msg: Any, where: str, problems: list[str]) -> dict[str, str] | None:
    """Validate one message object; returns a normalized copy or None."""
    if not isinstance(msg, dict):
        problems.append(
            f"{where} is {_json_type(msg)}, not a message object; "
            'write it as {"role": "user"|"assistant"|"system", "content": "..."}'
        )
        return None
    ok = True
    role = msg.get("role")
    if "role" not in msg:
        problems.append(f"{where} has no 'role'; add \"role\": \"user\", \"assistant\" or \"system\"")
        ok = False
    elif role not in ROLES:
        problems.append(
            f"{where} has role {_short_repr(role)}; role must be one of 'system', 'user', 'assistant'"
        )
        ok = False
    if "content" not in msg:
        problems.append(f"{where} has no 'content'; add the message text as \"content\": \"...\"")
        ok = False
    else:
        content = msg["content"]
        if not isinstance(content, str):
            problems.append(
                f"{where} 'content' is {_json_type(content)}; content must be a non-empty string"
            )
            ok = False
        elif _is_blank(content):
            problems.append(
                f"{where} 'content' is empty or whitespace-only; write the message text or drop this line"
            )
            ok = False
    if not ok:
        return None
    return {"role": role, "content": msg["content"]}


def _check_conversation(
    field: str, value: list, problems: list[str]
) -> list[dict[str, str]] | None:
    if len(value) == 0:
        problems.append(
            f"'{field}' is an empty list; it needs at least one "
            + ("message ending with a user turn" if field == "prompt" else "assistant message")
        )
        return None
    out: list[dict[str, str]] = []
    ok = True
    for i, msg in enumerate(value):
        m = _check_message(msg, f"'{field}'[{i}]", problems)
        if m is None:
            ok = False
            continue
        if field != "prompt" and m["role"] != "assistant":
            problems.append(
                f"'{field}'[{i}] has role '{m['role']}'; '{field}' must contain only assistant "
                "messages (the answer), put earlier turns in 'prompt'"
            )
            ok = False
            continue
        out.append(m)
    if not ok:
        return None
    if field == "prompt" and out[-1]["role"] != "user":
        problems.append(
            f"'prompt' ends with {'an' if out[-1]['role'] == 'assistant' else 'a'} '{out[-1]['role']}' turn; the prompt must end with a user turn "
            "(the answers in 'chosen'/'rejected' reply to it)"
        )
        return None
    return out


_HH_TURN = re.compile(r"(?:^|\n\n)(Human|Assistant):[ ]?")


def _hh_messages(text: str) -> list[dict[str, str]] | None:
    """An HH-RLHF transcript (``\n\nHuman: ...\n\nAssistant: ...``) as messages; None if it is not one."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        return None
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": said.strip()} for who, said in zip(parts[1::2], parts[2::2])]


def _with_extracted_prompt(obj: dict) -> dict:
    """A record without a prompt: the shared beginning of chosen and rejected becomes it (TRL's extract_prompt),
    after turning HH-RLHF transcripts into messages. Anything else is returned as it is ('prompt' stays missing)."""
    chosen, rejected = obj["chosen"], obj["rejected"]
    if isinstance(chosen, str) and isinstance(rejected, str):
        chosen, rejected = _hh_messages(chosen), _hh_messages(rejected)
    if not (isinstance(chosen, list) and isinstance(rejected, list) and chosen and rejected):
        return obj
    from trl.data_utils import extract_prompt

    return {**obj, **extract_prompt({"chosen": chosen, "rejected": rejected})}


def _parse_record(obj: dict, problems: list[str]) -> tuple | None:
    """Validate one decoded JSON object. Appends messages (without the FILE:LINE
    prefix) to ``problems``; returns (prompt, chosen, rejected, domain) or None."""
    n_before = len(problems)
    if "prompt" not in obj and "chosen" in obj and "rejected" in obj:
        obj = _with_extracted_prompt(obj)

    missing = [f for f in FIELDS if f not in obj]
    if missing:
        names = ", ".join(f"'{f}'" for f in missing)
        problems.append(
            f"missing field{'s' if len(missing) > 1 else ''} {names}; "
            "each line needs 'prompt', 'chosen' and 'rejected'"
        )

    # type of each present field: 'plain' (str), 'conv' (list) or None (bad)
    kinds: dict[str, str] = {}
    for f in FIELDS:
        if f not in obj:
            continue
        v = obj[f]
        if isinstance(v, str):
            if _is_blank(v):
                problems.append(
                    f"'{f}' is empty or whitespace-only; write the text or drop this line"
                )
            else:
                kinds[f] = "plain"
        elif isinstance(v, list):
            kinds[f] = "conv"
        else:
            problems.append(
                f"'{f}' is {_json_type(v)}; it must be a string (plain format) "
                "or a list of messages (conversational format)"
            )

    formats = set(kinds.values())
    if len(formats) > 1:
        def _names(kind: str) -> str:
            names = [f"'{f}'" for f in FIELDS if kinds.get(f) == kind]
            return " and ".join(names) + (" are" if len(names) > 1 else " is")

        problems.append(
            f"formats mixed in one line: {_names('plain')} plain text (string) but "
            f"{_names('conv')} conversational (list of messages); use strings for all of "
            "prompt/chosen/rejected or message lists for all of them"
        )
        kinds = {}  # don't check the lists further; the line is wrong anyway

    converted: dict[str, list[dict[str, str]]] = {}
    for f, kind in kinds.items():
        if kind == "plain":
            role = "user" if f == "prompt" else "assistant"
            converted[f] = [{"role": role, "content": obj[f]}]
        else:
            msgs = _check_conversation(f, obj[f], problems)
            if msgs is not None:
                converted[f] = msgs

    if "chosen" in converted and "rejected" in converted:
        a = [(m["role"], m["content"].strip()) for m in converted["chosen"]]
        b = [(m["role"], m["content"].strip()) for m in converted["rejected"]]
        if a == b:
            problems.append(
                "'chosen' and 'rejected' are identical; a preference pair needs two different "
                "answers, fix or drop this line"
            )

    domain = None
    if "domain" in obj and obj["domain"] is not None:
        d = obj["domain"]
        why = _domain_name_problem(d)
        if why is not None:
            problems.append(f"'domain' {_short_repr(d)} is invalid: {why}; {_DOMAIN_ADVICE}")
        else:
            domain = d

    if len(problems) > n_before:
        return None
    return converted["prompt"], converted["chosen"], converted["rejected"], domain


# ---------------------------------------------------------------------------
# loading


def load_pairs(path: str | os.PathLike, max_pairs: int | None = None, seed: int = 0) -> list[Pair]:
    """Load and validate preference pairs: a JSONL file, or (through ``datasets``) a dataset folder, a parquet or
    JSON array file, or a hub dataset id when online.

    Every line (row) is validated before anything is returned; all problems are
    collected and raised together as a :class:`DataError`. Blank lines are
    skipped. If ``max_pairs`` is given and smaller than the number of pairs, a
    deterministic subset is taken: ``random.Random(seed)`` shuffles the pairs and
    the first ``max_pairs`` are kept (returned in file order).
    """
    if max_pairs is not None:
        if isinstance(max_pairs, bool) or not isinstance(max_pairs, int):
            raise TypeError(f"max_pairs must be an int or None, got {type(max_pairs).__name__}")
        if max_pairs < 1:
            raise InputError(f"max_pairs must be >= 1 (or None for all pairs), got {max_pairs}")

    name = os.fspath(path)
    p = Path(name)
    problems: list[str] = []
    records: list[tuple] = []
    for where, obj in read_objects(p, name, problems):
        line_problems: list[str] = []
        parsed = _parse_record(obj, line_problems)
        if parsed is None:
            problems.extend(f"{where}: {msg}" for msg in line_problems)
            continue
        records.append((where, parsed))

    if problems:
        raise DataError(problems)
    if not records:
        raise DataError([f"{name}: no preference pairs found; the file is empty or has only blank "
                         "lines, add one JSON object per line with 'prompt', 'chosen' and 'rejected'"])

    pairs = [Pair(prompt=pr, chosen=ch, rejected=rj, domain=dom, source=where) for where, (pr, ch, rj, dom) in records]
    if max_pairs is not None and max_pairs < len(pairs):
        order = list(range(len(pairs)))
        random.Random(seed).shuffle(order)
        keep = sorted(order[:max_pairs])
        pairs = [pairs[i] for i in keep]
    return pairs


# ---------------------------------------------------------------------------
# hashing and writing


def _canonical_json(pairs: Iterable[Pair]) -> bytes:
    items = []
    for p in pairs:
        if not isinstance(p, Pair):
            raise TypeError(f"expected Pair objects, got {type(p).__name__}")
        items.append(p.to_json())
    return json.dumps(items, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def pairs_hash(pairs: Iterable[Pair]) -> str:
    """SHA-256 hex digest of a canonical JSON of the pairs (order-sensitive).

    Covers prompt/chosen/rejected/domain, not ``source``, so the same data read
    from another path hashes the same.
    """
    return hashlib.sha256(_canonical_json(pairs)).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_pairs(path: str | os.PathLike, pairs: Iterable[Pair]) -> None:
    """Write pairs as conversational JSONL, atomically.

    The data goes to a temporary file in the same directory, which is fsynced
    and then moved over ``path`` with ``os.replace``; readers see either the
    old file or the complete new one. Missing parent directories are created.
    """
    target = Path(os.fspath(path))
    lines = []
    for p in pairs:
        if not isinstance(p, Pair):
            raise TypeError(f"expected Pair objects, got {type(p).__name__}")
        lines.append(json.dumps(p.to_json(), ensure_ascii=False) + "\n")
    atomic_write(target, "".join(lines))