"""Short-term training: a fresh LoRA trained with FPO (or DPO) on one task, reference log-probs computed once.

Read top to bottom: tokenize the pairs (TRL's chat-template handling), compute the reference log-probs once
with the short-term adapter switched off (the model as it stood when the task began), optionally warm up with
SFT on the chosen responses, then optimize the preference loss over length-grouped batches. Chosen and
rejected responses go through the model in one batch, sharing one pass over their prompt (``prefix.py``; the
recipe's ``prefix_sharing``), and the output head runs only on response tokens.
Ctrl-C (or SIGTERM) saves a checkpoint that ``resume`` continues from.
"""

from __future__ import annotations

import json
import math
import random
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch

from .data import Pair
from .losses import preference_loss, sft_loss
from .model import autocast, reference_mode
from .prefix import shared_pair_logps, use_sharing


@dataclass(frozen=True)
class Tokenized:
    """One preference pair as token ids: the prompt (chat template applied) and each response."""

    prompt: list[int]
    chosen: list[int]
    rejected: list[int]

    @property
    def tokens(self) -> int:
        return 2 * len(self.prompt) + len(self.chosen) + len(self.rejected)


@dataclass
class TokenizeStats:
    pairs: int = 0
    truncated_prompts: int = 0
    truncated_responses: int = 0


def tokenize_pairs(pairs: Sequence[Pair], tokenizer, max_length: int, max_prompt_length: int) -> tuple[list[Tokenized], TokenizeStats]:
    """Apply the chat template (TRL) and tokenize.

    Truncation policy: a prompt longer than ``max_prompt_length`` keeps its END (the latest turns, where
    the question is); a response longer than what is left of ``max_length`` keeps its BEGINNING.
    """
    from trl.data_utils import apply_chat_template

    stats = TokenizeStats(pairs=len(pairs))
    out = []
    for pair in pairs:
        text = apply_chat_template({"prompt": pair.prompt, "chosen": pair.chosen, "rejected": pair.rejected}, tokenizer)
        prompt = tokenizer(text["prompt"], add_special_tokens=False)["input_ids"]
        chosen = tokenizer(text["chosen"], add_special_tokens=False)["input_ids"]
        rejected = tokenizer(text["rejected"], add_special_tokens=False)["input_ids"]
        if len(prompt) > max_prompt_length:
            prompt = prompt[-max_prompt_length:]
            stats.truncated_prompts += 1
        room = max_length - len(prompt)
        if len(chosen) > room or len(rejected) > room:
            chosen, rejected = chosen[:room], rejected[:room]
            stats.truncated_responses += 1
        out.append(Tokenized(prompt, chosen, rejected))
    return out, stats


