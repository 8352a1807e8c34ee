"""What routing costs a `lifealign-bank` run of `bench continual`: every memory scored on every task, then routing rules.

    python scripts/routing_cost.py matrix RUN OUT.json [--split test|dev] [--versions 1,2,3]
    python scripts/routing_cost.py routes RUN OUT.json [--split test|dev]
    python scripts/routing_cost.py policies ROUTES.json MATRIX.json
    python scripts/routing_cost.py keys RUN MATRIX.json [--sizes 64,128,300]

RUN is a `bench continual` output folder holding the bank `banks/lifealign` (lifealign and lifealign-bank share it).
- ``matrix``: per-pair preference correctness of every memory (each slot and the core) of every bank version on every
  task's test pairs (``--split dev``: the tasks' dev splits), scored exactly as the bench scores (``evaluate``, fp32);
  resumable (cells already in OUT.json are kept); on the test split the cells the bench scored already (the core's,
  each slot's on its own task) are taken from RUN's state.json.
- ``routes``: the shipped router's output for every test prompt at every version (classifier probabilities, the
  route, the neighbour similarity to every domain's keys).
- ``policies``: each routing rule's accuracy per task and Last, from the two files (no model runs): ``current`` (what
  chat, serve and route do), ``oracle`` (the true domain's slot), ``cls`` (the classifier, no novelty check),
  ``nearest`` (the domain of the nearest stored prompts), ``core``, ``gate`` p (the classifier's pick, the core below
  probability p) and ``current+gate`` p (what chat does with ``route_gate: p``: the shipped route, the core below p);
  each with its Last minus ``current``'s and that difference's 95 % paired-bootstrap interval.
- ``keys``: the routing a bank would have if each domain's key held SIZE of its training prompts (a seeded sample of
  the train split, no test prompt among them), scored with the last version's per-pair matrix.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def _tests(run: Path, split: str) -> dict:
    from lifealign_lite.data import load_pairs

    cfg = json.loads((run / "state.json").read_text())["config"]
    return {name: load_pairs(test if split == "test" else Path(train).parent / "dev.jsonl", max_pairs=cfg["max_test"] or None, seed=0)
            for name, train, test in cfg["tasks"]}


def matrix(run: Path, out: Path, split: str, versions: list[int] | None) -> None:
    from lifealign_lite.bench.continual import load_recipe
    from lifealign_lite.chat import open_session
    from lifealign_lite.cli.common import home_dir
    from lifealign_lite.evaluate import evaluate

    recipe = load_recipe(None, json.loads((run / "state.json").read_text())["config"]["recipe"])
    tests = _tests(run, split)
    res = json.loads(out.read_text()) if out.exists() else {}
    if split == "test":  # cells the bench scored already (same evaluate, same pairs): the core's, and each slot's on its own task
        st = json.loads((run / "state.json").read_text())
        names = list(tests)
        for row, cells in st["pairs"].get("lifealign", {}).items():
            i, j = map(int, row.split(","))
            if versions is None or i + 1 in versions:
                res.setdefault(str(i + 1), {}).setdefault("core", {}).setdefault(names[j], cells["pref_acc"])
        for row, cells in st["pairs"].get("lifealign-bank-oracle", {}).items():
            i, j = map(int, row.split(","))
            if j <= i and (versions is None or i + 1 in versions):
                res.setdefault(str(i + 1), {}).setdefault(names[j], {}).setdefault(names[j], cells["pref_acc"])
    base_cache: dict = {}
    for v in versions or range(1, len(tests) + 1):
        sess = open_session(run / "banks" / "lifealign", home_dir(), recipe, domain="core", version=v)
        for m in sorted(sess.state.domains) + ["core"]:
            for t, pairs in tests.items():
                if res.get(str(v), {}).get(m, {}).get(t) is not None:
                    continue
                if t not in base_cache:
                    base_cache[t] = evaluate(sess, pairs, recipe, "base").base_scores
                ev = evaluate(sess, pairs, recipe, m, base_scores=base_cache[t])
                res.setdefault(str(v), {}).setdefault(m, {})[t] = ev.per_pair["pref_acc"]
                print(v, m, t, round(sum(ev.per_pair["pref_acc"]) / len(pairs), 3), flush=True)
                out.write_text(json.dumps(res))


def routes(run: Path, out: Path, split: str) -> None:
    from lifealign_lite.memory.bank import Bank
    from lifealign_lite.memory.router import MiniLMEmbedder, _neighbour_similarity, prompt_text

    tests = _tests(run, split)
    emb = MiniLMEmbedder()
    E = {n: emb([prompt_text(p) for p in ps]) for n, ps in tests.items()}
    bank, res = Bank(run / "banks" / "lifealign"), {}
    for v in range(1, len(tests) + 1):
        st = bank.load(v)
        router, keys = st.router(), st.keys()
        for n, ps in tests.items():
            rows = []
            for e, p in zip(E[n], ps):
                r = router.route(e, prompt_text(p))
                rows.append({"probs": r.scores, "route": r.domain, "sims": {d: float(_neighbour_similarity(e[None], k)[0]) for d, k in keys.items()}})
            res.setdefault(str(v), {})[n] = {"rows": rows, "thresholds": router.thresholds}
    out.write_text(json.dumps(res))
    print("ok", {v: {n: len(x["rows"]) for n, x in d.items()} for v, d in res.items()})


def _pick(policy: tuple, r: dict) -> str:
    kind, arg = policy
    best = next(iter(r["probs"]))
    return {"current": lambda: r["route"], "cls": lambda: best, "core": lambda: "core",
            "nearest": lambda: max(r["sims"], key=r["sims"].get),
            "gate": lambda: best if r["probs"][best] >= arg else "core",
            "current+gate": lambda: r["route"] if r["probs"][best] >= arg else "core"}[kind]()


GATES = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def policies(routes_file: Path, matrix_file: Path) -> None:
    routed, mat = json.loads(routes_file.read_text()), json.loads(matrix_file.read_text())
    # the versions whose every memory was scored on every task (a matrix of --versions 3 holds only the last one)
    mat = {v: m for v, m in mat.items() if "core" in m and all(len(m[d]) == len(routed["1"]) for d in m)}
    order = list(routed["1"])
    last = max(mat, key=int)
    per_pair: dict[str, list[list[float]]] = {}  # policy -> the last version's per-pair correctness, per task
    current = 0.0  # the shipped rule's Last
    for policy in [("current", None), ("oracle", None), ("cls", None), ("nearest", None), ("core", None)] + [(kind, p) for kind in ("gate", "current+gate") for p in GATES]:
        cells = []
        for v in sorted(mat, key=int):
            row = []
            for t in order:
                rows = routed[v][t]["rows"]
                if policy[0] == "oracle":
                    accs = mat[v][t if t in mat[v] else "core"][t]
                else:
                    accs = [mat[v][_pick(policy, r)][t][i] for i, r in enumerate(rows)]
                row.append(sum(accs) / len(accs))
                if v == last:
                    per_pair.setdefault(_label(policy), []).append(accs)
            cells.append(f"v{v}: " + "/".join(f"{100 * a:.0f}" for a in row))
            if v == last:
                final = row
        last_ = sum(final) / len(final)
        if policy[0] == "current":  # the first rule: every rule is compared with it
            current = last_
        lo, hi = _paired_interval(per_pair[_label(policy)], per_pair["current"])
        print(f"{_label(policy):16s} " + "  ".join(cells) + f"  Last {100 * last_:.1f}"
              f"  minus current's {100 * (last_ - current):+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]")


def _label(policy: tuple) -> str:
    return policy[0] + ("" if policy[1] is None else f" {policy[1]}")


def _paired_interval(a: list[list[float]], b: list[list[float]]) -> list[float]:
    """95 % interval of Last(a) - Last(b), resampled as the bench resamples (its paired draws, its seed)."""
    import numpy as np

    from lifealign_lite.bench.continual import paired_draws, percentile_interval

    draws = paired_draws([len(x) for x in a])
    d = [(np.asarray(xa) - np.asarray(xb))[idx].mean(axis=1) for xa, xb, idx in zip(a, b, draws)]
    return percentile_interval(np.mean(d, axis=0))


def keys(run: Path, matrix_file: Path, sizes: list[int]) -> None:
    from lifealign_lite.data import load_pairs
    from lifealign_lite.memory.router import MiniLMEmbedder, fit_router, prompt_text

    mat = json.loads(matrix_file.read_text())
    m = mat[max(mat, key=int)]
    cfg = json.loads((run / "state.json").read_text())["config"]
    tests = _tests(run, "test")
    names = list(tests)
    emb = MiniLMEmbedder()
    test_texts = {n: [prompt_text(p) for p in ps] for n, ps in tests.items()}
    TE = {n: emb(t) for n, t in test_texts.items()}
    trains = {name: Path(train) for name, train, _ in cfg["tasks"]}
    for size in sizes:
        key_e, key_t = {}, {}
        for n in names:
            banned = set(test_texts[n])
            pool = [t for t in dict.fromkeys(prompt_text(p) for p in load_pairs(trains[n])) if t not in banned]
            pool = random.Random(0).sample(pool, min(size, len(pool)))
            key_e[n], key_t[n] = emb(pool), pool
        for q in (0.0, 0.05):
            router = fit_router(key_e, key_t, q)
            for gate in (0.0, 0.7):
                accs, routed = [], []
                for n in names:
                    total = ok = 0
                    for i, (e, t) in enumerate(zip(TE[n], test_texts[n])):
                        r = router.route(e, t)
                        d = r.domain if r.scores[next(iter(r.scores))] >= gate else "core"
                        ok += d == n
                        total += m[d][n][i]
                    accs.append(total / len(test_texts[n]))
                    routed.append(ok)
                print(f"keys {size} quantile {q} gate {gate}: routed to own slot {routed}, Last {100 * sum(accs) / len(accs):.1f} "
                      f"row {[round(100 * a) for a in accs]}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("matrix", "routes"):
        p = sub.add_parser(name)
        p.add_argument("run", type=Path)
        p.add_argument("out", type=Path)
        p.add_argument("--split", choices=("test", "dev"), default="test")
        if name == "matrix":
            p.add_argument("--versions", default=None)
    p = sub.add_parser("policies")
    p.add_argument("routes", type=Path)
    p.add_argument("matrix", type=Path)
    p = sub.add_parser("keys")
    p.add_argument("run", type=Path)
    p.add_argument("matrix", type=Path)
    p.add_argument("--sizes", default="64,128,300")
    a = ap.parse_args()
    if a.cmd == "matrix":
        matrix(a.run, a.out, a.split, [int(x) for x in a.versions.split(",")] if a.versions else None)
    elif a.cmd == "routes":
        routes(a.run, a.out, a.split)
    elif a.cmd == "policies":
        policies(a.routes, a.matrix)
    else:
        keys(a.run, a.matrix, [int(x) for x in a.sizes.split(",")])


if __name__ == "__main__":
    main()
