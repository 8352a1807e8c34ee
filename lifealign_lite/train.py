"""Short-term training: a fresh LoRA trained with FPO (or DPO) on one task, reference log-probs computed once.

Read top to bottom: the reference log-probs are computed once with the short-term adapter switched off (the model
as it stood when the task began), an optional SFT warm-up on the chosen responses, then the preference loss over
length-grouped batches. Chosen and rejected responses go through the model in one batch (``logprobs.py``), sharing
one pass over their prompt (``prefix.py``; the recipe's ``prefix_sharing``), and the output head runs only on
response tokens. Ctrl-C (or SIGTERM) saves a checkpoint that ``resume`` continues
from (``checkpoint.py``). Tokenizing and batching live in ``batching.py``.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .batching import Tokenized, TokenizeStats, batch_stream, collate, length_grouped_batches, optimizer_steps, tokenize_pairs, trained_indices
from .checkpoint import Interrupted, StopFlag, TrainState, load_checkpoint, save_checkpoint, settle
from .logprobs import pair_logps, reference_logps, score_pairs, sequence_logps
from .losses import preference_loss, sft_loss
from .model import autocast
from .system import pyplot

# The names other modules and tests import from here since before the split.
__all__ = ["Interrupted", "TokenizeStats", "Tokenized", "TrainState", "length_grouped_batches", "pair_logps", "plot_history",
           "reference_logps", "score_pairs", "sequence_logps", "tokenize_pairs", "train_short_term", "trained_indices"]
_collate, _batch_stream = collate, batch_stream


def _lr_lambda(total: int, warmup: int, schedule: str = "linear") -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        left = max(0.0, (total - step) / max(1, total - warmup))  # 1 right after warm-up, 0 at the end
        return 0.5 * (1.0 - math.cos(math.pi * left)) if schedule == "cosine" else left

    return f


def train_short_term(
    model,
    tokenizer,
    items: Sequence[Tokenized],
    recipe,
    device,
    checkpoint_dir: Path,
    resume: bool = False,
    reporter=None,
    bf16_autocast: bool = False,
    regularizer: Callable[[], torch.Tensor] | None = None,
    log_path: Path | None = None,
) -> TrainState:
    """Train the ``short`` LoRA of ``model`` on ``items`` with the recipe's preference loss.

    ``bf16_autocast`` runs the forward passes (reference included, so both sides of the margin match) in bf16
    over the fp32 weights: about 1.7x faster on CPUs with native bf16 (docs/PERFORMANCE.md). Autocast is
    entered per forward pass: it caches its bf16 copies of trainable weights until its context exits, so a
    context around several optimizer steps would keep training on stale weights.

    ``regularizer`` (optional) returns a penalty added to the loss once per optimizer step (EWC, O-LoRA:
    ``regularize.py``); its value is recorded as ``reg`` in the step metrics.

    ``reporter`` (optional) gets ``start(phase, total)``, ``advance(phase, n, metrics)`` calls for a progress display.

    ``log_path`` (optional) gets one JSON line per optimizer step (step, loss, acc, margin, pairs, time, lr), written
    as the step ends, so a running job can be followed; a resumed run rewrites it from the checkpoint's history.
    """
    torch.manual_seed(recipe.seed)
    pad_id = tokenizer.pad_token_id
    total, _ = optimizer_steps(len(items), recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = int(recipe.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup, recipe.lr_schedule))
    loss_fn = preference_loss(recipe.loss, recipe.beta, recipe.focal_gamma)
    report = reporter or _NullReporter()

    ckpt = Path(checkpoint_dir)
    used = trained_indices(items, recipe, total)
    if resume and (settle(ckpt) / "state.json").is_file():
        state, ref = load_checkpoint(ckpt, model, optimizer, scheduler)
    else:
        state = TrainState()
        report.start("reference", len(used))
        # only the pairs the steps will see need reference log-probs (max_steps may stop before the end of the data)
        sub = reference_logps(model, [items[i] for i in used], pad_id, device, progress=lambda n: report.advance("reference", n, {}),
                              bf16_autocast=bf16_autocast, bare=recipe.reference == "base", prefix_sharing=recipe.prefix_sharing)
        ref = {k: torch.zeros(len(items), dtype=v.dtype).index_copy(0, torch.tensor(used, dtype=torch.long), v) for k, v in sub.items()}
    state.ref, state.trained = ref, used

    model.train()
    log = _StepLog(log_path, state.history)
    with StopFlag(), log:
        try:
            if state.sft_step < recipe.sft_warmup_steps:
                _sft_warmup(model, items, recipe, device, pad_id, state, report, bf16_autocast)
            report.start("train", total, state.step)
            stream = batch_stream(items, recipe, state.step * recipe.grad_accum)
            # a resumed run continues the clock, so "time" stays the training time of every step so far
            t0 = time.perf_counter() - (state.history[-1]["time"] if state.history else 0.0)
            while state.step < total:
                metrics = {"loss": 0.0, "acc": 0.0, "margin": 0.0, "pairs": 0}
                if regularizer is not None:
                    reg = regularizer()
                    reg.backward()
                    metrics["reg"] = reg.item()
                for _ in range(recipe.grad_accum):
                    idx = next(stream)
                    batch = [items[i] for i in idx]
                    with autocast(bf16_autocast):
                        pc, pr, _, _ = pair_logps(model, batch, pad_id, device, prefix_sharing=recipe.prefix_sharing)
                    out = loss_fn(pc, pr, ref["chosen"][idx].to(device), ref["rejected"][idx].to(device))
                    (out.losses.mean() / recipe.grad_accum).backward()
                    metrics["loss"] += out.losses.detach().sum().item()
                    metrics["acc"] += ((out.margins > 0).float() + 0.5 * (out.margins == 0).float()).sum().item()
                    metrics["margin"] += out.margins.sum().item()
                    metrics["pairs"] += len(idx)
                torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                n = metrics.pop("pairs")
                reg_value = metrics.pop("reg", None)
                record = {k: v / n for k, v in metrics.items()} | {"step": state.step, "pairs": n, "time": time.perf_counter() - t0}
                if reg_value is not None:
                    record["reg"] = reg_value
                state.history.append(record)
                log.write(record | {"lr": scheduler.get_last_lr()[0]})
                report.advance("train", 1, record)
        except KeyboardInterrupt:
            save_checkpoint(ckpt, model, optimizer, scheduler, state, ref)
            raise Interrupted(state.step, ckpt) from None
    return state


def _sft_warmup(model, items, recipe, device, pad_id, state: TrainState, report, bf16_autocast: bool = False) -> None:
    """A few steps of supervised fine-tuning on the chosen responses before preference optimization."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr)
    report.start("sft", recipe.sft_warmup_steps, state.sft_step)
    stream = batch_stream(items, recipe, state.sft_step)
    while state.sft_step < recipe.sft_warmup_steps:
        batch = [items[i] for i in next(stream)]
        ids, mask, labels = collate([(t.prompt, t.chosen) for t in batch], pad_id, device)
        with autocast(bf16_autocast):
            logits = model(input_ids=ids, attention_mask=mask).logits
        loss = sft_loss(logits.float(), labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, recipe.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.sft_step += 1
        report.advance("sft", 1, {"loss": loss.item()})


class _StepLog:
    """The per-step JSON Lines training log (nothing when ``path`` is None), started from ``history``."""

    def __init__(self, path: Path | None, history: list[dict]):
        self.path, self.history, self.file = path, history, None

    def __enter__(self) -> "_StepLog":
        if self.path is not None:
            self.file = open(self.path, "w", encoding="utf-8")
            for record in self.history:
                self.write(record)
        return self

    def write(self, record: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def __exit__(self, *exc) -> None:
        if self.file is not None:
            self.file.close()


class _NullReporter:
    def note(self, message: str) -> None:
        pass

    def start(self, phase: str, total: int, done: int = 0) -> None:
        pass

    def advance(self, phase: str, n: int, metrics: dict) -> None:
        pass


def plot_history(history: list[dict], path: Path) -> Path | None:
    """Loss and reward accuracy per optimizer step, as a PNG (matplotlib, no display needed); None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    steps = [h["step"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_loss.plot(steps, [h["loss"] for h in history], marker=".")
    ax_loss.set_ylabel("loss")
    ax_acc.plot(steps, [h["acc"] for h in history], marker=".", color="tab:green")
    ax_acc.set_ylabel("reward accuracy")
    ax_acc.set_ylim(-0.05, 1.05)
    ax_acc.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
