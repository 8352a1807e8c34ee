"""Held-out test files for `bench continual --tests DIR` that are not the dev splits.

    python scripts/make_test_split.py DIR [--preset signal] [--pairs 100] [--seed 1]

For every task of the preset, writes ``DIR/NAME/test.jsonl``: ``--pairs`` pairs drawn (seeded) from the task's
TRAIN file, leaving out every pair the preset trains on (its seeded ``max_pairs`` sample, the same sample
``bench continual`` takes) and every pair whose prompt one of those has (safe-rlhf holds several pairs per
prompt). The dev split is not touched, so the dev-split scores stay a second, independent test.
DIR must lie outside the repository: the data is never copied into it.
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

from lifealign_lite.bench.continual import PRESETS, parse_task
from lifealign_lite.data import Pair, load_pairs, write_pairs
from lifealign_lite.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _key(p: Pair) -> str:
    return repr(p.prompt)


def held_out(train: Path, trained: int, n: int, seed: int, train_seed: int = 0) -> list[Pair]:
    """``n`` pairs of ``train`` (seeded draw, file order) that share no prompt with its ``trained``-pair sample."""
    every = load_pairs(train)
    used = load_pairs(train, max_pairs=trained, seed=train_seed) if trained else []
    seen = {_key(p) for p in used}
    rest = [p for p in every if _key(p) not in seen]
    if len(rest) < n:
        raise SystemExit(f"error: {train}: only {len(rest)} pairs left outside the {trained} trained ones, "
                         f"{n} asked; lower --pairs")
    order = list(range(len(rest)))
    random.Random(seed).shuffle(order)
    return [rest[i] for i in sorted(order[:n])]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("dir", type=Path, help="Output folder (outside the repository): DIR/NAME/test.jsonl per task.")
    ap.add_argument("--preset", default="signal", choices=sorted(PRESETS), help="The bench preset whose tasks and training sample to use.")
    ap.add_argument("--pairs", type=int, default=100, help="Test pairs per task.")
    ap.add_argument("--seed", type=int, default=1, help="Seed of the draw.")
    args = ap.parse_args(argv)
    out = args.dir.resolve()
    if out == REPO or REPO in out.parents:
        print(f"error: {args.dir}: inside the repository; write test files outside it (the data is not copied into the repo)", file=sys.stderr)
        return 2
    spec = PRESETS[args.preset]
    train_seed = load_recipe(None, spec.get("overrides", {})).seed
    for t in (parse_task(s) for s in spec["tasks"]):
        pairs = held_out(t.train, spec.get("max_pairs", 0), args.pairs, args.seed, train_seed)
        write_pairs(out / t.name / "test.jsonl", pairs)
        print(f"{out / t.name / 'test.jsonl'}: {len(pairs)} pairs held out of {t.train}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
