"""``bench quant``: precision on this machine (what ``--quant auto`` decides): load time, weight footprint, FPO
pairs/s and generation tokens/s for each precision, each in its own process (``harness.py``)."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from ..system import peak_rss_mb
from .harness import (GEN_PROMPT, QUANT_MODES, PhaseClock, bench_recipe, check_options, data_path, greedy_generate, load_bench_pairs,
                      machine_info, mb, parse_variants, rate, ratio, round_or_none, run_child)


def _greedy_tokens_per_s(model, tokenizer, new_tokens: int) -> dict:
    """Greedy generation of exactly ``new_tokens`` tokens after a short warm-up; tokens/s of the timed run."""
    model.eval()
    greedy_generate(model, tokenizer, GEN_PROMPT, 4)
    n, dt = greedy_generate(model, tokenizer, GEN_PROMPT, new_tokens)
    return {"gen_tokens": n, "gen_s": round(dt, 2), "gen_tokens_per_s": rate(n, dt, 2)}


def one_quant(options: dict, mode: str) -> dict:
    """Load time, weight footprint, greedy generation speed and a few FPO steps in one precision."""
    from lifealign_lite.model import attach_adapters, autocast, load_base
    from lifealign_lite.batching import tokenize_pairs
    from lifealign_lite.train import train_short_term

    import torch

    recipe = bench_recipe(options, quant=mode)
    pairs = load_bench_pairs(options)
    t = time.perf_counter()
    # full precision runs as align and chat run it: fp32 weights, bf16 autocast where this CPU measures it faster
    base = load_base(recipe.model, Path(options["home"]), mode, autocast_setting=recipe.autocast)
    load_s = time.perf_counter() - t
    result: dict[str, Any] = {"ok": True, "quant": base.info.quant, "bf16_autocast": base.info.bf16_autocast, "load_s": round(load_s, 2),
                              "footprint_mb": mb(base.model.get_memory_footprint()), "rss_after_load_mb": peak_rss_mb()}
    with autocast(base.info.bf16_autocast):
        result.update(_greedy_tokens_per_s(base.model, base.tokenizer, options["new_tokens"]))
    torch.manual_seed(recipe.seed)
    model = attach_adapters(base, recipe)
    items, _ = tokenize_pairs(pairs, base.tokenizer, recipe.max_length, recipe.max_prompt_length)
    clock = PhaseClock()
    with tempfile.TemporaryDirectory(prefix="lifealign-bench-") as tmp:
        state = train_short_term(model, base.tokenizer, items, recipe, base.info.device, Path(tmp) / "checkpoint", reporter=clock,
                                 bf16_autocast=base.info.bf16_autocast)
    trained = sum(h["pairs"] for h in state.history)
    train_s = state.history[-1]["time"] if state.history else None
    h = state.history
    steady = rate(trained - h[0]["pairs"], h[-1]["time"] - h[0]["time"]) if len(h) >= 2 else None
    result.update({"pairs": len(items), "steps": state.step, "pairs_trained": trained, "reference_s": round_or_none(clock.span("reference")),
                   "train_s": round_or_none(train_s), "train_pairs_per_s": rate(trained, train_s),
                   "train_pairs_per_s_after_first_step": steady})
    return result


def bench_quant(home: Path, data: Path | None = None, pairs: int = 8, steps: int = 0, batch_size: int = 2, new_tokens: int = 64,
                model: str = "default", modes: str | Sequence[str] | None = None, threads: int | None = None, timeout: float = 1800,
                log: Callable[[str], None] | None = None, verbose: bool = False) -> dict:
    """Load time, footprint, FPO pairs/s and generation tokens/s for each precision, each in its own process."""
    path = data_path(data, pairs)
    names = parse_variants(modes, QUANT_MODES)
    options = {"home": str(home), "data": str(path), "pairs": pairs, "steps": steps, "batch_size": batch_size, "max_length": 256,
               "lr": 5e-5, "model": model, "threads": threads, "new_tokens": new_tokens, "seed": 0}
    check_options(options)
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


one_mode = one_quant  # what the harness runs in the child for quant-MODE
