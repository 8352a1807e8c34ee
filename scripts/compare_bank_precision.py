"""Preference accuracy and margin of every slot on its dev split, for several banks of the same domains.

    python scripts/compare_bank_precision.py REFERENCE_BANK OTHER_BANK [OTHER_BANK ...] [--max-test 40] [--domains D ...] [--weights-only]

Each domain's dev pairs (the bench's held-out slice: ../shared/data/DOMAIN/dev.jsonl, the first --max-test of a
seeded shuffle) are scored once by the base model and then by the domain's slot of each bank. For each other bank
the difference to the reference bank comes with a paired 95% bootstrap interval over the pairs (the bench's
noise interval), and how far its slot is from the reference bank's as weight updates (B @ A per module, means over
the modules: the relative difference and the share of the reference's energy it holds); prints one JSON line per
domain as it finishes, then one JSON object. --domains scores only those domains (each takes minutes on a CPU);
--weights-only compares the slots' updates without scoring (seconds).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from lifealign_lite.chat import open_session
from lifealign_lite.data import load_pairs
from lifealign_lite.evaluate import evaluate
from lifealign_lite.memory.adapter import read_adapter
from lifealign_lite.memory.bank import Bank
from lifealign_lite.recipe import load_recipe

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def interval(diff: np.ndarray, resamples: int = 2000, seed: int = 0) -> list[float]:
    rng = np.random.default_rng(seed)
    means = diff[rng.integers(0, len(diff), (resamples, len(diff)))].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def slot_change(reference: Path, other: Path, domain: str) -> dict:
    """How far ``other``'s slot for ``domain`` is from ``reference``'s, module by module, as dense updates."""
    ref, new = (read_adapter(Bank(bank).load().slot_dir(domain))[0] for bank in (reference, other))
    pairs = [(ref[m].dense().double(), new[m].dense().double()) for m in ref]
    return {"update_rel_diff": float(np.mean([float((b - a).norm() / a.norm()) for a, b in pairs])),
            "energy_kept": float(np.mean([float(b.norm() ** 2 / a.norm() ** 2) for a, b in pairs]))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("banks", nargs="+")
    parser.add_argument("--max-test", type=int, default=40)
    parser.add_argument("--domains", nargs="+", help="only these domains (default: every domain of the reference bank)")
    parser.add_argument("--weights-only", action="store_true", help="compare the slots' updates only, without scoring")
    parser.add_argument("--home", default=str(Path.home() / ".lifealign-lite"))
    args = parser.parse_args()
    recipe = load_recipe(None)
    domains = sorted(Bank(Path(args.banks[0])).load().domains)
    unknown = sorted(set(args.domains or []) - set(domains))
    if unknown:
        parser.error(f"{', '.join(unknown)}: not a domain of {args.banks[0]} (it has {', '.join(domains)})")
    domains = [d for d in domains if not args.domains or d in args.domains]
    report = {}
    if args.weights_only:
        for domain in domains:
            report[domain] = {"banks": [{"bank": b} | slot_change(Path(args.banks[0]), Path(b), domain) for b in args.banks[1:]]}
        print(json.dumps(report, indent=1))
        return
    sessions = [open_session(Path(b), Path(args.home), recipe, domain=domains[0]) for b in args.banks]
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
                entry |= slot_change(Path(args.banks[0]), Path(bank), domain)
                for metric in ("pref_acc", "margin"):
                    diff = np.asarray(row["per_pair"][metric]) - np.asarray(ref[metric])
                    entry[f"{metric}_diff"] = float(diff.mean())
                    entry[f"{metric}_diff_95"] = interval(diff)
            report[domain]["banks"].append(entry)
        print(json.dumps({domain: report[domain]}), flush=True)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
