"""``bench routing``: how well domain keys route prompts, per embedder, and where to put the core threshold.

Keys are built exactly as ``align`` builds them (prototypes of the training prompts' embeddings). For each
embedder it reports routing accuracy on every task's test prompts, and, leaving each domain out of the keys
in turn, the share of that unseen domain's prompts that fall back to the core at a given threshold; the
threshold is calibrated as the one maximizing (in-domain accuracy + unseen fallback) / 2.
"""

from __future__ import annotations

import time


from ..data import load_pairs
from ..memory.router import CORE, prompt_text, prototypes, route


def _embed_tasks(tasks, embedder, max_train: int, max_test: int) -> tuple[dict, dict]:
    train, test = {}, {}
    for t in tasks:
        train[t.name] = embedder([prompt_text(p) for p in load_pairs(t.train, max_pairs=max_train or None)])
        test[t.name] = embedder([prompt_text(p) for p in load_pairs(t.test, max_pairs=max_test or None)])
    return train, test


def routing_report(tasks, embedders: dict, max_train: int = 300, max_test: int = 0, thresholds=None) -> dict:
    """Accuracy and unseen-domain fallback per embedder and threshold."""
    thresholds = thresholds or [round(0.05 * i, 2) for i in range(0, 17)]
    report = {}
    for name, embedder in embedders.items():
        t0 = time.perf_counter()
        train, test = _embed_tasks(tasks, embedder, max_train, max_test)
        embed_s = time.perf_counter() - t0
        keys = {d: prototypes(e) for d, e in train.items()}
        best_scores = {d: [route(v, keys, -1.0).scores for v in e] for d, e in test.items()}
        rows = []
        for th in thresholds:
            acc = {d: sum(route(v, keys, th).domain == d for v in e) / len(e) for d, e in test.items()}
            fallback = {}
            for left in keys:
                rest = {d: k for d, k in keys.items() if d != left}
                fallback[left] = sum(route(v, rest, th).domain == CORE for v in test[left]) / len(test[left])
            mean_acc, mean_fb = sum(acc.values()) / len(acc), sum(fallback.values()) / len(fallback)
            rows.append({"threshold": th, "accuracy": acc, "mean_accuracy": mean_acc, "unseen_fallback": fallback,
                         "mean_unseen_fallback": mean_fb, "balanced": (mean_acc + mean_fb) / 2})
        best = max(rows, key=lambda r: r["balanced"])
        report[name] = {"embed_seconds": round(embed_s, 1), "accuracy_no_threshold": rows[0]["accuracy"] if thresholds[0] <= 0 else None,
                        "calibrated": best, "by_threshold": rows,
                        "confusion": {d: _confusion(s) for d, s in best_scores.items()}}
    return report


def _confusion(scores: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in scores:
        top = next(iter(s))
        counts[top] = counts.get(top, 0) + 1
    return counts
