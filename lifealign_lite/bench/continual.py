"""``bench continual``: the paper's continual-alignment protocol, offline, with baselines.

After training on each task i, every method is scored on the test split of every task j (matrix ``R[i][j]``),
for each score of ``evaluate`` (preference accuracy, length-normalized accuracy, reward margin). With T tasks
and ``R0[j]`` the base model's score:

- Last = mean_j R[T][j];  AP = mean_k (mean_{j<=k} R[k][j]);
- BWT = mean_{j<T} (R[T][j] - R[j][j]) (negative = forgetting);  FWT = mean_{j>1} (R[j-1][j] - R0[j]).

Every method is the project's own ``align`` with different recipe knobs, so the comparison changes one thing
at a time: sequential fine-tuning is SLMC switched off (``tau = 1``, ``projection_gamma = 1``, a rank budget
that truncates nothing), replay is ``replay_mix``, DPO is ``focal_gamma = 0``, and the two regularized
baselines are sequential DPO plus their penalty (``ewc_lambda``, ``olora_lambda``: ``regularize.py``). The run is resumable: each
finished (method, task) step is recorded in ``OUT/state.json`` and skipped on the next start.

Over 400 lines on purpose: the protocol, its metrics (AP, BWT, FWT with a paired bootstrap) and its report are one
benchmark read together.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ..align import IF_STOPPED, align
from ..chat import open_session
from ..errors import BenchError
from ..files import atomic_write
from ..system import MATPLOTLIB_MISSING, pyplot
from ..data import load_pairs, validate_domain_name, write_pairs
from ..distributed import refuse_launcher
from ..evaluate import METRICS, evaluate
from ..memory.bank import Bank
from ..recipe import load_recipe

# EWC strength, from a two-task probe (truthfulqa then hh-harmless, 16 pairs, 4 steps): at 1 the penalty ended at
# 0.02 against a loss of 0.68 and the second task learned as without it; at 10 the second task stopped learning.
EWC_LAMBDA = 3.0
OLORA_LAMBDA = 0.5  # O-LoRA's own setting (lambda_1 = 0.5)
_SEQ = {"tau": 1.0, "projection_gamma": 1.0, "replay_mix": 0.0, "core_from": "update"}  # one adapter trained on, task after task
# name -> (recipe overrides, memory evaluated, how tasks are trained)
METHODS: dict[str, tuple[dict, str, str]] = {
    "seq-dpo": ({"loss": "dpo", **_SEQ}, "core", "stream"),
    "seq-fpo": ({"loss": "fpo", **_SEQ}, "core", "stream"),
    "replay": ({"loss": "dpo", **_SEQ, "replay_mix": 0.2}, "core", "stream"),
    "replay-fpo": ({"loss": "fpo", **_SEQ, "replay_mix": 0.2}, "core", "stream"),  # ablation: FPO without SLMC
    "replay-slmc": ({"loss": "dpo", "replay_mix": 0.2, "core_from": "update"}, "core", "stream"),  # ablation: SLMC without FPO
    "lifealign-update": ({"loss": "fpo", "replay_mix": 0.2, "core_from": "update"}, "core", "stream"),  # the paper's core path
    "lifealign": ({"loss": "fpo", "replay_mix": 0.2}, "core", "stream"),
    "lifealign-bank": ({"loss": "fpo", "replay_mix": 0.2}, "auto", "stream"),
    "sep": ({"loss": "dpo", **_SEQ}, "told", "separate"),  # one adapter per task from the base, told the domain
    "sep-fpo": ({"loss": "fpo", **_SEQ}, "told", "separate"),  # sep with the recipe's loss: separates the loss from the memory
    "ewc": ({"loss": "dpo", **_SEQ, "ewc_lambda": EWC_LAMBDA}, "core", "stream"),  # online EWC on the adapter's update
    "olora": ({"loss": "dpo", **_SEQ, "olora_lambda": OLORA_LAMBDA}, "core", "stream"),  # orthogonal LoRA subspaces
    "mtl": ({"loss": "dpo", **_SEQ}, "core", "joint"),  # all tasks at once: the upper bound (final row only)
}
# methods whose training runs are identical: the second reuses the first's bank and only evaluates differently
SHARED_TRAINING = {"lifealign-bank": "lifealign"}
# lifealign-bank's bank scored with each test pair sent to its true domain's slot: routing's ceiling
ORACLE = "lifealign-bank-oracle"


_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"  # the shared data beside a checkout
_PAPER_ORDER = ("truthfulqa", "hh-harmless", "hh-helpful", "safe-rlhf")
SIGNAL_ORDER = ("safe-rlhf", "truthfulqa", "hc3")
SIGNAL_OVERRIDES = {"batch_size": 4, "lr": 5e-4, "epochs": 1, "max_length": 128, "max_prompt_length": 64, "bank_rank": 24,
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
PRESETS = {
    # CI: two domains, a handful of pairs, two steps per task; proves the pipeline end to end in minutes
    "smoke": {"tasks": [f"{n}={_DATA}/{n}/train.jsonl:{_DATA}/{n}/dev.jsonl" for n in ("truthfulqa", "safe-rlhf")],
              "methods": "seq-dpo,ewc,olora,lifealign,lifealign-bank", "max_pairs": 8, "max_test": 6,
              "overrides": {"max_steps": 2, "batch_size": 4, "max_length": 96, "max_prompt_length": 48}},
    # the four shared domains in the paper's order; these five methods took 46 min (+1 for the base model) of the
    # measured 94-min run of all nine on a 2-core CPU (docs/RESULTS.md): `--methods all` for every baseline
    # a stream this CPU can learn and forget within the hour (docs/RESULTS.md): see SIGNAL_ORDER
    "signal": {"tasks": [f"{n}={_DATA}/{n}/train.jsonl:{_DATA}/{n}/dev.jsonl" for n in SIGNAL_ORDER],
               "methods": "seq-dpo,lifealign,lifealign-bank,sep,mtl", "max_pairs": 64, "max_test": 100,
               "overrides": SIGNAL_OVERRIDES},
    "paper4": {"tasks": [f"{n}={_DATA}/{n}/train.jsonl:{_DATA}/{n}/dev.jsonl" for n in _PAPER_ORDER],
               "methods": "seq-dpo,replay,mtl,lifealign,lifealign-bank", "max_pairs": 64, "max_test": 40,
               "overrides": {"batch_size": 4, "lr": 2e-4, "epochs": 1}},
}


@dataclass
class Task:
    name: str
    train: Path
    test: Path


def parse_task(spec: str) -> Task:
    """``NAME=TRAIN.jsonl:TEST.jsonl``."""
    name, sep, paths = spec.partition("=")
    train, sep2, test = paths.rpartition(":")
    if not sep or not sep2 or not train or not test:
        raise BenchError(f"task {spec!r}: expected NAME=TRAIN.jsonl:TEST.jsonl")
    return Task(validate_domain_name(name), Path(train), Path(test))


def with_test_dir(tasks: list[Task], test_dir: Path) -> list[Task]:
    """The same tasks scored on ``TEST_DIR/NAME/test.jsonl`` instead of their own test files (training unchanged)."""
    out = []
    for t in tasks:
        path = Path(test_dir) / t.name / "test.jsonl"
        if not path.is_file():
            raise BenchError(f"{path}: no test file for task {t.name!r}; --tests DIR needs DIR/NAME/test.jsonl for every task")
        out.append(Task(t.name, t.train, path))
    return out


ORDERS = ("given", "reversed")


def ordered(tasks: list[Task], order: str) -> list[Task]:
    """The tasks in their given order or reversed (the paper reports several task orders)."""
    if order not in ORDERS:
        raise BenchError(f"order must be one of {', '.join(ORDERS)}, got {order!r}")
    return list(reversed(tasks)) if order == "reversed" else list(tasks)


def parse_methods(text: str) -> list[str]:
    """Comma-separated method names, in the order given; ``all`` is every method."""
    names = [m.strip() for m in text.split(",") if m.strip()]
    if names == ["all"]:
        return list(METHODS)
    for m in names:
        if m not in METHODS:
            raise BenchError(f"unknown method {m!r}; available: {', '.join(METHODS)}")
    return names


# -- metrics ------------------------------------------------------------------------------------------------

def transfer_metrics(R: Sequence[Sequence[float | None]], R0: Sequence[float]) -> dict[str, float | None]:
    """Last, AP, BWT and FWT of a T x T score matrix (rows: after task i; columns: test set j)."""
    T = len(R0)
    complete = len(R) == T and all(v is not None for row in R for v in row)
    last = sum(R[-1]) / T if len(R) == T and all(v is not None for v in R[-1]) else None
    if not complete:
        return {"Last": last, "AP": None, "BWT": None, "FWT": None}
    ap = sum(sum(R[k][j] for j in range(k + 1)) / (k + 1) for k in range(T)) / T
    bwt = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1) if T > 1 else 0.0
    fwt = sum(R[j - 1][j] - R0[j] for j in range(1, T)) / (T - 1) if T > 1 else 0.0
    return {"Last": last, "AP": ap, "BWT": bwt, "FWT": fwt}


# -- the run ------------------------------------------------------------------------------------------------

def _save_json(path: Path, data: dict) -> None:
    atomic_write(path, json.dumps(data, indent=2))


def run_continual(tasks: list[Task], methods: list[str], out: Path, home: Path, recipe_name: str | None = None,
                  overrides: dict | None = None, max_pairs: int = 0, max_test: int = 0, reporter=None, command: str = "", order: str = "given") -> dict:
    """Run (or resume) the bench; returns the results written to ``out/results.json``. One process: every method's
    align runs in it (under a launcher this refuses at once: ``distributed.refuse_launcher``)."""
    refuse_launcher("bench continual")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base_recipe = load_recipe(recipe_name, overrides or {})
    tests = {t.name: load_pairs(t.test, max_pairs=max_test or None, seed=0) for t in tasks}
    trains = {t.name: load_pairs(t.train, max_pairs=max_pairs or None, seed=base_recipe.seed) for t in tasks}
    state_path = out / "state.json"
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    config = {"tasks": [[t.name, str(t.train), str(t.test)] for t in tasks], "max_pairs": max_pairs, "max_test": max_test,
              "recipe": base_recipe.to_dict()}
    if state.get("config", config) != config:
        raise BenchError(f"{out} holds a bench with other tasks or settings; use another --out")
    state.setdefault("config", config)
    state["order"] = order  # recorded (the tasks' order is in config): merge_runs refuses to combine two orders
    state.setdefault("scores", {})  # method -> "i,j" -> metrics
    state.setdefault("pairs", {})  # method -> "i,j" -> metric -> one score per test pair (the bootstrap's input)
    state.setdefault("seconds", {})
    started = time.perf_counter()
    steps = [(m, i) for m in methods for i in range(len(tasks))]
    if reporter:
        reporter.start("bench", len(steps) + 1, 0)

    def step_done() -> None:
        _save_json(state_path, state)
        if reporter:
            reporter.advance("bench", 1, {})

    # R0: the base model on every test set (also the reference for preference accuracy)
    base_cache: dict[str, dict] = {}
    session = open_session(out / "banks" / "_empty", home, base_recipe, domain="base")
    for t in tasks:
        ev = evaluate(session, tests[t.name], base_recipe, "base")
        base_cache[t.name] = ev.base_scores
        state.setdefault("base", {})[t.name] = {k: ev.summary[k] for k in METRICS}
        state.setdefault("base_pairs", {})[t.name] = ev.per_pair
    step_done()
    del session

    T = len(tasks)
    for method in methods:
        overrides_m, memory, mode = METHODS[method]
        recipe = load_recipe(recipe_name, {**(overrides or {}), **overrides_m,
                                           **({"bank_rank": base_recipe.lora_r * T} if overrides_m.get("tau") == 1.0 else {}),
                                           # a bank scored on its core only: no slot of its is ever read, so none is trained
                                           **({"slot_from": "update"} if memory == "core" and method not in SHARED_TRAINING.values() else {})})
        scores = state["scores"].setdefault(method, {})
        pair_scores = state["pairs"].setdefault(method, {})
        oracle = state["scores"].setdefault(ORACLE, {}) if method == "lifealign-bank" else None
        oracle_pairs = state["pairs"].setdefault(ORACLE, {}) if oracle is not None else None
        for i, task in enumerate(tasks):
            if f"{i},0" in scores:
                if reporter:
                    reporter.advance("bench", 1, {})
                continue
            t0 = time.perf_counter()
            bank = out / "banks" / SHARED_TRAINING.get(method, method)
            if mode == "separate":
                bank = out / "banks" / method / task.name
            if mode == "joint":
                if i < T - 1:  # the upper bound is trained once, on everything
                    scores[f"{i},0"] = None
                    step_done()
                    continue
                joint = out / "joint.jsonl"
                write_pairs(joint, [p for t in tasks for p in trains[t.name]])
                trained_file, domain = joint, "all"
            else:
                trained_file = out / "train" / f"{task.name}.jsonl"
                trained_file.parent.mkdir(exist_ok=True)
                write_pairs(trained_file, trains[task.name])
                domain = task.name
            if reporter:  # the cell's own lines (training steps, a heartbeat) so a log is never silent for a whole cell
                reporter.note(f"bench: {method}, task {i + 1}/{T} ({task.name})")
            if _bank_tasks(bank) <= (i if mode == "stream" else 0):
                # a cell stopped while training (Ctrl-C, SIGTERM) continues from its checkpoint
                align(trained_file, recipe, home, bank, domain=domain, reporter=reporter, resume=IF_STOPPED)
            # the bank as it stood after task i (each task adds one version): a resumed run may have trained further
            sess = None if mode == "separate" else open_session(bank, home, recipe, domain=memory, version=1 if mode == "joint" else i + 1)
            for j, test in enumerate(tasks):
                # an adapter frozen since row j (task j's own separate adapter; its slot, once a later task is another
                # domain) scores on j what it scored in row j: the scores are deterministic, so that cell is copied
                frozen = j < i and test.name not in [t.name for t in tasks[j + 1 : i + 1]]
                if mode == "separate" and frozen:
                    scores[f"{i},{j}"], pair_scores[f"{i},{j}"] = scores[f"{j},{j}"], pair_scores[f"{j},{j}"]
                    continue
                if mode == "separate" and j > i:  # no adapter for a task not seen yet: the base model answers
                    scores[f"{i},{j}"] = {k: state["base"][test.name][k] for k in METRICS}
                    pair_scores[f"{i},{j}"] = state["base_pairs"][test.name]
                    continue
                if mode == "separate":
                    sess = open_session(out / "banks" / method / test.name, home, recipe, domain=test.name)
                ev = evaluate(sess, tests[test.name], recipe, test.name if mode == "separate" else memory, base_scores=base_cache[test.name])
                scores[f"{i},{j}"] = {k: ev.summary[k] for k in (*METRICS, "ties")}
                pair_scores[f"{i},{j}"] = ev.per_pair
                if oracle is not None and frozen:
                    oracle[f"{i},{j}"], oracle_pairs[f"{i},{j}"] = oracle[f"{j},{j}"], oracle_pairs[f"{j},{j}"]
                elif oracle is not None:  # each test pair answered by its true domain's slot (the core for a domain not seen yet)
                    told = test.name if j <= i else "core"
                    ev = evaluate(sess, tests[test.name], recipe, told, base_scores=base_cache[test.name])
                    oracle[f"{i},{j}"] = {k: ev.summary[k] for k in (*METRICS, "ties")}
                    oracle_pairs[f"{i},{j}"] = ev.per_pair
            state["seconds"][f"{method},{i}"] = round(time.perf_counter() - t0, 1)
            step_done()

    return _write_results(state, methods, out, reporter, command=command, wall_s_this_start=round(time.perf_counter() - started, 1))


def _write_results(state: dict, methods: list[str], out: Path, reporter=None, **meta) -> dict:
    """results.json, results.md and the plots of a bench state."""
    results = summarize(state, [t[0] for t in state["config"]["tasks"]], methods)
    results["_meta"] |= {"score_precision": state["config"]["recipe"]["score_precision"], "order": state.get("order", "given"), **meta}
    _save_json(out / "results.json", results)
    (out / "results.md").write_text(markdown_table(results, methods))
    if not plot(results, reported_methods(methods), out):
        (getattr(reporter, "note", None) or (lambda message: None))(MATPLOTLIB_MISSING)
    return results


def merge_runs(sources: list[Path], out: Path, reporter=None, command: str = "") -> dict:
    """One results.json from several ``--out`` folders of the same tasks and settings (methods run side by side,
    each in its own folder): their scores are combined into ``out`` (state.json too, so ``out`` resumes as a bench).
    Refused: folders of other tasks or settings, a method finished in two of them."""
    states = []
    for src in map(Path, sources):
        if not (src / "state.json").is_file():
            raise BenchError(f"{src}: no state.json; --merge takes --out folders of bench continual")
        states.append((src, json.loads((src / "state.json").read_text())))
    first = states[0][1]
    merged = {k: first.get(k) for k in ("config", "base", "base_pairs", "order")} | {"scores": {}, "pairs": {}, "seconds": {}}
    for src, st in states:
        if (st.get("config"), st.get("order", "given"), st.get("base")) != (first.get("config"), first.get("order", "given"), first.get("base")):
            raise BenchError(f"{src}: another bench (tasks, order, settings or base scores) than {states[0][0]}; combine runs of one setting")
        for method, cells in st.get("scores", {}).items():
            if cells and method in merged["scores"]:
                raise BenchError(f"{src}: {method} is also in an earlier folder; each method may come from one folder")
            if cells:
                merged["scores"][method], merged["pairs"][method] = cells, st.get("pairs", {}).get(method, {})
        merged["seconds"] |= st.get("seconds", {})
    Path(out).mkdir(parents=True, exist_ok=True)
    _save_json(Path(out) / "state.json", merged)
    return _write_results(merged, [m for m in merged["scores"] if m in METHODS], Path(out), reporter, command=command,
                          merged_from=[str(s) for s, _ in states])


def _bank_tasks(bank: Path) -> int:
    """Tasks already consolidated into a bank (0 for none): training a step twice is skipped on resume."""
    return len(Bank(bank).load().tasks)


def reported_methods(methods: list[str]) -> list[str]:
    """The rows of the results: the methods run, with lifealign-bank's oracle-routing row right after it."""
    out = []
    for m in methods:
        out.append(m)
        if m == "lifealign-bank":
            out.append(ORACLE)
    return out


