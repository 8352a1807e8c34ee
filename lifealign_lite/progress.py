"""Progress for long phases (reference log-probs, SFT warm-up, training, benchmarks), on a terminal or in a log.

The library calls ``start(phase, total)``, ``advance(phase, n, metrics)`` and ``note(message)``; which display
answers depends on where the output goes: bars on a terminal (:class:`RichReporter`), plain lines otherwise
(:class:`LineReporter`: nohup, CI, ``| tee``), picked by :func:`reporter_for`.
"""

from __future__ import annotations

import threading
import time
from datetime import timedelta
from typing import Callable

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

_LABELS = {"reference": "reference log-probs", "sft": "SFT warm-up", "train": "training", "score": "scoring", "fisher": "EWC Fisher"}
LINE_EVERY_S = 30.0  # a plain-line log prints at least this often, and at every 10% of a phase
HEARTBEAT_S = 20.0  # a plain-line log silent this long (a long step, a model load) says it is still working
_UNITS = {"train": "steps", "sft": "steps", "score": "pair scorings", "bench": "cells"}  # what a phase counts (else pairs)


def _metrics_text(phase: str, metrics: dict, pairs_per_s: float | None) -> str:
    """The metrics of one step, short enough that a progress line fits 80 columns."""
    if phase == "train" and metrics:
        text = f"loss {metrics['loss']:.4f}  reward acc {metrics['acc']:.2f}"
        if pairs_per_s is not None:
            text += f"  {pairs_per_s:.2f} pairs/s"
        if "reg" in metrics:
            text += f"  penalty {metrics['reg']:.4f}"
        return text
    return f"loss {metrics['loss']:.4f}" if "loss" in metrics else ""


class _Phase:
    """Counts and clock of one phase: the ETA comes from this run's own rate (steps done here / time here)."""

    def __init__(self, total: int, done: int, now: float):
        self.total, self.done, self.start_done, self.t0 = total, done, done, now
        self.pairs = 0

    def eta(self, now: float) -> str:
        ran = self.done - self.start_done
        if ran <= 0 or now <= self.t0:
            return "ETA -"
        return f"ETA {timedelta(seconds=round((self.total - self.done) * (now - self.t0) / ran))}"

    def pairs_per_s(self, metrics: dict) -> float | None:
        self.pairs += metrics.get("pairs", 0)
        return self.pairs / metrics["time"] if metrics.get("time") else None


class RichReporter:
    """Bars on a terminal: one per phase, with live metrics and an ETA, sized to fit 80 columns."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.monotonic):
        self.console = console or Console(stderr=True)
        self.clock = clock
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(bar_width=10),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TextColumn("{task.fields[eta]}"),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}
        self.phases: dict[str, _Phase] = {}

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def note(self, message: str) -> None:
        self.progress.console.print(f"[dim]{message}[/]", highlight=False)

    def start(self, phase: str, total: int, done: int = 0) -> None:
        self.phases[phase] = _Phase(total, done, self.clock())
        self.tasks[phase] = self.progress.add_task(_LABELS.get(phase, phase), total=total, completed=done, metrics="", eta="")

    def advance(self, phase: str, n: int, metrics: dict) -> None:
        p = self.phases[phase]
        p.done += n
        text = _metrics_text(phase, metrics, p.pairs_per_s(metrics))
        self.progress.update(self.tasks[phase], advance=n, metrics=text, eta=p.eta(self.clock()))


class LineReporter:
    """Plain lines for logs: a phase's start, then a line at every 10% of its steps and at least every
    ``LINE_EVERY_S`` seconds (``step N/M``, loss, reward accuracy, pairs/s, ETA), and its end. Inside its ``with``
    block a heartbeat thread prints ``(still working: N s)`` whenever nothing was printed for ``HEARTBEAT_S`` seconds
    (a step or a model load longer than that), so a log never stays silent for more than ``LINE_EVERY_S``."""

    def __init__(self, console: Console | None = None, clock: Callable[[], float] = time.monotonic, heartbeat_s: float = HEARTBEAT_S):
        self.console = console or Console(stderr=True)
        # the stream as it is now: a library that swaps sys.stderr for a while (the model conversion hides
        # transformers' bars that way) must not swallow the heartbeat
        self._file = self.console.file
        self.clock = clock
        self.heartbeat_s = heartbeat_s
        self.phases: dict[str, _Phase] = {}
        self._last: dict[str, float] = {}
        self._t0 = self._printed = clock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def __enter__(self) -> "LineReporter":
        self._t0 = self._printed = self.clock()
        self._stop.clear()
        self._thread = threading.Thread(target=self._heartbeat, name="progress-heartbeat", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(1.0, self.heartbeat_s / 4)):
            self.beat(self.clock())

    def beat(self, now: float) -> bool:
        """Print ``(still working: N s)`` if nothing was printed for ``heartbeat_s``; whether it printed."""
        if now - self._printed < self.heartbeat_s:
            return False
        self._print(f"(still working: {now - self._t0:.0f} s)")
        return True

    def _print(self, text: str) -> None:
        with self._lock:
            self._file.write(text + "\n")
            self._file.flush()
            self._printed = self.clock()

    def note(self, message: str) -> None:
        self._print(message)

    def start(self, phase: str, total: int, done: int = 0) -> None:
        now = self.clock()
        self.phases[phase], self._last[phase] = _Phase(total, done, now), now
        self._print(f"{_LABELS.get(phase, phase)}: {total} {_UNITS.get(phase, 'pairs')}" + (f", from {done}" if done else ""))

    def advance(self, phase: str, n: int, metrics: dict) -> None:
        p, now = self.phases[phase], self.clock()
        before, p.done = p.done, p.done + n
        rate = p.pairs_per_s(metrics)
        tenth = p.total and p.done * 10 // p.total > before * 10 // p.total
        if not (tenth or p.done >= p.total or now - self._last[phase] >= LINE_EVERY_S):
            return
        self._last[phase] = now
        count = f"step {p.done}/{p.total}" if phase in ("train", "sft") else f"{p.done}/{p.total}"
        parts = [f"{_LABELS.get(phase, phase)}: {count}", _metrics_text(phase, metrics, rate), p.eta(now)]
        self._print("  ".join(x for x in parts if x))


def reporter_for(console: Console) -> RichReporter | LineReporter:
    """Bars when ``console`` is a terminal, plain lines when it is a file or a pipe."""
    return RichReporter(console) if console.is_terminal else LineReporter(console)
