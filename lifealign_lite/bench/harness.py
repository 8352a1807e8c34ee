"""The benchmarks' harness: each measured variant runs in a fresh Python process (``python -m
lifealign_lite.bench.child VARIANT --options JSON --out FILE``, :mod:`lifealign_lite.bench.child`), so ``ru_maxrss`` (peak resident memory)
belongs to that variant alone and no warm cache or allocator state leaks from one variant into the next. The child
writes one JSON object to ``--out``; the parent (:func:`run_child`) collects it.

Also here: what every benchmark shares (token counting, ratios and rates, machine description, the recipe and data
a variant starts from, greedy generation, the CLI's start command). The pure helpers hold no torch import and are
unit-tested on their own. The benchmarks themselves: ``speed.py`` (vs TRL), ``quant.py`` (precision), ``chat.py``
(latency), ``continual.py`` and ``routing.py``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ..errors import BenchError
from ..system import peak_rss_mb

REPO = Path(__file__).resolve().parents[2]


DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-helpful" / "train.jsonl"


SPEED_VARIANTS = ("trl-default", "trl-tuned", "lifealign", "lifealign-unshared")


QUANT_MODES = ("none", "nf4", "int8")


CHAT_MODES = ("merged", "unmerged", "nf4", "llama.cpp")


CHILD_HEARTBEAT_S = 20.0  # a variant running longer says so this often (a piped log stays under 30 s between lines)
GEN_PROMPT = "Explain in a few sentences why the sky is blue."


def pair_tokens(prompt: int, chosen: int, rejected: int, max_length: int | None = None) -> int:
    """Non-padding tokens a pair puts through the model: prompt+chosen plus prompt+rejected.

    The prompt counts once in each sequence. With ``max_length``, each sequence is cut to it (TRL's
    ``keep_start`` truncation of the concatenated sequence); lifealign-lite truncates before counting.
    """
    if min(prompt, chosen, rejected) < 0:
        raise ValueError("token counts must be >= 0")
    a, b = prompt + chosen, prompt + rejected
    if max_length is not None:
        a, b = min(a, max_length), min(b, max_length)
    return a + b


def pairs_in_steps(n_pairs: int, batch_size: int, steps: int | None) -> int:
    """Pairs seen in ``steps`` optimizer steps over ``n_pairs`` pairs in batches (the last batch of an epoch may be short).

    ``steps`` of 0 or None means one epoch. Matches both trainers here (no gradient accumulation, no dropped last batch).
    """
    if n_pairs <= 0 or batch_size <= 0:
        return 0
    per_epoch = math.ceil(n_pairs / batch_size)
    if not steps:
        return n_pairs
    full, rest = divmod(steps, per_epoch)
    return full * n_pairs + min(rest * batch_size, n_pairs)


def total_tokens(lengths: Iterable[tuple[int, int, int]], max_length: int | None = None) -> int:
    """:func:`pair_tokens` summed over (prompt, chosen, rejected) lengths."""
    return sum(pair_tokens(p, c, r, max_length) for p, c, r in lengths)


def ratio(numerator: float | None, denominator: float | None, digits: int = 3) -> float | None:
    """``numerator / denominator`` rounded, or None when either is missing or the denominator is not positive."""
    if numerator is None or denominator is None or denominator <= 0:
        return None
    return round(numerator / denominator, digits)


def rate(count: float, seconds: float | None, digits: int = 3) -> float | None:
    """``count / seconds`` rounded; None for a missing or zero duration."""
    if not seconds or seconds <= 0:
        return None
    return round(count / seconds, digits)


def parse_variants(text: str | Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """A comma-separated list (or list) of variant names, checked against ``known``; empty means all."""
    if not text:
        return list(known)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def mb(n_bytes: float) -> float:
    return round(n_bytes / 2**20, 1)


def machine_info() -> dict:
    import importlib.metadata as md

    def version(pkg: str) -> str | None:
        try:
            return md.version(pkg)
        except md.PackageNotFoundError:
            return None

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in ("torch", "transformers", "trl", "peft", "bitsandbytes", "lifealign-lite")},
    }


def run_child(variant: str, options: dict, timeout: float, log: Callable[[str], None] | None = None, verbose: bool = False) -> dict:
    """Run ``VARIANT`` in a fresh interpreter (:mod:`lifealign_lite.bench.child`) and return its JSON (or an ``ok: false`` record on failure)."""
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-") as tmp:
        out = Path(tmp) / "result.json"
        logfile = Path(tmp) / "child.log"
        cmd = [sys.executable, "-m", "lifealign_lite.bench.child", variant, "--out", str(out), "--options", json.dumps(options)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        with open(logfile, "w") as fh:
            sink = (sys.__stderr__ or fh) if verbose else fh  # verbose: the child's output on the real stderr, never stdout
            rc = _wait_child(subprocess.Popen(cmd, stdout=sink, stderr=sink, env=env), variant, timeout, t0, log)
        elapsed = round(time.perf_counter() - t0, 2)
        tail = logfile.read_text(errors="replace")[-3000:] if logfile.exists() else ""
        if out.is_file():
            result = json.loads(out.read_text())
        else:
            why = f"timed out after {timeout:.0f} s" if rc is None else f"exited with code {rc} without a result"
            result = {"ok": False, "variant": variant, "error": why}
        if not result.get("ok"):
            result.setdefault("log_tail", tail)
        result["process_s"] = elapsed
        if log:
            log(f"{variant}: {'ok' if result.get('ok') else 'FAILED: ' + str(result.get('error'))} ({elapsed:.1f} s)")
        return result


def _wait_child(proc: subprocess.Popen, variant: str, timeout: float, t0: float, log: Callable[[str], None] | None) -> int | None:
    """The child's exit code (None when it ran past ``timeout`` and was killed), with a ``still running`` line for
    ``log`` every ``CHILD_HEARTBEAT_S`` seconds, so a log is never silent for a whole variant."""
    while True:
        left = timeout - (time.perf_counter() - t0)
        try:
            return proc.wait(timeout=max(0.0, min(CHILD_HEARTBEAT_S, left)))
        except subprocess.TimeoutExpired:
            if time.perf_counter() - t0 >= timeout:
                proc.kill()
                proc.wait()
                return None
            if log:
                log(f"{variant}: still running ({time.perf_counter() - t0:.0f} s)")


def child_setup(options: dict, variant: str) -> None:
    """Threads, quiet logs, and the imports every variant needs done before any timer starts.

    Importing transformers, PEFT and TRL takes seconds; without this, the first variant to import lazily
    (lifealign-lite imports PEFT in ``attach_adapters`` and TRL's chat-template helper in ``tokenize_pairs``)
    would have import time counted in its end-to-end wall time while TRL's variants import at the top.
    """
    import logging
    import warnings

    import torch

    if options.get("threads"):
        torch.set_num_threads(int(options["threads"]))
    warnings.filterwarnings("ignore")
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: F401

    if not variant.startswith("chat-"):
        import trl.data_utils  # noqa: F401 - used by tokenize_pairs
    logging.getLogger("transformers").setLevel(logging.ERROR)


def gpu_peak_mb() -> float | None:
    import torch

    return mb(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class PhaseClock:
    """A progress reporter for :func:`train_short_term` that records when each phase starts and last advances."""

    def __init__(self):
        self.started: dict[str, float] = {}
        self.last: dict[str, float] = {}

    def start(self, phase: str, total: int, done: int = 0) -> None:
        self.started[phase] = time.perf_counter()

    def advance(self, phase: str, n: int, metrics: dict) -> None:
        self.last[phase] = time.perf_counter()

    def span(self, phase: str) -> float | None:
        if phase not in self.started:
            return None
        return self.last.get(phase, self.started[phase]) - self.started[phase]


def bench_recipe(options: dict, **extra):
    from lifealign_lite.recipe import load_recipe

    overrides = {
        "model": options.get("model") or "default",
        "quant": "none",
        "batch_size": options["batch_size"],
        "max_length": options["max_length"],
        "lr": options["lr"],
        "lora_r": 8,
        "target_modules": ["q_proj", "v_proj"],
        "max_steps": options.get("steps") or 0,
        "epochs": 1,
        "seed": options.get("seed", 0),
    }
    # the recipe's prompt budget (128) must stay below max_length; shorter max lengths give the prompt half
    overrides["max_prompt_length"] = options.get("max_prompt_length") or min(128, options["max_length"] // 2)
    overrides.update(extra)
    return load_recipe(None, overrides)


def load_bench_pairs(options: dict):
    from lifealign_lite.data import load_pairs

    return load_pairs(options["data"], max_pairs=options["pairs"], seed=options.get("seed", 0))


def load_variant(options: dict, **extra):
    """What every `bench speed` variant starts from: recipe, pairs and the loaded model (load time and memory apart)."""
    from lifealign_lite.model import load_base

    recipe = bench_recipe(options, **extra)
    home = Path(options["home"])
    pairs = load_bench_pairs(options)
    t_load = time.perf_counter()
    base = load_base(recipe.model, home, recipe.quant, autocast_setting=recipe.autocast)
    return recipe, home, pairs, base, time.perf_counter() - t_load, peak_rss_mb(), count_params(base.model)


def round_or_none(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def greedy_generate(model, tokenizer, prompt: str, new_tokens: int) -> tuple[int, float]:
    """Plain greedy ``generate`` (no repetition penalty, no streamer) of exactly ``new_tokens`` tokens: (tokens, seconds)."""
    import torch

    enc = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    device = next(model.parameters()).device
    enc = {k: v.to(device) for k, v in enc.items()}
    t = time.perf_counter()
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                             pad_token_id=tokenizer.pad_token_id)
    return int(out.shape[1] - enc["input_ids"].shape[1]), time.perf_counter() - t


def median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def cli_command() -> list[str]:
    """How to start ``lifealign-lite``: the console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("lifealign-lite")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lifealign_lite.cli.app"]


def help_seconds(repeats: int = 3) -> float:
    """Wall time of ``lifealign-lite --help`` in a fresh process, best of ``repeats``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cli_command() + ["--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return round(min(times), 3)


def check_options(options: dict) -> None:
    """Fail early, in the parent, on settings the recipe refuses (instead of once per child)."""
    from lifealign_lite.recipe import RecipeError

    try:
        bench_recipe(options)
    except RecipeError as exc:
        raise BenchError(str(exc)) from None


def data_path(data: Path | None, pairs: int) -> Path:
    path = Path(data) if data else DEFAULT_DATA
    if not path.is_file():
        raise BenchError(f"{path}: data file not found; pass --data with preference pairs (JSON Lines)")
    if pairs < 1:
        raise BenchError(f"--pairs must be >= 1, got {pairs}")
    return path


def known_variant(variant: str) -> bool:
    """Whether the child can run ``variant`` (a speed variant, quant-MODE or chat-MODE)."""
    return (variant in SPEED_VARIANTS or (variant.startswith("quant-") and variant[6:] in QUANT_MODES)
            or (variant.startswith("chat-") and variant[5:] in CHAT_MODES))
