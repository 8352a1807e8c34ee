"""Process-level helpers shared by training, chat and the benchmarks: peak memory, and quiet library loading."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
import warnings
from pathlib import Path
from typing import Iterator


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB (Linux reports kilobytes, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(peak / (2**20 if sys.platform == "darwin" else 1024), 1)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence library chatter (progress bars, deprecation notes) while loading."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        hf_logging.set_verbosity(level)
        hf_logging.enable_progress_bar()


MATPLOTLIB_MISSING = "matplotlib is not installed, so no plot was drawn; install it with: python -m pip install 'lifealign-lite[plot]'"


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend, or None when matplotlib (the ``plot`` extra) is missing."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def physical_cores(sysfs: Path = Path("/sys/devices/system/cpu")) -> int:
    """Physical cores this process may run on: distinct (package, core) pairs among the CPUs of its affinity mask
    (hyperthreads of one core count once); the CPU count where the topology cannot be read."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        topo = sysfs / f"cpu{cpu}" / "topology"
        try:
            cores.add((topo.joinpath("physical_package_id").read_text().strip(), topo.joinpath("core_id").read_text().strip()))
        except OSError:
            return len(cpus) or 1
    return len(cores) or 1


def llama_threads() -> int:
    """llama.cpp's threads: ``OMP_NUM_THREADS`` when set (torch reads it too; ``bench --threads`` sets it), else the
    physical cores (llama.cpp's own default). Fixed by the machine, never by its load at the moment, so a run is
    reproducible (the project's rule: no result depends on a timing probe); only the speed depends on it: ggml splits
    a matrix product by output rows, each computed whole by one thread, so the answer does not.

    Measured on the idle 2-core machine (docs/PERFORMANCE.md, issue 24): `chat --prompt` decoded at 77-83 tokens/s on
    2 threads against 49-53 on 1. Two things make 2 threads slower than 1, and neither is the default's business to
    guess: another busy process (llama.cpp's threads meet at a barrier after every operation of the graph, so one
    descheduled thread stalls the other: 0.28x of 1 thread at load 3; set ``OMP_NUM_THREADS=1`` on a busy machine),
    and torch's own thread pool in the same process (two OpenMP pools on two cores make libgomp throttle its
    barriers: 0.4x). The second is this project's to avoid: :func:`one_torch_thread` in every process running llama.cpp.
    """
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    return physical_cores()


def one_torch_thread(threads: int) -> None:
    """Keep torch to the calling thread in a process that runs llama.cpp (its routing embedder, a benchmark's torch
    anchor): a second OpenMP pool counts as more threads than cores and libgomp then throttles its spin at every
    barrier, llama.cpp's included, for the rest of the process (on 2 threads of the idle 2-core machine, 64 tokens ran
    at 29-33 tokens/s after a few torch products on torch's 2 threads, 60-66 on 1, 72 without torch: docs/PERFORMANCE.md,
    issue 24). Must run before torch's first parallel operation: a pool
    once made stays. Does nothing where llama.cpp runs on one thread (``threads``)."""
    if threads > 1:
        import torch

        torch.set_num_threads(1)


def hub_offline_reason() -> str | None:
    """Why the Hugging Face hub cannot be reached now (``HF_HUB_OFFLINE``, or no connection within 3 s); None if it can."""
    import socket
    from urllib.parse import urlparse

    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    url = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=3).close()
        return None
    except OSError as exc:
        return f"{url.hostname}: {exc.strerror or type(exc).__name__}"


def seconds_since_process_start() -> float | None:
    """Seconds since this process started (the kernel's start time, so the interpreter's own start-up counts), or
    None where /proc is not there."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(0.0, uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None
