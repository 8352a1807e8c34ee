"""``bench routing``: how well each router sends held-out prompts to their domain, and unseen domains to the core.

Keys are built exactly as ``align`` builds them (``add_prompts`` over the training prompts, ``fit_router``).
For every router it reports, on every task's test prompts: the accuracy per domain with the calibrated novelty
thresholds on (a prompt sent to the core counts as wrong) and without them, the confusion matrix, and, leaving
each domain out of the keys in turn, the share of that unseen domain's prompts that go to the core. Every
proportion carries a 95 % Wilson interval; the means a normal-approximation one. ``shipped`` is the router and
setting ``align`` uses by default.
"""

from __future__ import annotations

import math
import time

import torch

from ..data import load_pairs
from ..memory.router import CORE, Route, Router, _neighbour_similarity, add_prompts, fit_router, novelty_thresholds, prompt_text

SHIPPED = "logreg+ngrams"
ROUTERS = ("knn", "logreg", SHIPPED)
QUANTILES = (0.0, 0.02, 0.05, 0.1, 0.2)


def wilson(k: int, n: int, z: float = 1.96) -> list[float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def mean_interval(props: dict[str, float], counts: dict[str, int], z: float = 1.96) -> list[float]:
    """Normal-approximation 95 % interval of the unweighted mean of independent proportions."""
    m = sum(props.values()) / len(props)
    var = sum(p * (1 - p) / max(counts[d], 1) for d, p in props.items()) / len(props) ** 2
    return [round(max(0.0, m - z * math.sqrt(var)), 4), round(min(1.0, m + z * math.sqrt(var)), 4)]


class KnnRouter(Router):
    """Baseline: the domain whose nearest stored prompts are most similar (no classifier)."""

    def route(self, embedding, text, threshold=None, gate: float = 0.0) -> Route:  # no classifier: no gate
        sims = {d: float(_neighbour_similarity(embedding[None], self.keys[d])[0]) for d in self.domains}
        ranked = dict(sorted(sims.items(), key=lambda kv: -kv[1]))
        best = next(iter(ranked))
        limit = self.thresholds[best] if threshold is None else threshold
        return Route(best if ranked[best] >= limit else CORE, ranked, ranked[best], limit)


def build_router(kind: str, keys: dict, texts: dict, quantile: float) -> Router:
    if kind == SHIPPED:
        return fit_router(keys, texts, quantile)
    if kind == "logreg":  # the same classifier on the embedding alone (no text features)
        return fit_router(keys, {}, quantile)
    return KnnRouter(sorted(keys), torch.zeros(0), torch.zeros(0), torch.zeros(0), novelty_thresholds(keys, quantile),
                     {d: k.float() for d, k in keys.items()}, quantile)


def _embed_tasks(tasks, embedder, max_train: int, max_test: int) -> tuple[dict, dict]:
    train, test = {}, {}
    for t in tasks:
        texts = [prompt_text(p) for p in load_pairs(t.train, max_pairs=max_train or None)]
        train[t.name] = add_prompts(None, None, embedder(texts), texts)
        test_texts = [prompt_text(p) for p in load_pairs(t.test, max_pairs=max_test or None)]
        test[t.name] = (embedder(test_texts), test_texts)
    return train, test


def _routes(router: Router, test: tuple) -> list[Route]:
    emb, texts = test
    return [router.route(e, t) for e, t in zip(emb, texts)]


def _unchecked(r: Route) -> str:
    """The domain a route picks before the novelty check (its best-scored domain)."""
    return next(iter(r.scores), CORE)


def evaluate_router(kind: str, train: dict, test: dict, quantile: float, lodo: bool = True) -> dict:
    """Accuracy (calibrated and without novelty), confusion and leave-one-domain-out fallback of one router."""
    keys, texts = {d: e for d, (e, _) in train.items()}, {d: t for d, (_, t) in train.items()}
    t0 = time.perf_counter()
    router = build_router(kind, keys, texts, quantile)
    fit_s = time.perf_counter() - t0
    counts = {d: len(v[1]) for d, v in test.items()}
    acc, acc_iv, raw, confusion = {}, {}, {}, {}
    t0 = time.perf_counter()
    for d, v in test.items():
        routes = _routes(router, v)
        got = [r.domain for r in routes]
        k = sum(g == d for g in got)
        acc[d], acc_iv[d] = round(k / len(got), 4), wilson(k, len(got))
        confusion[d] = {name: got.count(name) for name in [*sorted(test), CORE] if got.count(name)}
        raw[d] = round(sum(_unchecked(r) == d for r in routes) / len(got), 4)
    per_prompt_ms = (time.perf_counter() - t0) * 1000 / sum(counts.values())
    out = {"router": kind, "route_quantile": quantile, "accuracy": acc, "accuracy_interval": acc_iv,
           "mean_accuracy": round(sum(acc.values()) / len(acc), 4), "mean_accuracy_interval": mean_interval(acc, counts),
           "accuracy_without_novelty": raw, "mean_accuracy_without_novelty": round(sum(raw.values()) / len(raw), 4),
           "confusion": confusion, "thresholds": {d: round(v, 4) for d, v in router.thresholds.items()},
           "fit_seconds": round(fit_s, 2), "route_ms_per_prompt_after_embedding": round(per_prompt_ms, 3)}
    if lodo and len(train) > 1:
        fallback, fb_iv = {}, {}
        for left in train:
            rest = {d: v for d, v in train.items() if d != left}
            r = build_router(kind, {d: e for d, (e, _) in rest.items()}, {d: t for d, (_, t) in rest.items()}, quantile)
            got = [x.domain for x in _routes(r, test[left])]
            k = sum(g == CORE for g in got)
            fallback[left], fb_iv[left] = round(k / len(got), 4), wilson(k, len(got))
        out |= {"unseen_fallback": fallback, "unseen_fallback_interval": fb_iv,
                "mean_unseen_fallback": round(sum(fallback.values()) / len(fallback), 4),
                "mean_unseen_fallback_interval": mean_interval(fallback, counts)}
    return out


def one_prompt_ms(embedder, train: dict, test: dict, quantile: float, n: int = 50) -> dict:
    """Median wall time to route one prompt as chat does (embed it alone, then the shipped router), over ``n`` prompts."""
    router = build_router(SHIPPED, {d: e for d, (e, _) in train.items()}, {d: t for d, (_, t) in train.items()}, quantile)
    texts = [t for _, ts in test.values() for t in ts][:n]
    embed, total = [], []
    for text in texts:
        t0 = time.perf_counter()
        e = embedder([text])[0]
        t1 = time.perf_counter()
        router.route(e, text)
        t2 = time.perf_counter()
        embed.append(t1 - t0)
        total.append(t2 - t0)
    med = lambda xs: round(1000 * sorted(xs)[len(xs) // 2], 2) if xs else None  # noqa: E731
    return {"prompts": len(texts), "embed_ms": med(embed), "total_ms": med(total)}


def routing_report(tasks, embedder, max_train: int = 300, max_test: int = 0, quantile: float = 0.05,
                   routers=ROUTERS, quantiles=QUANTILES, progress=None) -> dict:
    """Every router at the default ``quantile``, the shipped one at each of ``quantiles``; ``shipped`` on top."""
    t0 = time.perf_counter()
    train, test = _embed_tasks(tasks, embedder, max_train, max_test)
    embed_s = time.perf_counter() - t0
    report = {"setting": {"embedder": getattr(embedder, "name", "minilm"), "max_train": max_train,
                          "train_prompts": {d: len(v[1]) for d, v in train.items()}, "test_prompts": {d: len(v[1]) for d, v in test.items()},
                          "route_quantile": quantile, "embed_seconds": round(embed_s, 1)}}
    routers_out = {}
    for kind in routers:
        routers_out[kind] = evaluate_router(kind, train, test, quantile)
        if progress:
            progress(kind)
    by_quantile = []
    for q in quantiles:
        row = routers_out[SHIPPED] if q == quantile and SHIPPED in routers_out else evaluate_router(SHIPPED, train, test, q)
        by_quantile.append({k: row[k] for k in ("route_quantile", "mean_accuracy", "mean_accuracy_interval", "accuracy",
                                                "mean_unseen_fallback", "mean_unseen_fallback_interval") if k in row})
        if progress:
            progress(f"quantile {q}")
    shipped = routers_out.get(SHIPPED) or evaluate_router(SHIPPED, train, test, quantile)
    report["setting"]["route_one_prompt_ms"] = one_prompt_ms(embedder, train, test, quantile)
    report["shipped"] = {k: shipped[k] for k in ("router", "route_quantile", "accuracy", "accuracy_interval", "mean_accuracy",
                                                 "mean_accuracy_interval", "mean_unseen_fallback", "mean_unseen_fallback_interval",
                                                 "unseen_fallback", "confusion") if k in shipped}
    report["routers"] = routers_out
    report["by_quantile"] = by_quantile
    return report
