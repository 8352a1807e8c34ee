"""``align``: validate the data, train the short-term adapter with FPO, save it with a run summary in the bank."""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from .data import DataError, Pair, load_pairs, pairs_hash, validate_domain_name
from .model import attach_adapters, load_base, save_adapter
from .recipe import Recipe
from .train import tokenize_pairs, train_short_term


class AlignError(RuntimeError):
    """align cannot run as asked (for example: nothing to resume)."""


@dataclass
class AlignResult:
    run_dir: Path
    summary: dict


def pick_domain(pairs: list[Pair], domain: str | None, path: Path) -> str:
    """The task's domain: the flag, else the one every line names, else ``general``."""
    if domain:
        return validate_domain_name(domain)
    named = sorted({p.domain for p in pairs if p.domain})
    if len(named) > 1:
        raise DataError([f"{path}: lines name several domains ({', '.join(named)}); pass --domain NAME or split the file by domain"])
    return named[0] if named else "general"


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _find_resumable(runs: Path, domain: str, data_hash: str) -> Path:
    for run in sorted(runs.glob(f"*-{domain}"), reverse=True):
        meta = run / "run.json"
        if (run / "checkpoint" / "state.json").is_file() and not (run / "summary.json").exists() and meta.is_file():
            if json.loads(meta.read_text()).get("data_hash") == data_hash:
                return run
    raise AlignError(f"nothing to resume for domain {domain!r} with this data in {runs}; run align without --resume")


def align(
    data_path: Path,
    recipe: Recipe,
    home: Path,
    bank_dir: Path,
    domain: str | None = None,
    resume: bool = False,
    reporter=None,
) -> AlignResult:
    """Align the base model to the pairs in ``data_path`` into a short-term LoRA under ``bank_dir/runs``."""
    t_start = time.perf_counter()
    data_path = Path(data_path)
    pairs = load_pairs(data_path, max_pairs=recipe.max_pairs or None, seed=recipe.seed)
    domain = pick_domain(pairs, domain, data_path)
    data_hash = pairs_hash(pairs)

    runs = Path(bank_dir) / "runs"
    if resume:
        run_dir = _find_resumable(runs, domain, data_hash)
    else:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        run_dir = runs / f"{stamp}-{domain}"

    base = load_base(recipe.model, home, recipe.quant, trust_remote_code=recipe.trust_remote_code)
    t_loaded = time.perf_counter()
    model = attach_adapters(base, recipe)
    items, tstats = tokenize_pairs(pairs, base.tokenizer, recipe.max_length, recipe.max_prompt_length)
    t_tokenized = time.perf_counter()

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "run.json").write_text(json.dumps({"domain": domain, "data": str(data_path), "data_hash": data_hash, "recipe": recipe.to_dict()}, indent=2))
    state = train_short_term(model, base.tokenizer, items, recipe, base.info["device"], run_dir / "checkpoint", resume=resume, reporter=reporter)
    t_trained = time.perf_counter()
    save_adapter(model, run_dir / "adapter")

    train_time = sum(h["time"] for h in state.history[-1:]) if state.history else 0.0
    trained_pairs = sum(h["pairs"] for h in state.history)
    summary = {
        "domain": domain,
        "data": str(data_path),
        "data_hash": data_hash,
        "pairs": len(pairs),
        "truncated_prompts": tstats.truncated_prompts,
        "truncated_responses": tstats.truncated_responses,
        "steps": state.step,
        "sft_warmup_steps": state.sft_step,
        "trained_pairs": trained_pairs,
        "reward_acc_start": state.window("acc", first=True),
        "reward_acc_end": state.window("acc", first=False),
        "loss_start": state.window("loss", first=True),
        "loss_end": state.window("loss", first=False),
        "model": base.info,
        "recipe": recipe.to_dict(),
        "timings_s": {
            "load_model": round(t_loaded - t_start, 2),
            "tokenize": round(t_tokenized - t_loaded, 2),
            "reference_and_train": round(t_trained - t_tokenized, 2),
            "train_loop": round(train_time, 2),
            "total": round(time.perf_counter() - t_start, 2),
        },
        "pairs_per_s": round(trained_pairs / train_time, 3) if train_time else None,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "adapter": str(run_dir / "adapter"),
    }
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return AlignResult(run_dir=run_dir, summary=summary)
