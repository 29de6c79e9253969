"""Checkpoints carry their own SHA-256: bit rot inside a tensor, which torch reads without complaint, is a
one-line error at load time naming the file and the stage that rewrites it."""

import os
from pathlib import Path

import pytest
import torch
from helpers import use_project_dvc_yaml, write_params

from newllm.training import checkpoint
from newllm.training.checkpoint import CheckpointError


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"w": torch.randn(64, 64, generator=g), "b": torch.zeros(64, dtype=torch.bfloat16),
            "step": torch.tensor(3)}


def test_a_checkpoint_round_trips_and_its_digest_is_over_the_content(tmp_path: Path):
    path = tmp_path / "m.pt"
    checkpoint.save(path, _state(), {"vocab_size": 9})
    state, meta = checkpoint.load(path, expect={"vocab_size": 9})
    assert meta == {"vocab_size": 9} and all(torch.equal(state[k], v) for k, v in _state().items())
    other = {**_state(), "b": torch.ones(64, dtype=torch.bfloat16)}
    assert checkpoint.digest(other, meta) != checkpoint.digest(_state(), meta) != checkpoint.digest(_state(), {})


def test_bytes_flipped_inside_a_tensor_are_refused_naming_the_stage(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    use_project_dvc_yaml(tmp_path)
    write_params(tmp_path / "params.yaml")
    path = Path("data/checkpoints/sweep/lstm/lr0.001.pt")  # the LSTM's sweep cell at lr 0.001 writes it
    checkpoint.save(path, _state(), {"vocab_size": 9})
    raw = bytearray(path.read_bytes())
    weights = _state()["w"].numpy().tobytes()
    at = raw.find(weights)  # torch stores tensors uncompressed: flip bits in the middle of "w", as bit rot does
    assert at > 0
    mid = at + len(weights) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])
    stat = path.stat()
    path.write_bytes(bytes(raw))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # size and mtime kept: DVC sees no change
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    assert not torch.equal(state["w"], _state()["w"])  # torch loads the damaged weights silently
    with pytest.raises(CheckpointError, match=r"checkpoint data/checkpoints/sweep/lstm/lr0.001.pt is corrupted: .*"
                       r"SHA-256.*rerun `dvc repro -f -s baseline_sweep@lstm-0.001`") as e:
        checkpoint.load(path)
    assert "\n" not in str(e.value)


def test_a_checkpoint_without_a_digest_is_refused(tmp_path: Path):
    path = tmp_path / "old.pt"
    torch.save({"state_dict": _state(), "meta": {}}, path)  # as the pipeline wrote them before digests
    with pytest.raises(CheckpointError, match="carries no content digest"):
        checkpoint.load(path)