def length_grouped_batches(items: Sequence[Tokenized], batch_size: int, seed: int) -> list[list[int]]:
    """Batches of similar-length pairs (less padding), in a seeded random order.

    Indices are shuffled, cut into chunks of 50 batches, sorted by length inside each chunk, then the
    batches are shuffled: randomness for SGD, little padding for speed.
    """
    rng = random.Random(seed)
    order = list(range(len(items)))
    rng.shuffle(order)
    chunk = batch_size * 50
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: items[i].tokens)
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def _collate(seqs: list[tuple[list[int], list[int]]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 on prompt and padding) for (prompt, response) pairs."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for row, (p, r) in enumerate(seqs):
        n = len(p) + len(r)
        ids[row, :n] = torch.tensor(p + r)
        mask[row, :n] = 1
        labels[row, len(p) : n] = torch.tensor(r)
    return ids.to(device), mask.to(device), labels.to(device)


def _causal_lm(model):
    """The transformers CausalLM inside a PEFT wrapper (LoRA layers live inside it, so they still apply)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def sequence_logps(model, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probability of the labelled tokens of each row, and their count.

    The output head (vocabulary-sized) runs only on positions that predict a response token, which saves
    memory and time when prompts are long.
    """
    lm = _causal_lm(model)
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
    targets = labels[:, 1:]
    keep = targets != -100
    logits = lm.get_output_embeddings()(hidden[:, :-1][keep]).float()
    token_logps = torch.log_softmax(logits, dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
    rows = keep.nonzero()[:, 0]
    sums = torch.zeros(ids.shape[0], dtype=token_logps.dtype, device=ids.device).index_add(0, rows, token_logps)
    counts = keep.sum(1)
    return sums, counts


def pair_logps(model, items: Sequence[Tokenized], pad_id: int, device, *, prefix_sharing: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(chosen logps, rejected logps, chosen token counts, rejected token counts) of a batch, in one forward pass.

    ``prefix_sharing`` (the recipe key, auto|on|off): each pair's prompt runs once for both responses
    (``prefix.py``), or, with ``off``, each response runs in its own sequence with the prompt in front.
    """
    if use_sharing(prefix_sharing, items, device):
        return shared_pair_logps(_causal_lm(model), items, pad_id, device)
    seqs = [(t.prompt, t.chosen) for t in items] + [(t.prompt, t.rejected) for t in items]
    sums, counts = sequence_logps(model, *_collate(seqs, pad_id, device))
    n = len(items)
    return sums[:n], sums[n:], counts[:n], counts[n:]


@torch.no_grad()
def score_pairs(model, items: Sequence[Tokenized], pad_id: int, device, batch_size: int = 8, progress: Callable[[int], None] | None = None,
                bf16_autocast: bool = False, prefix_sharing: str = "auto") -> dict[str, torch.Tensor]:
    """Log-probs of every pair under the model as it is now (no grad), in length-sorted batches."""
    was_training = model.training
    model.eval()
    n = len(items)
    out = {k: torch.zeros(n) for k in ("chosen", "rejected")}
    out.update({k: torch.zeros(n, dtype=torch.long) for k in ("chosen_tokens", "rejected_tokens")})
    order = sorted(range(n), key=lambda i: items[i].tokens)
    for start in range(0, n, batch_size):
        idx = order[start : start + batch_size]
        with autocast(bf16_autocast):
            c, r, cn, rn = pair_logps(model, [items[i] for i in idx], pad_id, device, prefix_sharing=prefix_sharing)
        for key, val in zip(("chosen", "rejected", "chosen_tokens", "rejected_tokens"), (c, r, cn, rn)):
            out[key][idx] = val.cpu().to(out[key].dtype)
        if progress:
            progress(len(idx))
    model.train(was_training)
    return out


def reference_logps(model, items, pad_id, device, batch_size=8, progress=None, bf16_autocast: bool = False,
                    bare: bool = False, prefix_sharing: str = "auto") -> dict[str, torch.Tensor]:
    """Reference log-probs, computed once per task: the model as the task began (short-term adapter off), or
    with ``bare`` the base model alone (every adapter off)."""
    with reference_mode(model, bare=bare):
        return score_pairs(model, items, pad_id, device, batch_size, progress, bf16_autocast, prefix_sharing)


@dataclass
class TrainState:
    step: int = 0
    sft_step: int = 0
    history: list[dict] = field(default_factory=list)  # per-step metrics
    ref: dict = field(default_factory=dict, repr=False)  # the task's reference log-probs (set by train_short_term)
    trained: list[int] = field(default_factory=list)  # indices of the items the preference steps use (set by train_short_term)

    def window(self, key: str, first: bool, frac: float = 0.1) -> float | None:
        vals = [h[key] for h in self.history if key in h]
        if not vals:
            return None
        k = max(1, int(len(vals) * frac))
        part = vals[:k] if first else vals[-k:]
        return sum(part) / len(part)


class Interrupted(Exception):
    """Training was stopped by Ctrl-C or SIGTERM after a checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"stopped at step {step}; checkpoint saved to {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def _lr_lambda(total: int, warmup: int, schedule: str = "linear") -> Callable[[int], float]:
    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        left = max(0.0, (total - step) / max(1, total - warmup))  # 1 right after warm-up, 0 at the end
        return 0.5 * (1.0 - math.cos(math.pi * left)) if schedule == "cosine" else left

    return f


def _schedule(n_items: int, recipe) -> tuple[int, int]:
    """(optimizer steps, batches per epoch)."""
    per_epoch = math.ceil(n_items / recipe.batch_size)
    total = recipe.max_steps or max(1, math.ceil(recipe.epochs * per_epoch / recipe.grad_accum))
    return total, per_epoch


def trained_indices(items, recipe, steps: int) -> list[int]:
    """The items that ``steps`` optimizer steps see (fewer than all when ``max_steps`` stops early), sorted."""
    stream = _batch_stream(items, recipe, 0)
    return sorted({i for _ in range(steps * recipe.grad_accum) for i in next(stream)})


def _batch_stream(items, recipe, start_batch: int) -> Iterator[list[int]]:
    """An endless, reproducible stream of length-grouped batches (a new seeded order each epoch)."""
    epoch, done = 0, 0
    while True:
        for batch in length_grouped_batches(items, recipe.batch_size, recipe.seed + epoch):
            if done >= start_batch:
                yield batch
            done += 1
        epoch += 1


# -- checkpoints (safetensors + JSON only: nothing is unpickled on resume) --------------------------------

def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState, ref: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    from .model import SHORT, save_adapter

    tmp = path.with_name(path.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_adapter(model, tmp / "adapter", SHORT)
    tensors = {f"ref.{k}": v.contiguous() for k, v in ref.items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, val in optimizer.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = val.detach().cpu().contiguous().reshape(val.shape)
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"step": state.step, "sft_step": state.sft_step, "history": state.history, "scheduler": scheduler.state_dict()}
    (tmp / "state.json").write_text(json.dumps(meta))
    if path.exists():
        import shutil

        shutil.rmtree(path)
    tmp.rename(path)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[TrainState, dict[str, torch.Tensor]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .model import SHORT

    set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")), adapter_name=SHORT)
    tensors = load_file(str(path / "state.safetensors"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for name, val in tensors.items():
        if name.startswith("opt."):
            _, i, key = name.split(".", 2)
            p = params[int(i)]
            optimizer.state[p][key] = val.to(p.device) if key != "step" else val
    meta = json.loads((path / "state.json").read_text())
    scheduler.load_state_dict(meta["scheduler"])
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the scheduler's state does not carry the optimizer's current learning rate
    ref = {k[4:]: v for k, v in tensors.items() if k.startswith("ref.")}
    return TrainState(step=meta["step"], sft_step=meta["sft_step"], history=meta["history"]), ref


class _StopFlag:
    """Turns SIGTERM into the same clean stop as Ctrl-C while training runs."""

    def __enter__(self):
        self._old = signal.getsignal(signal.SIGTERM)

        def handler(signum, frame):
            raise KeyboardInterrupt

        try:
            signal.signal(signal.SIGTERM, handler)
        except ValueError:  # not the main thread
            self._old = None
        return self

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)
        return False


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
    total, _ = _schedule(len(items), recipe)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    warmup = int(recipe.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(total, warmup, recipe.lr_schedule))
    loss_fn = preference_loss(recipe.loss, recipe.beta, recipe.focal_gamma)
    report = reporter or _NullReporter()

    ckpt = Path(checkpoint_dir)
    used = trained_indices(items, recipe, total)
    if resume and (ckpt / "state.json").is_file():
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
    with _StopFlag(), log:
        try:
            if state.sft_step < recipe.sft_warmup_steps:
                _sft_warmup(model, items, recipe, device, pad_id, state, report, bf16_autocast)
            report.start("train", total, state.step)
            stream = _batch_stream(items, recipe, state.step * recipe.grad_accum)
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
    stream = _batch_stream(items, recipe, state.sft_step)
    while state.sft_step < recipe.sft_warmup_steps:
        batch = [items[i] for i in next(stream)]
        ids, mask, labels = _collate([(t.prompt, t.chosen) for t in batch], pad_id, device)
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


def plot_history(history: list[dict], path: Path) -> Path:
    """Loss and reward accuracy per optimizer step, as a PNG (matplotlib, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


class _NullReporter:
    def note(self, message: str) -> None:
        pass

    def start(self, phase: str, total: int, done: int = 0) -> None:
        pass

    def advance(self, phase: str, n: int, metrics: dict) -> None:
        pass