def _mode(method: str) -> str:
    return "stream" if method == ORACLE else METHODS[method][2]


def summarize(state: dict, task_names: list[str], methods: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    T = len(task_names)
    rows = reported_methods(methods)
    results: dict = {"_meta": {"tasks": task_names, "base": state.get("base", {}), "seconds": state.get("seconds", {}),
                               "config": state.get("config"), "methods": rows}}
    for method in rows:
        scores = state["scores"].get(method, {})
        entry: dict = {"matrices": {}}
        for metric in METRICS:
            R = [[(scores.get(f"{i},{j}") or {}).get(metric) for j in range(T)] for i in range(T)]
            R0 = [state["base"][n][metric] for n in task_names]
            entry["matrices"][metric] = R
            entry[metric] = transfer_metrics(R, R0)
            if _mode(method) == "joint":
                # trained once on every task, so there is no sequence: its average over all tasks is the
                # upper bound each method's AP is compared with; BWT and FWT do not apply
                entry[metric]["AP"] = entry[metric]["Last"]
        results[method] = entry
    if state.get("pairs") and state.get("base_pairs"):
        boot = bootstrap(state, task_names, rows, n_boot, seed)
        results["_meta"]["intervals"] = {"method": "paired percentile bootstrap over test pairs", "resamples": n_boot, "level": 0.95, "seed": seed}
        for method in rows:
            results[method]["intervals"] = boot["intervals"].get(method, {})
        results["_meta"]["differences"] = boot["differences"]
    return results


# -- uncertainty: a paired bootstrap over test pairs --------------------------------------------------------

MEASURES = ("Last", "AP", "BWT", "FWT")


def _measures(R, R0, joint: bool) -> dict[str, "np.ndarray"]:
    """Last, AP, BWT, FWT of a batch of score matrices ``R`` (B, T, T) and base scores ``R0`` (B, T)."""
    import numpy as np

    T = R.shape[1]
    last = R[:, T - 1, :].mean(axis=1)
    if joint:
        return {"Last": last, "AP": last}
    ap = np.mean([R[:, k, : k + 1].mean(axis=1) for k in range(T)], axis=0)
    bwt = np.mean([R[:, T - 1, j] - R[:, j, j] for j in range(T - 1)], axis=0) if T > 1 else np.zeros(len(R))
    fwt = np.mean([R[:, j - 1, j] - R0[:, j] for j in range(1, T)], axis=0) if T > 1 else np.zeros(len(R))
    return {"Last": last, "AP": ap, "BWT": bwt, "FWT": fwt}


def paired_draws(sizes: list[int], n_boot: int = 1000, seed: int = 0) -> list:
    """One draw of test-pair indices per task (``n_boot`` x that task's size), shared by everything compared."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, n, size=(n_boot, n)) for n in sizes]


def percentile_interval(x) -> list[float]:
    """The 95 % percentile interval of resampled values."""
    import numpy as np

    lo, hi = np.percentile(x, [2.5, 97.5])
    return [float(lo), float(hi)]


def bootstrap(state: dict, task_names: list[str], methods: list[str], n_boot: int = 1000, seed: int = 0) -> dict:
    """95 % percentile intervals of Last/AP/BWT/FWT for every method and score, and of every difference between
    two methods, from ``n_boot`` resamples of each task's test pairs.

    The resample is paired: one draw of test-pair indices per task is used for every cell of every method's
    matrix and for the base model, so a difference between two methods varies only with what differs between
    them (each method is scored on the same test pairs). A difference is "outside noise" when its interval
    excludes 0.
    """
    import numpy as np

    T = len(task_names)
    draws = paired_draws([len(state["base_pairs"][n]["pref_acc"]) for n in task_names], n_boot, seed)
    per_method: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    for metric in METRICS:
        base = [np.asarray(state["base_pairs"][n][metric], dtype=np.float64) for n in task_names]
        R0 = np.stack([base[j][draws[j]].mean(axis=1) for j in range(T)], axis=1)
        for method in methods:
            cells = state["pairs"].get(method, {})
            joint = _mode(method) == "joint"
            rows = [T - 1] if joint else range(T)
            if any(cells.get(f"{i},{j}") is None for i in rows for j in range(T)):
                continue  # not finished: no interval
            R = np.full((n_boot, T, T), np.nan)
            for i in rows:
                for j in range(T):
                    R[:, i, j] = np.asarray(cells[f"{i},{j}"][metric], dtype=np.float64)[draws[j]].mean(axis=1)
            per_method.setdefault(method, {})[metric] = _measures(R, R0, joint)

    intervals = {m: {metric: {k: percentile_interval(v) for k, v in measures.items()} for metric, measures in by_metric.items()}
                 for m, by_metric in per_method.items()}
    differences = []
    names = list(per_method)
    for a_i, a in enumerate(names):
        for b in names[a_i + 1:]:
            for metric in METRICS:
                for k in MEASURES:
                    if k in per_method[a].get(metric, {}) and k in per_method[b].get(metric, {}):
                        d = per_method[a][metric][k] - per_method[b][metric][k]
                        lo, hi = percentile_interval(d)
                        differences.append({"a": a, "b": b, "score": metric, "measure": k, "diff": float(np.mean(d)),
                                            "interval": [lo, hi], "outside_noise": bool(lo > 0 or hi < 0)})
    return {"intervals": intervals, "differences": differences}


def markdown_table(results: dict, methods: list[str]) -> str:
    rows = reported_methods(methods)

    def f(v, metric):
        if v is None:
            return "n/a"
        return f"{100 * v:.1f}" if metric != "margin" else f"{v:+.3f}"

    def cell(m, metric, k):
        v = results[m][metric][k]
        iv = results[m].get("intervals", {}).get(metric, {}).get(k)
        if v is None or iv is None:
            return f(v, metric)
        return f"{f(v, metric)} [{f(iv[0], metric)}, {f(iv[1], metric)}]"

    lines = []
    for metric, title in (("pref_acc", "preference accuracy (%)"), ("margin", "mean reward margin (beta * h)"),
                          ("lennorm_acc", "length-normalized accuracy (%)")):
        lines += [f"**{title}**, 95 % intervals in brackets", "",
                  "| method | Last | AP | BWT | FWT |", "|---|---|---|---|---|"]
        for m in rows:
            lines.append(f"| {m} | " + " | ".join(cell(m, metric, k) for k in MEASURES) + " |")
        lines.append("")
    base = results["_meta"]["base"]
    lines.append("Base model (R0): " + ", ".join(f"{n} len-norm {100 * v['lennorm_acc']:.1f}" for n, v in base.items())
                 + " (its preference accuracy is 50 by definition: it is the reference).")
    lines.append("Accuracies are percentages of held-out pairs; BWT and FWT in percentage points (margins in reward units). "
                 f"Scored in {results['_meta'].get('score_precision', 'fp32')}.")
    diffs = [d for d in results["_meta"].get("differences", []) if d["score"] in ("pref_acc", "margin") and d["measure"] in ("Last", "BWT")]
    if diffs:
        lines += ["", "**Differences between methods outside noise** (paired bootstrap, 95 % interval of a - b excludes 0):", ""]
        shown = [d for d in diffs if d["outside_noise"]]
        for d in shown:
            scale, unit = (100, " points") if d["score"] != "margin" else (1, "")
            lines.append(f"- {d['score']} {d['measure']}: {d['a']} - {d['b']} = {scale * d['diff']:+.1f}{unit} "
                         f"[{scale * d['interval'][0]:+.1f}, {scale * d['interval'][1]:+.1f}]")
        if not shown:
            lines.append("- none: every difference of Last and BWT is within noise")
    return "\n".join(lines) + "\n"


def _color(method: str) -> str:
    """LifeAlign's rows in blue, the baselines in grey, in every chart."""
    return "#4c72b0" if "lifealign" in method else "#999999"


def plot(results: dict, methods: list[str], out: Path) -> bool:
    """A heatmap of the preference-accuracy matrix per method, a bar chart of AP and BWT and the Last-against-margin-BWT
    trade (False without matplotlib)."""
    plt = pyplot()
    if plt is None:
        return False

    names = results["_meta"]["tasks"]
    for m in methods:
        R = [[float("nan") if v is None else 100 * v for v in row] for row in results[m]["matrices"]["pref_acc"]]
        fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
        im = ax.imshow(R, vmin=0, vmax=100, cmap="viridis")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_yticks(range(len(names)), [f"after {n}" for n in names])
        for i, row in enumerate(R):
            for j, v in enumerate(row):
                if v == v:
                    ax.text(j, i, f"{v:.0f}", ha="center", va="center", color="w" if v < 60 else "k")
        ax.set_title(f"{m}: preference accuracy (%)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / f"heatmap-{m}.png", dpi=100)
        plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.1 * len(methods), 3.5))
    for ax, key in zip(axes, ("AP", "BWT")):
        vals = [results[m]["pref_acc"][key] for m in methods]
        ax.bar(methods, [0 if v is None else 100 * v for v in vals], color=[_color(m) for m in methods])
        for x, v in enumerate(vals):
            if v is None:  # mtl has no sequence, so no BWT: say so rather than draw a zero
                ax.text(x, 0, "n/a", ha="center", va="bottom", fontsize=8)
        ax.set_title(f"preference accuracy {key} ({'%' if key == 'AP' else 'points'})")
        ax.tick_params(axis="x", rotation=45)
        ax.axhline(0, color="k", linewidth=0.5)
    fig.tight_layout()
    fig.savefig(out / "ap-bwt.png", dpi=100)
    plt.close(fig)
    _plot_trade(plt, results, methods, out / "last-vs-margin-bwt.png")
    return True


