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


def llama_threads() -> int:
    """llama.cpp's threads: ``OMP_NUM_THREADS`` when set (torch reads it too; ``bench --threads`` sets it), else one
    per CPU that is idle now (the CPUs less the 1-minute load average, rounded; at least 1).

    More threads than idle cores is the one setting to avoid: llama.cpp's threads spin at every barrier, and one
    descheduled thread stalls the rest (measured on the 2-core machine at load 6 to 9: a 38-token prompt took 15.6 s
    on 2 threads, 0.83 s on 1). On the same machine idle, 2 threads answered at 57.6 tokens/s and 1 thread at 31.5
    (docs/PERFORMANCE.md): so all CPUs when idle, fewer when busy. Only the speed depends on it: ggml splits a matrix
    product by output rows, each computed whole by one thread, so the answer does not.
    """
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        pass
    cpus = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except OSError:  # no load average on this system: llama-cpp-python's own default
        return max(1, cpus // 2)
    return max(1, min(cpus, round(cpus - busy)))


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
