"""``bench speed``: training speed and memory against TRL's DPOTrainer.

Each variant runs in its own process (``harness.py``); the parent collects their results, adds derived figures
(ratios, FLOP estimate) and returns one dict.

``bench speed`` compares, on the same model, LoRA (r=8 on q_proj/v_proj), data slice, batch size,
max length and learning rate, end to end from a loaded model to a trained adapter:

* ``trl-default``: TRL's ``DPOTrainer`` with ``DPOConfig`` defaults (gradient checkpointing on, reference
  log-probs computed on the fly with the adapter disabled, bf16 autocast);
* ``trl-tuned``: the same without gradient checkpointing and with ``precompute_ref_log_probs=True``;
* ``lifealign``: this project's own training (:func:`lifealign_lite.train.train_short_term`, FPO loss),
  with a recipe from :func:`lifealign_lite.recipe.load_recipe` and no bank written.

The pure helpers (FLOP estimate, result assembly) hold no torch import and are unit-tested on their own; the helpers
every benchmark shares are in ``harness.py``.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from .harness import (PhaseClock, SPEED_VARIANTS, check_options, data_path, load_variant, machine_info, pairs_in_steps, parse_variants, rate,
                      ratio, round_or_none, run_child, total_tokens)

# JSON shape of `bench speed` (tests check these)
SPEED_LABELS = {
    "trl-default": "(a) TRL DPOTrainer, defaults",
    "trl-tuned": "(b) TRL DPOTrainer, tuned",
    "lifealign": "(c) lifealign-lite FPO",
    "lifealign-unshared": "(d) lifealign-lite FPO, prefix_sharing off",
}


SPEED_TOP_KEYS = {
    "bench", "machine", "settings", "variants", "ratio_vs_trl_default", "ratio_vs_trl_tuned",
    "train_ratio_vs_trl_default", "train_ratio_vs_trl_tuned", "matmul", "params", "flops_per_token_estimate",
    "share_of_matmul_peak", "ratio_shared_vs_unshared",
}


SPEED_VARIANT_KEYS = {
    "ok", "variant", "label", "wall_s", "phases_s", "pairs", "pairs_trained", "steps", "tokens", "tokens_per_s",
    "pairs_per_s", "train_pairs_per_s", "peak_rss_mb", "rss_after_load_mb", "load_s", "params", "config",
}


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


def one_speed_lifealign(options: dict, prefix_sharing: str = "auto") -> dict:
    """(c): lifealign-lite's own training, from the loaded model to the saved adapter; (d) the same with
    ``prefix_sharing`` off (each pair's prompt runs once per response)."""
    import torch

    from lifealign_lite.model import attach_adapters, save_adapter
    from lifealign_lite.batching import tokenize_pairs
    from lifealign_lite.train import train_short_term

    recipe, home, pairs, base, load_s, rss_loaded, params = load_variant(options, prefix_sharing=prefix_sharing)

    t0 = time.perf_counter()
    torch.manual_seed(recipe.seed)
    model = attach_adapters(base, recipe)
    t_attach = time.perf_counter()
    items, tstats = tokenize_pairs(pairs, base.tokenizer, recipe.max_length, recipe.max_prompt_length)
    t_tok = time.perf_counter()
    clock = PhaseClock()
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-") as tmp:
        state = train_short_term(model, base.tokenizer, items, recipe, base.info.device, Path(tmp) / "checkpoint", reporter=clock,
                                 bf16_autocast=base.info.bf16_autocast)
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
            "reference": round_or_none(clock.span("reference")),
            "train": round_or_none(train_s),
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
        "train_loss": round_or_none(sum(h["loss"] for h in state.history) / len(state.history), 4) if state.history else None,
        "config": {"trainer": "lifealign_lite.train.train_short_term", "loss": recipe.loss, "beta": recipe.beta,
                   "focal_gamma": recipe.focal_gamma, "prefix_sharing": recipe.prefix_sharing, "gradient_checkpointing": False, "reference": "precomputed once (adapter off)",
                   "dtype": base.info.dtype, "device": base.info.device, "max_prompt_length": recipe.max_prompt_length,
                   "warmup_ratio": recipe.warmup_ratio, "lora": {"r": recipe.lora_r, "alpha": recipe.lora_alpha, "dropout": recipe.lora_dropout,
                                                                  "target_modules": list(recipe.target_modules)}},
    }


