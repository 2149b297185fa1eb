"""The live progress line of a training run (rich): step, loss, throughput, MFU and dollars so far."""

from __future__ import annotations

from typing import Any


class ProgressLine:
    """Shown only when ``enabled`` (the CLI turns it off for --no-progress and $FRUGALLM_NO_PROGRESS).
    ``label`` replaces the leading "train" (the lab names its run there); with ``deadline`` (a ``time.time()``)
    the line also counts down the seconds left until it."""

    def __init__(self, enabled: bool, label: str | None = None, deadline: float | None = None):
        self.enabled = enabled
        self.label, self.deadline = label or "train", deadline
        self._progress: Any = None

    def start(self, total: int | None, step: int) -> None:
        if not self.enabled:
            return
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self._progress = Progress(TextColumn(f"[bold]{self.label}"), BarColumn(), TextColumn("{task.description}"),
                                  TimeElapsedColumn(), transient=False)
        self._progress.start()
        self._task = self._progress.add_task("starting", total=total, completed=step)

    def update(self, step: int, rec: dict[str, Any]) -> None:
        if self._progress is None:
            return
        desc = (f"step {step}  loss {rec['loss']:.3f}  lr {rec['lr']:.1e}  "
                f"{rec.get('tokens_per_s', 0):,.0f} tok/s")
        if rec.get("mfu") is not None:
            desc += f"  MFU {rec['mfu'] * 100:.1f}%"
        if "load_max_over_mean" in rec:
            desc += f"  load max/mean {max(rec['load_max_over_mean']):.2f}"
        if rec.get("cost_usd") is not None:
            desc += f"  ${rec['cost_usd']:.4f}"
        if self.deadline is not None:
            import time

            desc += f"  {max(0.0, self.deadline - time.time()):.0f} s left in the budget"
        self._progress.update(self._task, completed=step, description=desc)

    def note(self, text: str) -> None:
        if self._progress is not None:
            self._progress.console.print(text)

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
