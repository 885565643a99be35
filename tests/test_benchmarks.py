"""The round-trip benchmark's ranks still drive fedsilo's unmodified round loops. They broke once
without a sound: the ledger gained the server optimiser's state, and the benchmark's stand-in for
it did not, so every secure-aggregation and round-trip figure came out "failed"."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedsilo.launcher import free_port
from tests.procs import HANG_GUARD, environment

ROUNDTRIP = Path(__file__).resolve().parents[1] / "benchmarks" / "roundtrip.py"


@pytest.mark.slow  # three processes, each importing torch and transformers: about a minute on 2 cores
def test_the_round_trip_ranks_time_plain_secure_aggregation_and_the_floor(tmp_path: Path) -> None:
    # Prepare: a stand-in model of three tensors (the last two are the classifier its forward uses)
    shapes = tmp_path / "shapes.json"
    shapes.write_text(json.dumps([[100, 8], [2, 8], [2]]))
    out, port = tmp_path / "out.json", free_port()
    # Execute: an aggregator and two silos, one block of two rounds of each kind
    ranks = [
        subprocess.Popen(
            [
                sys.executable,
                str(ROUNDTRIP),
                *("--rank", str(rank), "--silos", "2", "--shapes", str(shapes), "--port", str(port)),
                *("--rounds", "2", "--blocks", "1", "--workdir", str(tmp_path), "--out", str(out)),
                *("--kinds", "fedsilo,secagg,floor", "--train-seconds", "0.1"),
            ],
            env=environment(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(3)
    ]
    outputs = [rank.communicate(timeout=HANG_GUARD)[0] for rank in ranks]
    # Assert: every rank finished, and rank 0 timed two rounds of each kind
    assert [rank.returncode for rank in ranks] == [0, 0, 0], "\n".join(outputs)
    timings = json.loads(out.read_text())
    for kind in ("fedsilo_comm_seconds", "secagg_comm_seconds", "floor_seconds"):
        assert len(timings[kind]) == 2 and all(t > 0 for t in timings[kind]), kind
