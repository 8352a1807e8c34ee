"""Rebuild a bank from another bank's short-term adapters with this checkout's consolidation and storage.

    python scripts/replay_consolidation.py OLD_BANK NEW_BANK [fp16|bf16|fp32]

Every align run recorded in OLD_BANK's current version (its lineage, in task order) is consolidated again into
NEW_BANK exactly as `align` would after training: the same short-term adapter (OLD_BANK/runs/RUN/adapter),
the same pairs (the run's data file and recipe), the domain's memory read from NEW_BANK. No training happens,
so two storage formats can be compared on identical updates (docs/PERFORMANCE.md, "Bank size").
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

from lifealign_lite.align import consolidate_task, make_embedder
from lifealign_lite.data import load_pairs
from lifealign_lite.memory import adapter as adapter_module
from lifealign_lite.memory.adapter import read_adapter
from lifealign_lite.memory.bank import Bank
from lifealign_lite.recipe import Recipe


DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def main(old_dir: str, new_dir: str, dtype: str = "fp16") -> None:
    adapter_module.STORAGE_DTYPE = DTYPES[dtype]  # the storage precision to measure (the bank's default: fp16)
    old, new = Bank(Path(old_dir)), Bank(Path(new_dir))
    if new.root.exists():
        sys.exit(f"{new.root}: exists; choose a new folder")
    state = old.load()
    runs = sorted((e | {"domain": d} for d, info in state.domains.items() for e in info.get("lineage", [])), key=lambda e: e["time"])
    base_info = old.manifest()["base"]
    embedder = None
    for entry in runs:
        run = old.root / "runs" / entry["run"]
        recipe = Recipe(**{k: v for k, v in json.loads((run / "run.json").read_text())["recipe"].items() if k in Recipe.__dataclass_fields__})
        embedder = embedder or make_embedder(recipe.router)
        pairs = load_pairs(entry["data"], max_pairs=recipe.max_pairs or None, seed=recipe.seed)
        current = new.load()
        memory_dir = current.slot_dir(entry["domain"]) if entry["domain"] in current.domains else current.core_dir()
        memory = read_adapter(memory_dir)[0] if memory_dir else {}
        with new.lock():
            shutil.copytree(run, new.root / "runs" / entry["run"])
            current, _ = consolidate_task(new, current, read_adapter(run / "adapter")[0], memory, entry["domain"], pairs, recipe,
                                          base_info, embedder, {k: v for k, v in entry.items() if k not in ("domain", "consolidation")})
        print(f"version {current.version}: {entry['domain']} ({entry['run']})")


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    main(*sys.argv[1:])
