"""Process-level helpers shared by training, chat and the benchmarks: peak memory, and quiet library loading."""

from __future__ import annotations

import contextlib
import resource
import sys
import warnings
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
