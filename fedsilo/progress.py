"""How the round loops talk to the person watching: a log function, and throttled batch lines."""

from __future__ import annotations

import time
from collections.abc import Callable

Log = Callable[[str], None]
# local_train's progress callback: (batches done, batches in all, mean loss so far).
Progress = Callable[[int, int, float], None]

# Within a round, a batch line at most this often: a round of 32 BERT clients on a large dataset
# takes hours, and one line per round alone would look like a hang.
PROGRESS_SECONDS = 15.0


def batch_progress(log: Log, prefix: str, *, last_batch: bool = False) -> Progress:
    """A progress callback that logs ``{prefix} batch d/t loss x`` every PROGRESS_SECONDS, and also
    at the last batch when ``last_batch`` (a silo's own console shows each round's end)."""
    last = time.monotonic()

    def progress(done: int, total: int, loss: float) -> None:
        nonlocal last
        if time.monotonic() - last > PROGRESS_SECONDS or (last_batch and done == total):
            last = time.monotonic()
            log(f"{prefix} batch {done}/{total} loss {loss:.4f}")

    return progress
