"""The replay buffer's policy: which earlier pairs are mixed into a new task's training, and which of a task's pairs
the bank keeps for later tasks (bounded per domain; the buffer itself is stored in the bank)."""

from __future__ import annotations

import math
import random

from ..data import Pair


def replay_sample(buffer: list[Pair], domain: str, n: int, seed: int) -> list[Pair]:
    """``n`` pairs of earlier domains from the replay buffer (seeded)."""
    others = [p for p in buffer if p.domain != domain]
    return random.Random(seed).sample(others, min(n, len(others)))


REPLAY_MAX_CHARS = 8192  # per message of a stored pair: far beyond what training reads (max_length tokens), a bound on disk


def _clip(messages: list[dict], keep_end: bool) -> list[dict]:
    """Messages cut to REPLAY_MAX_CHARS each, as training truncates: a prompt keeps its end, an answer its start."""
    cut = (lambda t: t[-REPLAY_MAX_CHARS:]) if keep_end else (lambda t: t[:REPLAY_MAX_CHARS])
    return [m if len(m["content"]) <= REPLAY_MAX_CHARS else {**m, "content": cut(m["content"])} for m in messages]


def update_replay(buffer: list[Pair], pairs: list[Pair], domain: str, ratio: float, size: int, seed: int) -> list[Pair]:
    """Add ``ratio`` of the task's pairs (tagged with its domain, each message clipped to REPLAY_MAX_CHARS characters)
    and trim the largest domains to ``size`` pairs."""
    take = random.Random(seed).sample(pairs, math.ceil(ratio * len(pairs))) if ratio > 0 else []
    pool: dict[str, list[Pair]] = {}
    for p in buffer + [Pair(_clip(p.prompt, True), _clip(p.chosen, False), _clip(p.rejected, False), domain, p.source) for p in take]:
        pool.setdefault(p.domain or "general", []).append(p)
    while sum(map(len, pool.values())) > size:
        max(pool.values(), key=len).pop(0)
    return [p for group in pool.values() for p in group]
