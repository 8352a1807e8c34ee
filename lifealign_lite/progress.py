"""A Rich progress display for long phases (reference log-probs, SFT warm-up, training, benchmarks)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_LABELS = {"reference": "reference log-probs", "sft": "SFT warm-up", "train": "FPO training", "score": "scoring", "fisher": "EWC Fisher"}


class RichReporter:
    """Receives ``start``/``advance`` calls from the library and draws one bar per phase with live metrics."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[metrics]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.tasks: dict[str, int] = {}
        self._pairs = 0

    def __enter__(self) -> "RichReporter":
        self.progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, phase: str, total: int, done: int = 0) -> None:
        label = _LABELS.get(phase, phase)
        self.tasks[phase] = self.progress.add_task(label, total=total, completed=done, metrics="")

    def advance(self, phase: str, n: int, metrics: dict) -> None:
        text = ""
        if phase == "train" and metrics:
            self._pairs += metrics.get("pairs", 0)
            rate = self._pairs / metrics["time"] if metrics.get("time") else 0.0
            text = f"loss {metrics['loss']:.4f}  acc {metrics['acc']:.2f}  {rate:.2f} pairs/s"
            if "reg" in metrics:
                text += f"  penalty {metrics['reg']:.4f}"
        elif "loss" in metrics:
            text = f"loss {metrics['loss']:.4f}"
        self.progress.update(self.tasks[phase], advance=n, metrics=text)