def _plot_trade(plt, results: dict, methods: list[str], path: Path) -> None:
    """What each method keeps against what it learns: preference-accuracy Last (x) against margin BWT (y), with
    their 95 % intervals where the run has them; a method with no sequence (mtl) is a vertical line at its Last."""
    fig, ax = plt.subplots(figsize=(7, 5))
    for m in methods:
        last, bwt = results[m]["pref_acc"]["Last"], results[m]["margin"]["BWT"]
        if last is None:
            continue
        iv, color = results[m].get("intervals", {}), _color(m)
        if bwt is None:
            ax.axvline(100 * last, color=color, linestyle="--", linewidth=1)
            ax.annotate(m, (100 * last, 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right", fontsize=8)
            continue
        x_lo, x_hi = iv.get("pref_acc", {}).get("Last") or (last, last)  # no interval: a bare point
        y_lo, y_hi = iv.get("margin", {}).get("BWT") or (bwt, bwt)
        ax.errorbar([100 * last], [bwt], xerr=[[100 * (last - x_lo)], [100 * (x_hi - last)]], yerr=[[bwt - y_lo], [y_hi - bwt]],
                    fmt="o", color=color, capsize=3)
        ax.annotate(m, (100 * last, bwt), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xlabel("preference accuracy Last (%)")
    ax.set_ylabel("reward-margin BWT (forgetting below 0)")
    ax.set_title("learned (right) against kept (up), 95 % intervals")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
