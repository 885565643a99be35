"""How the round loops talk to the person watching: a log function, batch progress, and estimates
of the time left.

On a terminal, local training shows a progress bar with its time left (rich, which Typer brings);
anywhere else (a pipe, ``fedsilo run``'s prefixed children, a pod's log) a plain line at most every
PROGRESS_SECONDS, with the same estimate. Round lines add the federation's time left (fedsilo.ledger).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

Log = Callable[[str], None]
# local_train's progress callback: (batches done, batches in all, mean loss so far).
Progress = Callable[[int, int, float], None]

# Within a round, a batch line at most this often: a round of 32 BERT clients on a large dataset
# takes hours, and one line per round alone would look like a hang.
PROGRESS_SECONDS = 15.0

# The one bar on screen; a new round's bar replaces a bar left behind by a failed one.
_live: Any = None


def on_terminal() -> bool:
    """Whether stdout is a terminal that can redraw a bar."""
    return sys.stdout.isatty() and os.environ.get("TERM", "") != "dumb"


def time_left(seconds: float) -> str:
    """``1h02m``, ``3m05s`` or ``12s``: an estimate, so to the second at most."""
    whole = max(0, round(seconds))
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def batch_progress(log: Log, prefix: str, *, last_batch: bool = False, interactive: bool | None = None) -> Progress:
    """A progress callback for one local training: a bar on a terminal (``interactive``, default:
    :func:`on_terminal`), else ``{prefix} batch d/t loss x (about T left)`` every PROGRESS_SECONDS,
    and also at the last batch when ``last_batch`` (a silo's own console shows each round's end)."""
    if interactive if interactive is not None else on_terminal():
        return _bar(prefix)
    started = last = time.monotonic()

    def progress(done: int, total: int, loss: float) -> None:
        nonlocal last
        now = time.monotonic()
        if now - last > PROGRESS_SECONDS or (last_batch and done == total):
            last = now
            left = "" if done >= total else f" (about {time_left((now - started) / done * (total - done))} left)"
            log(f"{prefix} batch {done}/{total} loss {loss:.4f}{left}")

    return progress


def _bar(prefix: str) -> Progress:
    """A rich bar that appears at the first call and goes at the last batch (its round's line stays)."""
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bars

    global _live
    if _live is not None:
        _live.stop()
    bars = Bars(
        TextColumn(f"{prefix} [progress.description]{{task.description}}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        transient=True,
    )
    task: Any = None

    def progress(done: int, total: int, loss: float) -> None:
        global _live
        nonlocal task
        if task is None:
            bars.start()
            _live = bars
            task = bars.add_task("batches", total=total)
        bars.update(task, completed=done, description=f"loss {loss:.4f}")
        if done >= total:
            bars.stop()
            _live = None

    return progress