def one_speed_trl(options: dict, tuned: bool) -> dict:
    """(a) or (b): TRL's DPOTrainer with a PEFT config, from the loaded model to the saved adapter."""
    import torch
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    from lifealign_lite.model import lora_config

    recipe, home, pairs, base, load_s, rss_loaded, params = load_variant(options)
    timings: dict[str, float] = {}

    def timed(phase: str, method):
        def run(self, *args, **kwargs):
            t = time.perf_counter()
            try:
                return method(self, *args, **kwargs)
            finally:
                timings[phase] = timings.get(phase, 0.0) + time.perf_counter() - t

        return run

    class TimedDPOTrainer(DPOTrainer):
        """Only adds timers around TRL's own tokenization and reference precompute. (A TrainerCallback cannot do it:
        tokenization runs in the constructor and the precompute before the first callback event.)"""

        _prepare_dataset = timed("tokenize", DPOTrainer._prepare_dataset)
        _precompute_ref_logps = timed("reference", DPOTrainer._precompute_ref_logps)

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
            "tokenize": round_or_none(timings.get("tokenize")),
            "reference": round_or_none(timings.get("reference")) if tuned else "inside train",
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
        "train_loss": round_or_none(out.training_loss, 4),
        "config": {"trainer": "trl.DPOTrainer", "loss": "sigmoid (DPO)", "gradient_checkpointing": bool(args.gradient_checkpointing),
                   "precompute_ref_log_probs": bool(args.precompute_ref_log_probs), "bf16": bool(args.bf16), "use_cpu": bool(args.use_cpu),
                   "beta": args.beta, "lr_scheduler": getattr(args.lr_scheduler_type, "value", str(args.lr_scheduler_type)), "warmup": args.warmup_steps,
                   "dtype": base.info.dtype, "device": str(args.device),
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
    # TRL's default bf16 autocast uses it while lifealign-lite trains in fp32 on a CPU. Elsewhere bf16 is emulated
    # (a 2048 x 2048 product ran for over 5 minutes on a 2-core CPU without AVX512): not probed there.
    from ..model import cpu_native_bf16

    if not cpu_native_bf16():
        result["bf16_best_gflops"] = None
        result["bf16_skipped"] = "this CPU has no native bf16 (AVX512-BF16 or AMX): emulated, not probed"
        return result
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


def bench_speed(home: Path, data: Path | None = None, pairs: int = 40, steps: int = 0, batch_size: int = 2, max_length: int = 256,
                lr: float = 5e-5, model: str = "default", variants: str | Sequence[str] | None = None, threads: int | None = None,
                matmul_size: int = 2048, matmul_repeats: int = 5, timeout: float = 3600, log: Callable[[str], None] | None = None,
                verbose: bool = False, trl_bf16: bool | None = None) -> dict:
    """(a) TRL defaults, (b) TRL tuned and (c) lifealign-lite, each in its own process, plus this CPU's matmul rate.

    ``trl_bf16`` None keeps TRL's own default for both TRL variants (bf16 autocast, with ``use_cpu`` on a
    machine without CUDA); False runs them in fp32 like lifealign-lite.
    """
    path = data_path(data, pairs)
    names = parse_variants(variants, SPEED_VARIANTS)
    options = {"home": str(home), "data": str(path), "pairs": pairs, "steps": steps, "batch_size": batch_size,
               "max_length": max_length, "lr": lr, "model": model, "threads": threads, "seed": 0, "trl_bf16": trl_bf16}
    check_options(options)
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


def one_variant(options: dict, variant: str) -> dict:
    """Measure one speed variant in this (child) process."""
    if variant in ("lifealign", "lifealign-unshared"):
        return one_speed_lifealign(options, "off" if variant == "lifealign-unshared" else "auto")
    return one_speed_trl(options, tuned=variant == "trl-tuned")
