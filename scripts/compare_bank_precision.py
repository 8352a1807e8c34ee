"""Preference accuracy and margin of every slot on its dev split, for several banks of the same domains.

    python scripts/compare_bank_precision.py REFERENCE_BANK OTHER_BANK [OTHER_BANK ...] [--max-test 40]

Each domain's dev pairs (the bench's held-out slice: ../shared/data/DOMAIN/dev.jsonl, the first --max-test of a
seeded shuffle) are scored once by the base model and then by the domain's slot of each bank. For each other bank
the difference to the reference bank comes with a paired 95% bootstrap interval over the pairs (the bench's
noise interval); prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lifealign_lite.chat import open_session
from lifealign_lite.data import load_pairs
from lifealign_lite.evaluate import evaluate
from lifealign_lite.memory.bank import Bank
from lifealign_lite.recipe import load_recipe

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def interval(diff: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("banks", nargs="+")
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument("--home", default=str(Path.home() / ".lifealign-lite"))
    args = parser.parse_args()
    recipe = load_recipe(None)
    domains = sorted(Bank(Path(args.banks[0])).load().domains)
    sessions = [open_session(Path(b), Path(args.home), recipe, domain=domains[0]) for b in args.banks]
    report = {}
    for domain in domains:
        pairs = load_pairs(DATA / domain / "dev.jsonl", max_pairs=args.max_test, seed=0)
        base_scores, rows = None, []
        for session in sessions:
            ev = evaluate(session, pairs, recipe, domain, base_scores=base_scores)
            base_scores = ev.base_scores
            rows.append(ev.summary | {"per_pair": ev.per_pair})
        ref = rows[0]["per_pair"]
        report[domain] = {"pairs": len(pairs), "banks": []}
        for bank, row in zip(args.banks, rows):
            entry = {"bank": bank, "pref_acc": row["pref_acc"], "margin": row["margin"]}
            if row is not rows[0]:
                for metric in ("pref_acc", "margin"):
                    diff = np.asarray(row["per_pair"][metric]) - np.asarray(ref[metric])
                    entry[f"{metric}_diff"] = float(diff.mean())
                    entry[f"{metric}_diff_95"] = interval(diff)
            report[domain]["banks"].append(entry)
        print(json.dumps({domain: report[domain]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
