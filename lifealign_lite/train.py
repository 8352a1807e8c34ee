"""Short-term training: a fresh LoRA trained with FPO (or DPO) on one task, reference log-probs computed once.

Read top to bottom: the reference log-probs are computed once with the short-term adapter switched off (the model
as it stood when the task began), an optional SFT warm-up on the chosen responses, then the preference loss over
length-grouped batches. Chosen and rejected responses go through the model in one batch (``logprobs.py``), sharing
one pass over their prompt (``prefix.py``; the recipe's ``prefix_sharing``), and the output head runs only on
response tokens. Ctrl-C (or SIGTERM) saves a checkpoint that ``resume`` continues
from (``checkpoint.py``). Tokenizing and batching live in ``batching.py``.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

from .batching import Tokenized, TokenizeStats, batch_stream, collate, length_grouped_batches, optimizer_steps, tokenize_pairs, trained_indices
from .checkpoint import Interrupted, StopFlag, TrainState, load_checkpoint, save_checkpoint, settle
from .distributed import Ranks, signals_ignored, stopped_by_peer
from .logprobs import PairScorer, pair_logps, reference_logps, score_pairs, sequence_logps
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
    ranks: Ranks | None = None,
) -> TrainState:
    """Train the ``short`` LoRA of ``model`` on ``items`` with the recipe's preference loss.

    ``bf16_autocast`` runs the forward passes (reference included, so both sides of the margin match) in bf16
    over the fp32 weights: about 1.7x faster on CPUs with native bf16 (docs/PERFORMANCE.md). Autocast is
    entered per forward pass: it caches its bf16 copies of trainable weights until its context exits, so a
    context around several optimizer steps would keep training on stale weights.

    ``regularizer`` (optional) returns a penalty added to the loss once per optimizer step (EWC, O-LoRA:
    ``regularize.py``); its value is recorded as ``reg`` in the step metrics.

    ``reporter`` (optional) gets ``start(phase, total)``, ``advance(phase, n, metrics)`` calls for a progress display.

    ``log_path`` (optional) gets one JSON line per optimizer step (step, loss, acc, margin, pairs, time, lr, grad_norm), written
    as the step ends, so a running job can be followed; a resumed run rewrites it from the checkpoint's history.

    ``ranks`` (``distributed.py``; default: one process): data-parallel training. Every process draws the same
    global batches and scores its share of each (``idx[rank::world]``); its loss is its share's summed losses times
    ``world / len(idx)``, so the gradient the wrapper averages over the processes is the one-process batch mean.
    Reference log-probs are scored in shares and gathered; metrics are summed over the processes; the main process
    alone writes the checkpoint (Ctrl-C, SIGTERM, a peer that died, or every ``recipe.checkpoint_every`` steps).
    """
    ranks = ranks or Ranks()
    torch.manual_seed(recipe.seed)
    pad_id = tokenizer.pad_token_id
    total, _ = optimizer_steps(len(items), recipe)
    scorer = ranks.wrap(PairScorer(model))  # the wrapper's forward is where DDP/FSDP hook in
    params = [p for p in scorer.parameters() if p.requires_grad]
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
        ref = _reference(model, scorer, items, used, recipe, device, pad_id, report, bf16_autocast, ranks)
    state.ref, state.trained = ref, used

    def checkpoint() -> None:
        # under FSDP each process holds a shard of the optimizer state: not written (README, More than one GPU)
        if ranks.is_main and not ranks.fsdp:
            save_checkpoint(ckpt, model, optimizer, scheduler, state, ref)

    model.train()
    log = _StepLog(log_path, state.history)
    with StopFlag(), log:
        try:
            if state.sft_step < recipe.sft_warmup_steps:  # a few steps, run whole on every process (identical there)
                _sft_warmup(model, items, recipe, device, pad_id, state, report, bf16_autocast)
            report.start("train", total, state.step)
            stream = batch_stream(items, recipe, state.step * recipe.grad_accum)
            # a resumed run continues the clock, so "time" stays the training time of every step so far
            t0 = time.perf_counter() - (state.history[-1]["time"] if state.history else 0.0)
            while state.step < total:
                metrics = {"loss": 0.0, "acc": 0.0, "margin": 0.0, "pairs": 0}
                reg_value = None
                if regularizer is not None:  # the same on every process: averaging keeps it once
                    reg = regularizer()
                    reg.backward()
                    reg_value = reg.item()
                for micro in range(recipe.grad_accum):
                    idx = next(stream)
                    mine = ranks.share(idx)
                    # a process with no pair in a short batch scores one with weight 0: DDP/FSDP need every process's pass
                    weight = 1.0 if mine else 0.0
                    batch = [items[i] for i in mine or idx[:1]]
                    last = micro == recipe.grad_accum - 1
                    with ranks.no_sync(scorer) if not last else contextlib.nullcontext():
                        with autocast(bf16_autocast):
                            pc, pr, _, _ = scorer(batch, pad_id, device, recipe.prefix_sharing)
                        rows = mine or idx[:1]
                        out = loss_fn(pc, pr, ref["chosen"][rows].to(device), ref["rejected"][rows].to(device))
                        if ranks.world == 1:
                            loss = out.losses.mean() / recipe.grad_accum
                        else:  # averaged over the processes by the wrapper: the batch mean
                            loss = out.losses.sum() * (weight * ranks.world / len(idx) / recipe.grad_accum)
                        loss.backward()
                    if mine:
                        metrics["loss"] += out.losses.detach().sum().item()
                        metrics["acc"] += ((out.margins > 0).float() + 0.5 * (out.margins == 0).float()).sum().item()
                        metrics["margin"] += out.margins.sum().item()
                        metrics["pairs"] += len(mine)
                if ranks.world > 1:  # before the step: a failed collective leaves the weights at the last whole step
                    metrics = dict(zip(metrics, ranks.sum(list(metrics.values()))))
                grad_norm = float(ranks.clip_grad_norm_(scorer, params, recipe.max_grad_norm))  # before clipping
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                state.step += 1
                n = int(metrics.pop("pairs"))
                record = {k: v / n for k, v in metrics.items()} | {"step": state.step, "pairs": n, "time": time.perf_counter() - t0}
                if reg_value is not None:
                    record["reg"] = reg_value
                state.history.append(record)
                log.write(record | {"lr": scheduler.get_last_lr()[0], "grad_norm": grad_norm})
                report.advance("train", 1, record)
                if recipe.checkpoint_every and state.step % recipe.checkpoint_every == 0 and state.step < total:
                    checkpoint()
        except KeyboardInterrupt:
            # a launcher passes the user's Ctrl-C on as a second signal, then SIGTERM: let the save and the exit finish
            with signals_ignored(for_good=ranks.world > 1):
                checkpoint()
            raise Interrupted(state.step, None if ranks.fsdp else ckpt) from None
        except Exception as exc:
            if ranks.world == 1 or not stopped_by_peer(exc):
                raise
            with signals_ignored(for_good=True):
                checkpoint()
            raise Interrupted(state.step, None if ranks.fsdp else ckpt, why="another process of the run stopped") from None
    state.full_state = ranks.full_state_dict(scorer)  # FSDP: the adapter's shards, gathered on the main process
    return state


def _reference(model, scorer, items, used: list[int], recipe, device, pad_id, report, bf16_autocast: bool, ranks: Ranks) -> dict:
    """Reference log-probs of the pairs the steps will see (``max_steps`` may stop before the end of the data), as
    tensors over all ``items``: each process scores its share, gathered to every process in the original order."""
    mine = ranks.share(used)
    # every process must run the same number of forward passes (DDP syncs buffers and FSDP gathers shards in each):
    # shares are padded to equal length and the padding's scores dropped
    padded = mine + used[: (len(used) + ranks.world - 1) // ranks.world - len(mine)]
    report.start("reference", len(padded))
    sub = reference_logps(model, [items[i] for i in padded], pad_id, device, progress=lambda n: report.advance("reference", n, {}),
                          bf16_autocast=bf16_autocast, bare=recipe.reference == "base", prefix_sharing=recipe.prefix_sharing,
                          forward=scorer if ranks.world > 1 else None)
    if ranks.world > 1:  # rank r scored used[r::world]
        parts = ranks.gather({k: v[: len(mine)].cpu() for k, v in sub.items()})
        sub = {k: torch.zeros(len(used), dtype=v.dtype) for k, v in sub.items()}
        for rank, part in enumerate(parts):
            for k in sub:
                sub[k][rank :: ranks.world] = part[k]
    return {k: torch.zeros(len(items), dtype=v.dtype).index_copy(0, torch.tensor(used, dtype=torch.long), v) for k, v in sub.items()}


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
