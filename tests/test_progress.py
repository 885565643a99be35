"""fedsilo.progress: plain lines with the time left off a terminal, a bar on one."""

from __future__ import annotations

import pytest

from fedsilo import progress


def test_time_left_reads_as_hours_minutes_or_seconds() -> None:
    assert [progress.time_left(s) for s in (0, 12.4, 185, 3720, -3)] == ["0s", "12s", "3m05s", "1h02m", "0s"]


def test_off_a_terminal_batch_lines_say_the_time_left(monkeypatch: pytest.MonkeyPatch) -> None:
    # Prepare: a clock that moves 10 s per batch call; a line whenever 15 s have passed
    clock = iter(float(t) for t in range(0, 1000, 10))
    monkeypatch.setattr(progress.time, "monotonic", lambda: next(clock))
    lines: list[str] = []
    report = progress.batch_progress(lines.append, "round 1: client 1/2", last_batch=True, interactive=False)

    # Execute: batches 20, 40, 60 of 60 at 10 s, 20 s, 30 s after the start
    for done in (20, 40, 60):
        report(done, 60, 0.5)

    # Assert: 20 s in, 40 of 60 done: 10 s left; the last batch has no estimate
    assert lines == [
        "round 1: client 1/2 batch 40/60 loss 0.5000 (about 10s left)",
        "round 1: client 1/2 batch 60/60 loss 0.5000",
    ]


def test_on_a_terminal_a_bar_replaces_the_lines() -> None:
    lines: list[str] = []
    report = progress.batch_progress(lines.append, "round 1:", interactive=True)
    for done in (20, 40, 60):
        report(done, 60, 0.5)
    assert lines == [] and progress._live is None  # the bar went with its last batch
