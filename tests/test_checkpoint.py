"""Atomic checkpoints: round trip, and refusals that name the file instead of a traceback."""

from pathlib import Path

import pytest
import torch

from fedsilo import checkpoint
from fedsilo.errors import ConfigError


def saved(directory: Path, labels: list[str] | None = None) -> checkpoint.Checkpoint:
    state = checkpoint.Checkpoint(3, torch.arange(6, dtype=torch.float32), "run-1", labels or ["neg", "pos"], "f1")
    checkpoint.save(directory, state)
    return state


def test_round_trip_leaves_no_temporary_file(tmp_path: Path) -> None:
    state = saved(tmp_path)
    loaded = checkpoint.load(tmp_path, "f1")
    assert loaded is not None and (loaded.round, loaded.run_id, loaded.labels) == (3, "run-1", ["neg", "pos"])
    assert torch.equal(loaded.weights, state.weights)
    assert [p.name for p in (tmp_path / "f1").iterdir()] == ["latest.pt"]


def test_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert checkpoint.load(tmp_path, "f1") is None


@pytest.mark.parametrize("content", [b"", b"half a checkpoint"])
def test_garbage_is_named(tmp_path: Path, content: bytes) -> None:
    (tmp_path / "f1").mkdir()
    (tmp_path / "f1" / "latest.pt").write_bytes(content)
    with pytest.raises(ConfigError, match=r"checkpoint .*latest.pt is unreadable .*move it away"):
        checkpoint.load(tmp_path, "f1")


def test_a_valid_torch_file_of_another_kind_is_named(tmp_path: Path) -> None:
    (tmp_path / "f1").mkdir()
    torch.save({"weights": torch.zeros(2)}, tmp_path / "f1" / "latest.pt")
    with pytest.raises(ConfigError, match="is unreadable"):
        checkpoint.load(tmp_path, "f1")


def test_a_checkpoint_for_other_labels_or_another_model_is_refused(tmp_path: Path) -> None:
    state = saved(tmp_path)
    checkpoint.check_fits(state, tmp_path, ["neg", "pos"], 6)
    with pytest.raises(ConfigError, match=r"written for labels \[neg, pos\], this federation has \[a, b\]"):
        checkpoint.check_fits(state, tmp_path, ["a", "b"], 6)
    with pytest.raises(ConfigError, match="holds 6 weights, the model has 7"):
        checkpoint.check_fits(state, tmp_path, ["neg", "pos"], 7)


def test_unwritable_directory_is_named(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is not writable"):
        checkpoint.ensure_writable(tmp_path / "file" / "ckpt")


def test_the_server_optimisers_state_round_trips(tmp_path: Path) -> None:
    state = checkpoint.Checkpoint(
        2, torch.arange(6.0), "run-1", ["neg", "pos"], "f1", {"m": torch.full((6,), 0.5), "v": torch.ones(6)}
    )
    checkpoint.save(tmp_path, state)
    loaded = checkpoint.load(tmp_path, "f1")
    assert loaded is not None and set(loaded.server_state) == {"m", "v"}
    assert torch.equal(loaded.server_state["m"], state.server_state["m"])
    checkpoint.check_fits(loaded, tmp_path, ["neg", "pos"], 6)
    short = checkpoint.Checkpoint(2, torch.arange(6.0), None, ["neg", "pos"], "f1", {"m": torch.zeros(5)})
    with pytest.raises(ConfigError, match="holds 5 values of m, the model has 6"):
        checkpoint.check_fits(short, tmp_path, ["neg", "pos"], 6)


def test_a_fedavg_checkpoint_is_the_file_older_versions_wrote_and_read(tmp_path: Path) -> None:
    saved(tmp_path)
    raw = torch.load(tmp_path / "f1" / "latest.pt", weights_only=True)
    assert set(raw) == {"round", "weights", "run_id", "labels", "fingerprint"}
    loaded = checkpoint.load(tmp_path, "f1")
    assert loaded is not None and loaded.server_state == {}
