"""Speed and memory benchmarks: ``bench speed``, ``bench quant`` and ``bench chat``.

Each measured variant runs in a fresh Python process (``python -m lifealign_lite.bench.speed _one VARIANT
--options JSON --out FILE``), so ``ru_maxrss`` (peak resident memory) belongs to that variant alone and no
warm cache or allocator state leaks from one variant into the next. The child writes one JSON object to
``--out``; the parent collects them, adds derived figures (ratios, FLOP estimate) and returns one dict.

``bench speed`` compares, on the same model, LoRA (r=8 on q_proj/v_proj), data slice, batch size,
max length and learning rate, end to end from a loaded model to a trained adapter:

* ``trl-default``: TRL's ``DPOTrainer`` with ``DPOConfig`` defaults (gradient checkpointing on, reference
  log-probs computed on the fly with the adapter disabled, bf16 autocast);
* ``trl-tuned``: the same without gradient checkpointing and with ``precompute_ref_log_probs=True``;
* ``lifealign``: this project's own training (:func:`lifealign_lite.train.train_short_term`, FPO loss),
  with a recipe from :func:`lifealign_lite.recipe.load_recipe` and no bank written.

The pure helpers at the top (token counting, ratios, FLOP estimate, result assembly) hold no torch import
and are unit-tested on their own.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..align import peak_rss_mb

REPO = Path(__file__).resolve().parents[2]
DEFAULT_DATA = REPO.parent / "shared" / "data" / "hh-helpful" / "train.jsonl"

SPEED_VARIANTS = ("trl-default", "trl-tuned", "lifealign", "lifealign-unshared")
QUANT_MODES = ("none", "nf4", "int8")
CHAT_MODES = ("merged", "unmerged", "nf4")
SPEED_LABELS = {
    "trl-default": "(a) TRL DPOTrainer, defaults",
    "trl-tuned": "(b) TRL DPOTrainer, tuned",
    "lifealign": "(c) lifealign-lite FPO",
    "lifealign-unshared": "(d) lifealign-lite FPO, prefix_sharing off",
}
GEN_PROMPT = "Explain in a few sentences why the sky is blue."
CHAT_PROMPTS = (
    "What is a good way to learn a new language?",
    "Give me three tips for sleeping better.",
    "How do I make a simple tomato sauce?",
    "Why do leaves change colour in autumn?",
)

# JSON shape of `bench speed` (tests check these)
SPEED_TOP_KEYS = {
    "bench", "machine", "settings", "variants", "ratio_vs_trl_default", "ratio_vs_trl_tuned",
    "train_ratio_vs_trl_default", "train_ratio_vs_trl_tuned", "matmul", "params", "flops_per_token_estimate",
    "share_of_matmul_peak", "ratio_shared_vs_unshared",
}
SPEED_VARIANT_KEYS = {
    "ok", "variant", "label", "wall_s", "phases_s", "pairs", "pairs_trained", "steps", "tokens", "tokens_per_s",
    "pairs_per_s", "train_pairs_per_s", "peak_rss_mb", "rss_after_load_mb", "load_s", "params", "config",
}


class BenchError(RuntimeError):
    """A benchmark that cannot run as asked (missing data, unknown variant)."""


# -- pure helpers (no torch) ------------------------------------------------------------------------------

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


def flops_per_token(params: int) -> dict[str, float]:
    """FLOPs per token of one preference-training pass with a frozen base and a LoRA adapter.

    Dense-transformer rule of thumb: 2 * params for a forward pass, 4 * params for the backward pass, plus
    2 * params for the reference forward (computed once per pair, before or during training): 8 * params.
    (6 * params, without the reference pass, is the usual training estimate: about 0.81 GFLOP/token for
    135M parameters; with the reference pass it is about 1.08.) With a frozen base the backward pass needs
    no weight gradients, only input gradients (about 2 * params, as profiling shows: backward matmuls take
    about as long as forward ones), so ``frozen_base_total`` = 6 * params is the closer figure for LoRA;
    attention's sequence-length term is left out of both.
    """
    return {
        "policy_forward": 2.0 * params,
        "backward": 4.0 * params,
        "reference_forward": 2.0 * params,
        "total": 8.0 * params,
        "frozen_base_total": 6.0 * params,
    }


def share_of_peak(tokens_per_s: float | None, flops_token: float, peak_gflops: float | None) -> float | None:
    """Achieved FLOP rate (tokens/s * FLOPs/token) as a share of the measured matmul rate."""
    if not tokens_per_s or not peak_gflops:
        return None
    return round(tokens_per_s * flops_token / (peak_gflops * 1e9), 4)


def parse_variants(text: str | Sequence[str] | None, known: Sequence[str]) -> list[str]:
    """A comma-separated list (or list) of variant names, checked against ``known``; empty means all."""
    if not text:
        return list(known)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text) if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BenchError(f"unknown variant {', '.join(unknown)}; choose from {', '.join(known)}")
    return list(dict.fromkeys(names))


def summarize_speed(variants: dict[str, dict], matmul: dict | None, settings: dict, machine: dict) -> dict:
    """The ``bench speed`` result: per-variant figures plus ratios of (c) to (a) and (b) and the FLOP share.

    Ratios compare end-to-end pairs/s (``ratio_vs_*``) and train-loop pairs/s (``train_ratio_vs_*``).
    """

    def get(name: str, key: str):
        v = variants.get(name) or {}
        return v.get(key) if v.get("ok") else None

    ours = "lifealign"
    params = next((v["params"] for v in variants.values() if v.get("ok") and v.get("params")), None)
    flops = flops_per_token(params) if params else None
    peak = (matmul or {}).get("best_gflops")
    return {
        "bench": "speed",
        "machine": machine,
        "settings": settings,
        "variants": variants,
        "ratio_vs_trl_default": ratio(get(ours, "pairs_per_s"), get("trl-default", "pairs_per_s")),
        "ratio_vs_trl_tuned": ratio(get(ours, "pairs_per_s"), get("trl-tuned", "pairs_per_s")),
        "train_ratio_vs_trl_default": ratio(get(ours, "train_pairs_per_s"), get("trl-default", "train_pairs_per_s")),
        "train_ratio_vs_trl_tuned": ratio(get(ours, "train_pairs_per_s"), get("trl-tuned", "train_pairs_per_s")),
        "matmul": matmul,
        "params": params,
        "flops_per_token_estimate": flops["total"] if flops else None,
        "flops_per_token_breakdown": flops,
        "share_of_matmul_peak": share_of_peak(get(ours, "tokens_per_s"), flops["total"], peak) if flops else None,
        # (c) / (d): what sharing each pair's prompt between its two responses buys, side by side in one run
        "ratio_shared_vs_unshared": ratio(get(ours, "pairs_per_s"), get("lifealign-unshared", "pairs_per_s")),
    }


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


# -- running one variant in its own process ---------------------------------------------------------------

def run_child(variant: str, options: dict, timeout: float, log: Callable[[str], None] | None = None, verbose: bool = False) -> dict:
    """Run ``_one VARIANT`` in a fresh interpreter and return its JSON (or an ``ok: false`` record on failure)."""
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-") as tmp:
        out = Path(tmp) / "result.json"
        logfile = Path(tmp) / "child.log"
        cmd = [sys.executable, "-m", "lifealign_lite.bench.speed", "_one", variant, "--out", str(out), "--options", json.dumps(options)]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        t0 = time.perf_counter()
        with open(logfile, "w") as fh:
            sink = (sys.__stderr__ or fh) if verbose else fh  # verbose: the child's output on the real stderr, never stdout
            try:
                proc = subprocess.run(cmd, stdout=sink, stderr=sink, env=env, timeout=timeout)
                rc = proc.returncode
            except subprocess.TimeoutExpired:
                rc = None
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


def _child_setup(options: dict, variant: str) -> None:
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


def _gpu_peak_mb() -> float | None:
    import torch

    return mb(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None


def _count_params(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


class _PhaseClock:
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


def _recipe(options: dict, **extra):
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


def _load_pairs(options: dict):
    from lifealign_lite.data import load_pairs

    return load_pairs(options["data"], max_pairs=options["pairs"], seed=options.get("seed", 0))


def _load_variant(options: dict, **extra):
    """What every `bench speed` variant starts from: recipe, pairs and the loaded model (load time and memory apart)."""
    from lifealign_lite.model import load_base

    recipe = _recipe(options, **extra)
    home = Path(options["home"])
    pairs = _load_pairs(options)
    t_load = time.perf_counter()
    base = load_base(recipe.model, home, recipe.quant, autocast_setting=recipe.autocast)
    return recipe, home, pairs, base, time.perf_counter() - t_load, peak_rss_mb(), _count_params(base.model)


def one_speed_lifealign(options: dict, prefix_sharing: str = "auto") -> dict:
    """(c): lifealign-lite's own training, from the loaded model to the saved adapter; (d) the same with
    ``prefix_sharing`` off (each pair's prompt runs once per response)."""
    import torch

    from lifealign_lite.model import attach_adapters, save_adapter
    from lifealign_lite.train import tokenize_pairs, train_short_term

    recipe, home, pairs, base, load_s, rss_loaded, params = _load_variant(options, prefix_sharing=prefix_sharing)

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = attach_adapters(base, recipe)
    t_attach = time.perf_counter()
    items, tstats = tokenize_pairs(pairs, base.tokenizer, recipe.max_length, recipe.max_prompt_length)
    t_tok = time.perf_counter()
    clock = _PhaseClock()
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-") as tmp:
        state = train_short_term(model, base.tokenizer, items, recipe, base.info["device"], Path(tmp) / "checkpoint", reporter=clock,
                                 bf16_autocast=base.info.get("bf16_autocast", False))
        t_trained = time.perf_counter()
        save_adapter(model, Path(tmp) / "adapter")
    t_end = time.perf_counter()

    n_pairs = len(items)
    trained = sum(h["pairs"] for h in state.history)
    tokens = sum(t.tokens for t in items)
    wall = t_end - t0
    train_s = state.history[-1]["time"] if state.history else None
    tokens_trained = tokens * trained / n_pairs if n_pairs else 0
    return {
        "ok": True,
        "wall_s": round(wall, 2),
        "load_s": round(load_s, 2),
        "phases_s": {
            "attach_adapter": round(t_attach - t0, 2),
            "tokenize": round(t_tok - t_attach, 2),
            "reference": _round(clock.span("reference")),
            "train": _round(train_s),
            "save": round(t_end - t_trained, 2),
        },
        "pairs": n_pairs,
        "pairs_trained": trained,
        "steps": state.step,
        "tokens": tokens,
        "tokens_per_s": rate(tokens_trained, wall, 1),
        "pairs_per_s": rate(trained, wall),
        "train_pairs_per_s": rate(trained, train_s),
        "rss_after_load_mb": rss_loaded,
        "params": params,
        "truncated": {"prompts": tstats.truncated_prompts, "responses": tstats.truncated_responses},
        "train_loss": _round(sum(h["loss"] for h in state.history) / len(state.history), 4) if state.history else None,
        "config": {"trainer": "lifealign_lite.train.train_short_term", "loss": recipe.loss, "beta": recipe.beta,
                   "focal_gamma": recipe.focal_gamma, "prefix_sharing": recipe.prefix_sharing, "gradient_checkpointing": False, "reference": "precomputed once (adapter off)",
                   "dtype": base.info["dtype"], "device": base.info["device"], "max_prompt_length": recipe.max_prompt_length,
                   "warmup_ratio": recipe.warmup_ratio, "lora": {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": recipe.lora_dropout,
                                                                  "target_modules": list(recipe.target_modules)}},
    }


def _round(x: float | None, digits: int = 2) -> float | None:
    return None if x is None else round(x, digits)


def one_speed_trl(options: dict, tuned: bool) -> dict:
    """(a) or (b): TRL's DPOTrainer with a PEFT config, from the loaded model to the saved adapter."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lifealign_lite.model import lora_config

    recipe, home, pairs, base, load_s, rss_loaded, params = _load_variant(options)
    timings: dict[str, float] = {}

    class TimedDPOTrainer(DPOTrainer):
        """Only adds timers around TRL's own tokenization and reference precompute."""

        def _prepare_dataset(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._prepare_dataset(*args, **kwargs)
            finally:
                timings["tokenize"] = timings.get("tokenize", 0.0) + time.perf_counter() - t

        def _precompute_ref_logps(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return super()._precompute_ref_logps(*args, **kwargs)
            finally:
                timings["reference"] = timings.get("reference", 0.0) + time.perf_counter() - t

    with tempfile.TemporaryDirectory(prefix="lifealign-bench-trl-") as tmp:
        t0 = time.perf_counter()
        dataset = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs])
        kwargs: dict[str, Any] = dict(
            output_dir=str(Path(tmp) / "out"),
            per_device_train_batch_size=options["batch_size"],
            max_length=options["max_length"],
            learning_rate=options["lr"],
            num_train_epochs=1,
            max_steps=options.get("steps") or -1,
            seed=options.get("seed", 0),
            report_to="none",
            save_strategy="no",
        )
        if not torch.cuda.is_available():
            kwargs["use_cpu"] = True  # TRL's default bf16=True refuses to start on a CPU-only machine without it
        if options.get("trl_bf16") is not None:
            kwargs["bf16"] = bool(options["trl_bf16"])
        if tuned:
            kwargs.update(gradient_checkpointing=False, precompute_ref_log_probs=True)
        args = DPOConfig(**kwargs)
        trainer = TimedDPOTrainer(model=base.model, args=args, train_dataset=dataset, processing_class=base.tokenizer,
                                  peft_config=lora_config(recipe))
        t_init = time.perf_counter()
        out = trainer.train()
        t_trained = time.perf_counter()
        trainer.model.save_pretrained(str(Path(tmp) / "adapter"))
        t_end = time.perf_counter()

    ds = trainer.train_dataset
    lengths = list(zip(map(len, ds["prompt_ids"]), map(len, ds["chosen_ids"]), map(len, ds["rejected_ids"])))
    n_pairs = len(lengths)
    steps = int(out.global_step)
    trained = pairs_in_steps(n_pairs, options["batch_size"], steps)
    tokens = total_tokens(lengths, options["max_length"])
    wall = t_end - t0
    train_s = t_trained - t_init
    return {
        "ok": True,
        "wall_s": round(wall, 2),
        "load_s": round(load_s, 2),
        "phases_s": {
            "tokenize": _round(timings.get("tokenize")),
            "reference": _round(timings.get("reference")) if tuned else "inside train",
            "trainer_init_other": round(t_init - t0 - timings.get("tokenize", 0.0) - timings.get("reference", 0.0), 2),
            "train": round(train_s, 2),
            "save": round(t_end - t_trained, 2),
        },
        "pairs": n_pairs,
        "pairs_trained": trained,
        "steps": steps,
        "tokens": tokens,
        "tokens_per_s": rate(tokens * trained / n_pairs if n_pairs else 0, wall, 1),
        "pairs_per_s": rate(trained, wall),
        "train_pairs_per_s": rate(trained, train_s),
        "trl_train_samples_per_second": out.metrics.get("train_samples_per_second"),
        "rss_after_load_mb": rss_loaded,
        "params": params,
        "pairs_dropped": len(pairs) - n_pairs,  # prompts that alone fill max_length (TRL drops them; lifealign-lite truncates)
        "train_loss": _round(out.training_loss, 4),
        "config": {"trainer": "trl.DPOTrainer", "loss": "sigmoid (DPO)", "gradient_checkpointing": bool(args.gradient_checkpointing),
                   "precompute_ref_log_probs": bool(args.precompute_ref_log_probs), "bf16": bool(args.bf16), "use_cpu": bool(args.use_cpu),
                   "beta": args.beta, "lr_scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)), "warmup": args.warmup_steps,
                   "dtype": base.info["dtype"], "device": str(args.device),
                   "lora": {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": recipe.lora_dropout, "target_modules": list(recipe.target_modules)}},
    }


def matmul_gflops(n: int = 2048, repeats: int = 5) -> dict:
    """This machine's fp32 matrix-multiply rate: ``torch.mm`` of two n x n matrices, best and median of ``repeats``."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    torch.mm(a, b, out=c)  # warm-up
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        torch.mm(a, b, out=c)
        times.append(time.perf_counter() - t)
    flops = 2.0 * n**3
    result = {"n": n, "repeats": len(times), "threads": torch.get_num_threads(),
              "best_gflops": round(flops / min(times) / 1e9, 1), "median_gflops": round(flops / statistics.median(times) / 1e9, 1)}
    # bf16, for reference only: CPUs with AVX512-BF16 or AMX multiply bf16 several times faster than fp32, and
    # TRL's default bf16 autocast uses it while lifealign-lite trains in fp32 on a CPU
    try:
        a16, b16 = a.to(torch.bfloat16), b.to(torch.bfloat16)
        torch.mm(a16, b16)
        times16 = []
        for _ in range(max(1, repeats)):
            t = time.perf_counter()
            torch.mm(a16, b16)
            times16.append(time.perf_counter() - t)
        result["bf16_best_gflops"] = round(flops / min(times16) / 1e9, 1)
    except RuntimeError:
        result["bf16_best_gflops"] = None
    return result


# -- quant: precision on this machine ----------------------------------------------------------------------

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


def _greedy_tokens_per_s(model, tokenizer, new_tokens: int) -> dict:
    """Greedy generation of exactly ``new_tokens`` tokens after a short warm-up; tokens/s of the timed run."""
    model.eval()
    greedy_generate(model, tokenizer, GEN_PROMPT, 4)
    n, dt = greedy_generate(model, tokenizer, GEN_PROMPT, new_tokens)
    return {"gen_tokens": n, "gen_s": round(dt, 2), "gen_tokens_per_s": rate(n, dt, 2)}


def one_quant(options: dict, mode: str) -> dict:
    """Load time, weight footprint, greedy generation speed and a few FPO steps in one precision."""
    from lifealign_lite.model import attach_adapters, autocast, load_base
    from lifealign_lite.train import tokenize_pairs, train_short_term

    import torch

    recipe = _recipe(options, quant=mode)
    pairs = _load_pairs(options)
    t = time.perf_counter()
    # full precision runs as align and chat run it: fp32 weights, bf16 autocast where this CPU measures it faster
    base = load_base(recipe.model, Path(options["home"]), mode, autocast_setting=recipe.autocast)
    load_s = time.perf_counter() - t
    result: dict[str, Any] = {"ok": True, "quant": base.info["quant"], "bf16_autocast": base.info["bf16_autocast"], "load_s": round(load_s, 2),
                              "footprint_mb": mb(base.model.get_memory_footprint()), "rss_after_load_mb": peak_rss_mb()}
    with autocast(base.info["bf16_autocast"]):
        result.update(_greedy_tokens_per_s(base.model, base.tokenizer, options["new_tokens"]))
    torch.manual_seed(recipe.seed)
    model = attach_adapters(base, recipe)
    items, _ = tokenize_pairs(pairs, base.tokenizer, recipe.max_length, recipe.max_prompt_length)
    clock = _PhaseClock()
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-") as tmp:
        state = train_short_term(model, base.tokenizer, items, recipe, base.info["device"], Path(tmp) / "checkpoint", reporter=clock,
                                 bf16_autocast=base.info.get("bf16_autocast", False))
    trained = sum(h["pairs"] for h in state.history)
    train_s = state.history[-1]["time"] if state.history else None
    h = state.history
    steady = rate(trained - h[0]["pairs"], h[-1]["time"] - h[0]["time"]) if len(h) >= 2 else None
    result.update({"pairs": len(items), "steps": state.step, "pairs_trained": trained, "reference_s": _round(clock.span("reference")),
                   "train_s": _round(train_s), "train_pairs_per_s": rate(trained, train_s),
                   "train_pairs_per_s_after_first_step": steady})
    return result


# -- chat: latency with an adapter ---------------------------------------------------------------------

def make_random_adapter(home: Path, folder: Path, model_spec: str = "default", r: int = 16, seed: int = 0, scale: float = 0.01) -> Path:
    """A non-zero LoRA (r=16 on q_proj/v_proj) saved as a PEFT folder, standing in for a trained memory."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lifealign_lite.model import _quiet, load_base

    base = load_base(model_spec, home, "none")
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj"], lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")
    gen = torch.Generator().manual_seed(seed)
    with _quiet():
        model = get_peft_model(base.model, cfg, adapter_name="bench")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    model.save_pretrained(str(folder), selected_adapters=["bench"])
    out = Path(folder) / "bench" if (Path(folder) / "bench" / "adapter_config.json").is_file() else Path(folder)
    return out


def bank_domain(bank: Path, domain: str | None) -> str:
    """The bank memory to time: ``domain`` if given, else the first domain, else the core."""
    from lifealign_lite.memory.bank import Bank

    state = Bank(bank).load()
    if domain:
        return domain
    if state.domains:
        return sorted(state.domains)[0]
    if state.core_dir():
        return "core"
    raise BenchError(f"{bank}: the bank holds no adapter yet; align a domain first or leave out --bank")


def one_chat(options: dict, mode: str) -> dict:
    """First-token time and tokens/s of ChatSession.ask with each memory merged, unmerged, or on a 4-bit base.

    Every memory (each domain and the core of ``--bank``, else the random adapter) answers ``repeats`` timed
    prompts after one untimed one; ``switch_ms`` is the median time to make a memory active from another (or
    from base). In ``merged`` mode the same prompts also go through plain transformers ``generate`` of the base
    alone in fp32 (a second copy of it, greedy, exactly ``new_tokens`` tokens), interleaved with the answers so
    both see the same machine load: the anchor.
    """
    from peft import PeftModel

    from lifealign_lite.chat import BASE, ChatSession, open_session
    from lifealign_lite.memory.bank import read_adapter
    from lifealign_lite.model import _quiet, load_base

    quant = "nf4" if mode == "nf4" else "none"
    merge = mode != "unmerged"
    home = Path(options["home"])
    t = time.perf_counter()
    if options.get("bank"):
        session = open_session(Path(options["bank"]), home, _recipe(options, quant=quant), domain=options["domain"], merge=merge)
        memories = session.available()[:-1]  # every domain and the core, not base
    else:
        base = load_base(options.get("model") or "default", home, quant)
        session = ChatSession(model=base.model.eval(), tokenizer=base.tokenizer, state=None, domain="bench", threshold=0.0,
                              embedder_factory=lambda: None, merge=merge)
        if merge and quant == "none":
            session.updates = {"bench": read_adapter(Path(options["adapter"]))[0]}
        else:
            with _quiet():
                session.model = PeftModel.from_pretrained(base.model, options["adapter"], adapter_name="bench").eval()
        memories = ["bench"]
    load_s = time.perf_counter() - t
    anchor = load_base(options.get("model") or "default", home, "none") if mode == "merged" else None
    if anchor is not None:
        greedy_generate(anchor.model.eval(), anchor.tokenizer, GEN_PROMPT, 4)  # warm-up, as the untimed first answer
    prompts = list(CHAT_PROMPTS)
    per_memory, anchor_rates, first_ask = {}, [], None
    for memory in memories:
        session.domain = memory
        turns = []
        for i in range(1 + max(1, options["repeats"])):
            turn = session.ask(prompts[i % len(prompts)], max_new_tokens=options["new_tokens"], keep_history=False)
            decode = rate(max(turn.tokens - 1, 0), turn.seconds - turn.first_token_s, 2)
            turns.append({"first_token_s": round(turn.first_token_s, 3), "tokens": turn.tokens, "seconds": round(turn.seconds, 2),
                          "tokens_per_s": rate(turn.tokens, turn.seconds, 2), "decode_tokens_per_s": decode})
            if anchor is not None and i > 0:
                anchor_rates.append(rate(*greedy_generate(anchor.model, anchor.tokenizer, prompts[i % len(prompts)], options["new_tokens"]), 2))
        first_ask = first_ask or turns[0]
        timed = turns[1:]  # the first ask also merges the adapter (and warms up)
        per_memory[memory] = {"first_token_s": round(statistics.median(x["first_token_s"] for x in timed), 3),
                              "tokens_per_s": _median([x["tokens_per_s"] for x in timed]),
                              "decode_tokens_per_s": _median([x["decode_tokens_per_s"] for x in timed]), "turns": timed}
    switches = []
    for memory in memories * 3:
        session._activate(next((m for m in memories if m != memory), BASE))
        t = time.perf_counter()
        session._activate(memory)
        switches.append((time.perf_counter() - t) * 1e3)
    slowest = min(per_memory, key=lambda m: per_memory[m]["tokens_per_s"] or 0.0)
    return {
        "ok": True, "mode": mode, "quant": quant, "merged": merge, "memory": options.get("domain") or "random adapter",
        "load_s": round(load_s, 2),
        "first_ask": first_ask,
        "slowest_memory": slowest,
        **{k: per_memory[slowest][k] for k in ("first_token_s", "tokens_per_s", "decode_tokens_per_s", "turns")},
        "memories": {m: {k: v for k, v in r.items() if k != "turns"} for m, r in per_memory.items()},
        "switch_ms": round(statistics.median(switches), 2),
        "transformers_tokens_per_s": _median(anchor_rates) if anchor_rates else None,
        "footprint_mb": mb(session.model.get_memory_footprint()) if hasattr(session.model, "get_memory_footprint") else None,
    }


def _median(xs: list) -> float | None:
    xs = [x for x in xs if x is not None]
    return round(statistics.median(xs), 2) if xs else None


def cli_command() -> list[str]:
    """How to start ``lifealign-lite``: the console script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("lifealign-lite")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "lifealign_lite.cli.app"]


def cold_start(home: Path, bank: Path, domain: str, prompt: str, new_tokens: int, timeout: float, threads: int | None = None,
               model: str = "default") -> dict:
    """Time ``lifealign-lite chat --prompt`` from process start to first answer byte and to exit."""
    cmd = cli_command() + ["chat", "--prompt", prompt, "--domain", domain, "--bank", str(bank), "--max-new-tokens", str(new_tokens)]
    cmd += [] if model == "default" else ["--model", model]
    env = dict(os.environ, LIFEALIGN_HOME=str(home), PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = None
    try:
        chunk = proc.stdout.read(1)
        if chunk:
            first = time.perf_counter() - t0
        rest, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"ok": False, "error": f"timed out after {timeout:.0f} s", "command": cmd}
    total = time.perf_counter() - t0
    answer = (chunk + rest).decode(errors="replace").strip()
    ok = proc.returncode == 0
    res = {"ok": ok, "domain": domain, "first_output_s": _round(first), "total_s": round(total, 2), "answer_chars": len(answer),
           "command": shlex.join(cmd)}
    if not ok:
        res["error"] = f"exit code {proc.returncode}: {err.decode(errors='replace')[-1500:]}"
    return res


# -- the three benchmarks (parent side) ------------------------------------------------------------------

def _check_options(options: dict) -> None:
    """Fail early, in the parent, on settings the recipe refuses (instead of once per child)."""
    from lifealign_lite.recipe import RecipeError

    try:
        _recipe(options)
    except RecipeError as exc:
        raise BenchError(str(exc)) from None


def _data_options(data: Path | None, pairs: int) -> Path:
    path = Path(data) if data else DEFAULT_DATA
    if not path.is_file():
        raise BenchError(f"{path}: data file not found; pass --data with preference pairs (JSON Lines)")
    if pairs < 1:
        raise BenchError(f"--pairs must be >= 1, got {pairs}")
    return path


def bench_speed(home: Path, data: Path | None = None, pairs: int = 40, steps: int = 0, batch_size: int = 2, max_length: int = 256,
                lr: float = 5e-5, model: str = "default", variants: str | Sequence[str] | None = None, threads: int | None = None,
                matmul_size: int = 2048, matmul_repeats: int = 5, timeout: float = 3600, log: Callable[[str], None] | None = None,
                verbose: bool = False, trl_bf16: bool | None = None) -> dict:
    """(a) TRL defaults, (b) TRL tuned and (c) lifealign-lite, each in its own process, plus this CPU's matmul rate.

    ``trl_bf16`` None keeps TRL's own default for both TRL variants (bf16 autocast, with ``use_cpu`` on a
    machine without CUDA); False runs them in fp32 like lifealign-lite.
    """
    path = _data_options(data, pairs)
    names = parse_variants(variants, SPEED_VARIANTS)
    options = {"home": str(home), "data": str(path), "pairs": pairs, "steps": steps, "batch_size": batch_size,
               "max_length": max_length, "lr": lr, "model": model, "threads": threads, "seed": 0, "trl_bf16": trl_bf16}
    _check_options(options)
    log = log or (lambda s: None)
    import torch

    if threads:
        torch.set_num_threads(threads)
    log(f"fp32 matmul {matmul_size}x{matmul_size} ...")
    mm = matmul_gflops(matmul_size, matmul_repeats)
    log(f"fp32 matmul: {mm['best_gflops']} GFLOP/s (best of {mm['repeats']})")
    results = {}
    for name in names:
        log(f"running {name} ({SPEED_LABELS[name]}) in its own process ...")
        res = run_child(name, options, timeout, log, verbose)
        res.update(variant=name, label=SPEED_LABELS[name])
        results[name] = res
    settings = {k: v for k, v in options.items() if k not in ("home",)} | {
        "lora": {"r": 8, "alpha": 16, "target_modules": ["q_proj", "v_proj"]},
        "steps_rule": "steps or ceil(pairs / batch_size) (one epoch)",
        "torch_threads": threads or torch.get_num_threads(),
    }
    return summarize_speed(results, mm, settings, machine_info())


def bench_quant(home: Path, data: Path | None = None, pairs: int = 8, steps: int = 0, batch_size: int = 2, new_tokens: int = 64,
                model: str = "default", modes: str | Sequence[str] | None = None, threads: int | None = None, timeout: float = 1800,
                log: Callable[[str], None] | None = None, verbose: bool = False) -> dict:
    """Load time, footprint, FPO pairs/s and generation tokens/s for each precision, each in its own process."""
    path = _data_options(data, pairs)
    names = parse_variants(modes, QUANT_MODES)
    options = {"home": str(home), "data": str(path), "pairs": pairs, "steps": steps, "batch_size": batch_size, "max_length": 256,
               "lr": 5e-5, "model": model, "threads": threads, "new_tokens": new_tokens, "seed": 0}
    _check_options(options)
    results = {}
    for mode in names:
        (log or (lambda s: None))(f"quant {mode} in its own process ...")
        results[mode] = run_child(f"quant-{mode}", options, timeout, log, verbose) | {"quant": mode}
    base = results.get("none", {})
    for mode, res in results.items():
        if res.get("ok") and base.get("ok"):
            res["train_speed_vs_none"] = ratio(res.get("train_pairs_per_s"), base.get("train_pairs_per_s"))
            res["gen_speed_vs_none"] = ratio(res.get("gen_tokens_per_s"), base.get("gen_tokens_per_s"))
            res["footprint_vs_none"] = ratio(res.get("footprint_mb"), base.get("footprint_mb"))
    return {"bench": "quant", "machine": machine_info(), "settings": {k: v for k, v in options.items() if k != "home"}, "modes": results}


def bench_chat(home: Path, bank: Path | None = None, domain: str | None = None, model: str = "default", new_tokens: int = 64,
               repeats: int = 3, cold_repeats: int = 2, prompt: str = CHAT_PROMPTS[0], modes: str | Sequence[str] | None = None,
               threads: int | None = None, timeout: float = 1800, log: Callable[[str], None] | None = None, verbose: bool = False) -> dict:
    """Chat latency with an adapter merged, unmerged and on a 4-bit base, plus the CLI's cold start."""
    log = log or (lambda s: None)
    names = parse_variants(modes, CHAT_MODES)
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-chat-") as tmp:
        options: dict[str, Any] = {"home": str(home), "model": model, "new_tokens": new_tokens, "repeats": repeats, "threads": threads,
                                   "batch_size": 2, "max_length": 256, "lr": 5e-5, "seed": 0}
        if bank:
            options.update(bank=str(bank), domain=bank_domain(Path(bank), domain))
            memory = f"bank {bank}, memory {options['domain']}"
        else:
            log("creating a random LoRA adapter (r=16, q_proj/v_proj) ...")
            options["adapter"] = str(make_random_adapter(home, Path(tmp) / "adapter", model))
            memory = "random non-zero LoRA r=16 on q_proj,v_proj"
        results = {}
        for mode in names:
            log(f"chat {mode} in its own process ...")
            results[mode] = run_child(f"chat-{mode}", options, timeout, log, verbose) | {"mode": mode}
        cold_domain = options.get("domain")
        cold = []
        if not bank and cold_repeats > 0:
            log("cold start skipped: `lifealign-lite chat` needs a bank (pass --bank)")
        for i in range(max(0, cold_repeats) if bank else 0):
            log(f"cold start {i + 1}/{cold_repeats}: lifealign-lite chat --prompt ... --domain {cold_domain}")
            cold.append(cold_start(home, Path(bank), cold_domain, prompt, new_tokens, timeout, threads, model))
    ok = [c for c in cold if c.get("ok")]
    merged, unmerged = results.get("merged", {}), results.get("unmerged", {})
    ours = merged if merged.get("ok") else {}
    first_output = min((c["first_output_s"] for c in ok if c.get("first_output_s") is not None), default=None)
    log("timing lifealign-lite --help ...")
    return {
        "bench": "chat", "machine": machine_info(),
        "settings": {"model": model, "memory": memory, "new_tokens": new_tokens, "repeats": repeats, "threads": threads},
        "tokens_per_s": ours.get("tokens_per_s"),
        "transformers_tokens_per_s": ours.get("transformers_tokens_per_s"),
        "ratio_vs_transformers": ratio(ours.get("tokens_per_s"), ours.get("transformers_tokens_per_s")),
        "first_token_s": ours.get("first_token_s"),
        "switch_ms": ours.get("switch_ms"),
        "cold_start_first_token_s": first_output,
        "help_s": help_seconds(),
        "modes": results,
        "merged_vs_unmerged_tokens_per_s": ratio(merged.get("tokens_per_s"), unmerged.get("tokens_per_s")) if merged.get("ok") and unmerged.get("ok") else None,
        "cold_start": {"domain": cold_domain, "runs": cold, "best_total_s": min((c["total_s"] for c in ok), default=None),
                       "best_first_output_s": first_output},
    }


def help_seconds(repeats: int = 3) -> float:
    """Wall time of ``lifealign-lite --help`` in a fresh process, best of ``repeats``."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        subprocess.run(cli_command() + ["--help"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
        times.append(time.perf_counter() - t)
    return round(min(times), 3)


# -- the child entry point -----------------------------------------------------------------------------

def known_variant(variant: str) -> bool:
    """Whether ``_one`` can run ``variant`` (a speed variant, quant-MODE or chat-MODE)."""
    return (variant in SPEED_VARIANTS or (variant.startswith("quant-") and variant[6:] in QUANT_MODES)
            or (variant.startswith("chat-") and variant[5:] in CHAT_MODES))


def _run_one(variant: str, options: dict) -> dict:
    if not known_variant(variant):
        raise BenchError(f"unknown variant {variant!r}")
    _child_setup(options, variant)
    if variant in ("lifealign", "lifealign-unshared"):
        res = one_speed_lifealign(options, "off" if variant == "lifealign-unshared" else "auto")
    elif variant in ("trl-default", "trl-tuned"):
        res = one_speed_trl(options, tuned=variant == "trl-tuned")
    elif variant.startswith("quant-") and variant[6:] in QUANT_MODES:
        res = one_quant(options, variant[6:])
    elif variant.startswith("chat-") and variant[5:] in CHAT_MODES:
        res = one_chat(options, variant[5:])
    else:
        raise BenchError(f"unknown variant {variant!r}")
    import torch

    res.update(peak_rss_mb=peak_rss_mb(), gpu_peak_mb=_gpu_peak_mb(), torch_threads=torch.get_num_threads())
    return res


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lifealign_lite.bench.speed", description="Run one benchmark variant (used by `lifealign-lite bench`).")
    sub = parser.add_subparsers(dest="cmd", required=True)
    one = sub.add_parser("_one", help="run one variant in this process and write its JSON")
    one.add_argument("variant")
    one.add_argument("--options", required=True, help="JSON object of options")
    one.add_argument("--out", required=True, type=Path)
    args = parser.parse_args(argv)
    options = json.loads(args.options)
    t0 = time.perf_counter()
    try:
        result = _run_one(args.variant, options)
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which keeps going with the other variants
        result = {"ok": False, "variant": args.variant, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
                  "traceback": traceback.format_exc()[-4000:], "peak_rss_mb": peak_rss_mb()}
    result["child_s"] = round(time.perf_counter() - t0, 2)
    args.out.write_text(json.dumps(result))
    return 0 if result.get("ok") else 1


if __name__ == "__main__":
    sys.exit(main())
