"""Training checkpoints and clean stops: Ctrl-C or SIGTERM during training saves a checkpoint that ``resume`` continues
from. Safetensors + JSON only (nothing is unpickled on resume). The new checkpoint is written beside the old one and
swapped in by renames (:func:`lifealign_lite.files.swap_dir`), so a crash at any moment leaves one whole checkpoint
(:func:`settle` finishes an interrupted swap before it is read)."""

from __future__ import annotations

import json
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .files import fsync_tree, settle_dir, swap_dir


@dataclass
class TrainState:
    step: int = 0
    sft_step: int = 0
    history: list[dict] = field(default_factory=list)  # per-step metrics
    ref: dict = field(default_factory=dict, repr=False)  # the task's reference log-probs (set by train_short_term)
    trained: list[int] = field(default_factory=list)  # indices of the items the preference steps use (set by train_short_term)
    full_state: dict | None = field(default=None, repr=False)  # under FSDP: the gathered state dict (main process)

    def window(self, key: str, first: bool, frac: float = 0.1) -> float | None:
        vals = [h[key] for h in self.history if key in h]
        if not vals:
            return None
        k = max(1, int(len(vals) * frac))
        part = vals[:k] if first else vals[-k:]
        return sum(part) / len(part)


class Interrupted(Exception):
    """Training was stopped (Ctrl-C, SIGTERM, or another process of a data-parallel run) after a checkpoint was written."""

    def __init__(self, step: int, checkpoint: Path | None, why: str = ""):
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint under FSDP (the run starts again)"
        super().__init__(f"{why + ': ' if why else ''}stopped at step {step}; {saved}")
        self.step, self.checkpoint = step, checkpoint


def settle(path: Path) -> Path:
    """Finish (or undo) a checkpoint swap a crash interrupted, so ``path`` is a whole checkpoint or absent."""
    return settle_dir(Path(path), complete=lambda p: (p / "state.json").is_file())


def save_checkpoint(path: Path, model, optimizer, scheduler, state: TrainState, ref: dict[str, torch.Tensor]) -> Path:
    from safetensors.torch import save_file

    from .model import SHORT, save_adapter

    settle(path)
    tmp = path.with_name(path.name + ".new")
    if tmp.exists():  # a half-written one from a crash before the swap
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_adapter(model, tmp / "adapter", SHORT)
    tensors = {f"ref.{k}": v.contiguous() for k, v in ref.items()}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for key, val in optimizer.state.get(p, {}).items():
            tensors[f"opt.{i}.{key}"] = val.detach().cpu().contiguous().reshape(val.shape)
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"step": state.step, "sft_step": state.sft_step, "history": state.history, "scheduler": scheduler.state_dict()}
    fsync_tree(tmp)
    (tmp / "state.json").write_text(json.dumps(meta))  # last: its presence marks the folder complete
    fsync_tree(tmp)
    swap_dir(tmp, path)
    return path


def load_checkpoint(path: Path, model, optimizer, scheduler) -> tuple[TrainState, dict[str, torch.Tensor]]:
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from .model import SHORT

    settle(path)
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


class StopFlag:
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
