"""Data-parallel runs: ``align`` under ``accelerate launch``, ``torchrun`` or ``align --num-processes N``.

A launcher starts N copies of the command and tells each its place through the environment (``WORLD_SIZE``,
``RANK``, ``LOCAL_RANK``). :class:`Ranks` is that place, with the few collective operations ``align`` needs, all
taken from accelerate (``Accelerator``, ``gather_object``, ``broadcast_object_list``, ``reduce``). Without a
launcher it is rank 0 of 1 and every operation returns its input, so one process runs exactly as before.

Who does what: every process loads the model and trains on its share of each batch (the batch stream is global,
``batching.batch_stream``; a share is ``idx[rank::world]``), the gradients are averaged by the wrapper accelerate
puts around the scoring module (DDP here; FSDP on GPUs with ``recipes/accelerate/fsdp-qlora.yaml``); the main
process alone takes the bank's lock, picks the run folder, writes checkpoints, logs and the summary, and
consolidates. :func:`launch` is ``--num-processes``: torch's elastic launcher (what ``torchrun`` and
``accelerate launch --multi_gpu`` run), called in this process.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Sequence

from .errors import LifeAlignError


class LaunchError(LifeAlignError, RuntimeError):
    """A multi-process run that cannot start or whose processes failed."""


def world_size() -> int:
    """How many processes the launcher started (1 without a launcher), read from the environment."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def is_main_process() -> bool:
    """Whether this process prints and writes: rank 0, or the only process (readable before anything starts)."""
    return os.environ.get("RANK", "0") in ("", "0")


def refuse_launcher(command: str) -> None:
    """``command`` runs in one process: under a launcher, say so at once instead of running it N times."""
    if world_size() > 1:
        raise LaunchError(f"{command} runs in one process; run it without accelerate launch / torchrun "
                          "(only align trains data-parallel)")


@dataclass
class Ranks:
    """This process's place in a run (rank 0 of 1 without a launcher) and the collectives ``align`` uses."""

    world: int = 1
    rank: int = 0
    device: str | None = None  # None: the model's default device (pick_device)
    accelerator: Any = field(default=None, repr=False)

    @classmethod
    def start(cls) -> "Ranks":
        """Join the launcher's process group (gloo on CPUs, NCCL on GPUs: accelerate picks it), or run alone."""
        if world_size() == 1:
            return cls()
        import torch
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
        device = None if accelerator.device.type == "cpu" else str(accelerator.device)  # cuda:LOCAL_RANK on GPUs
        return cls(world=accelerator.num_processes, rank=accelerator.process_index, device=device, accelerator=accelerator)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp(self) -> bool:
        return self.accelerator is not None and str(self.accelerator.distributed_type).endswith("FSDP")

    def share(self, items: Sequence) -> list:
        """This process's part of a global list (every ``world``-th item from ``rank``), in order."""
        return list(items[self.rank :: self.world])

    def gather(self, obj) -> list:
        """``obj`` of every process, by rank (picklable objects; tensors travel on the CPU)."""
        if self.world == 1:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def broadcast(self, obj):
        """The main process's ``obj`` on every process."""
        if self.world == 1:
            return obj
        from accelerate.utils import broadcast_object_list

        return broadcast_object_list([obj])[0]

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over the processes (float64, so counts stay exact)."""
        if self.world == 1:
            return list(values)
        import torch
        from accelerate.utils import reduce

        device = self.accelerator.device
        return reduce(torch.tensor(values, dtype=torch.float64, device=device), reduction="sum").tolist()

    def wrap(self, module):
        """``module`` (a :class:`~lifealign_lite.logprobs.PairScorer`) as accelerate prepares it for training: DDP,
        or FSDP under an FSDP config (units: PEFT's policy, :func:`fsdp_wrap_policy`); itself in one process."""
        if self.world == 1:
            return module
        if self.fsdp:
            self.accelerator.state.fsdp_plugin.auto_wrap_policy = fsdp_wrap_policy(module.model)
        return self.accelerator.prepare_model(module)

    def full_state_dict(self, module) -> dict | None:
        """Under FSDP, the wrapped module's whole state dict on the main process (its shards gathered: every process
        must call this); None otherwise (every process holds the whole adapter)."""
        return self.accelerator.get_state_dict(module) if self.fsdp else None

    def no_sync(self, module):
        """Skip the gradient all-reduce of this backward pass (accumulation steps before the last)."""
        return contextlib.nullcontext() if self.world == 1 else self.accelerator.no_sync(module)

    def clip_grad_norm_(self, module, params, max_norm: float):
        import torch

        if self.world == 1:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        # FSDP computes the norm over every shard, so it needs the wrapped module's own parameters
        return self.accelerator.clip_grad_norm_(module.parameters() if self.fsdp else params, max_norm)

    def close(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def fsdp_wrap_policy(peft_model):
    """FSDP's units for a PEFT model, as PEFT's FSDP-QLoRA guide builds them: each decoder layer (the model's
    ``_no_split_modules``) and each trainable leaf (the LoRA matrices), so no unit mixes frozen and trained weights."""
    from peft.utils.other import fsdp_auto_wrap_policy

    return fsdp_auto_wrap_policy(peft_model)


def fsdp_launched() -> bool:
    """Whether ``accelerate launch`` started this process with an FSDP config (read before the model loads)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def stopped_by_peer(exc: BaseException) -> bool:
    """Whether ``exc`` is a collective failing because another process of the run went away."""
    try:
        from torch.distributed import DistError
    except ImportError:  # older torch: gloo raises a plain RuntimeError
        DistError = ()  # noqa: N806
    text = str(exc)
    return isinstance(exc, DistError) or (isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "gloo")))


@contextlib.contextmanager
def signals_ignored(for_good: bool = False):
    """Ctrl-C and SIGTERM are ignored inside (a launcher forwards the user's Ctrl-C as a second signal while the
    checkpoint the first one asked for is written); ``for_good`` keeps ignoring them after (the process is on its
    way out, and the launcher's closing SIGTERM must not turn its exit code into a kill)."""
    old = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            old[sig] = signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not the main thread
            pass
    try:
        yield
    finally:
        for sig, handler in old.items():
            if not for_good:
                signal.signal(sig, handler)


def launch(args: list[str], processes: int) -> int:
    """Run ``lifealign-lite ARGS`` in ``processes`` processes on this machine (torch's elastic launcher, as
    ``torchrun --standalone`` does); returns the exit code to leave with (the main process's, 130 when stopped)."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if processes < 1:
        raise LaunchError(f"--num-processes must be at least 1, got {processes}")
    if world_size() > 1:
        raise LaunchError("--num-processes given inside a launcher (accelerate launch / torchrun already started the processes); drop it")
    # each process gets an equal part of the cores, unless the user chose (torchrun would set 1 and say so)
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)  # a failure is said once, below
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.5)
    try:
        elastic_launch(config, sys.executable)("-m", "lifealign_lite.cli.app", *args)
    except ChildFailedError as exc:
        codes = {rank: failure.exitcode for rank, failure in exc.failures.items()}
        if codes.get(0, 0) > 0:  # the main process said why (one line) and chose its exit code
            return codes[0]
        rank, failure = exc.get_first_failure()  # the root cause; the launcher stopped the others
        code = failure.exitcode
        how = f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"
        raise LaunchError(f"process {rank} of {processes} {how}; the bank is unchanged; continue with the same command plus --resume "
                          "(from the last checkpoint)") from None
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0
