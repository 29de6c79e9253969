"""DiskArray: a tensor in a raw file, read and written a slab at a time, against the same tensor in RAM."""

import pytest
import torch

from newllm.data import disk_array
from newllm.data.disk_array import DiskArray, scratch_tensor
from newllm.training.batches import batchify


def test_slabs_round_trip_like_a_tensor(tmp_path):
    ref = torch.randn(3, 10, 2, 4)
    a = DiskArray.empty(tmp_path / "a.bin", ref.shape)
    for i in range(0, 10, 3):  # written in slabs of positions, as Phase 1 and the context cache do
        a[:, i:i + 3] = ref[:, i:i + 3]
    for i, j in ((0, 10), (2, 7), (9, 10), (4, 4)):
        assert torch.equal(a[:, i:j], ref[:, i:j])
    assert a.shape == ref.shape and a.size(1) == 10 and a.dim() == 4 and len(a) == 3
    flat = a.reshape(30, 2, 4)
    assert torch.equal(flat[:7].reshape(7, 1, 2, 4)[:, 0:1], ref.reshape(30, 2, 4)[:7].reshape(7, 1, 2, 4))


def test_batchify_windows_read_what_the_tensor_holds(tmp_path):
    """The trainer's use: a (N, L, D) cache cut into B streams and read in windows."""
    ref = torch.randn(53, 2, 3)
    a = DiskArray.empty(tmp_path / "c.bin", ref.shape)
    a.reshape(1, 53, 2, 3)[:, 0:53] = ref[None]  # rows are positions: one slab of all 53
    got, want = batchify(a[:50], 4), batchify(ref[:50], 4)
    assert got.shape == want.shape
    for i in range(0, want.size(1), 5):
        assert torch.equal(got[:, i:i + 5], want[:, i:i + 5])


def test_bf16_and_refused_indexing(tmp_path):
    ref = torch.randn(2, 5, 3).bfloat16()
    a = DiskArray.empty(tmp_path / "b.bin", ref.shape, torch.bfloat16)
    a[:, 0:5] = ref
    assert torch.equal(a[:, 1:4], ref[:, 1:4])
    with pytest.raises(TypeError, match="a\\[i:j\\] and a\\[:, i:j\\]"):
        a[0]
    with pytest.raises(TypeError, match="step 1 only"):
        a[::2]


def test_a_block_of_rows_is_a_view_of_the_same_bytes(tmp_path):
    ref = torch.randn(6, 7, 3)  # 6 streams: a DDP rank reads rows 2..3 of them
    a = DiskArray.empty(tmp_path / "r.bin", ref.shape)
    a[:, 0:7] = ref
    rows = a[2:4]
    assert rows.shape == (2, 7, 3) and torch.equal(rows[:, 1:5], ref[2:4, 1:5])
    rows[:, 0:2] = torch.zeros(2, 2, 3)
    assert torch.equal(a[:, 0:7][2:4, 0:2], torch.zeros(2, 2, 3)) and torch.equal(a[:, 0:7][4:], ref[4:])


def test_scratch_tensor_goes_to_disk_only_when_large(tmp_path, monkeypatch):
    assert isinstance(scratch_tensor((4, 4), path=tmp_path / "x.bin"), torch.Tensor)
    assert isinstance(scratch_tensor((4, 4)), torch.Tensor)  # no path: always in RAM
    monkeypatch.setattr(disk_array, "IN_MEMORY_BYTES", 32)
    assert isinstance(scratch_tensor((4, 4), path=tmp_path / "x.bin"), DiskArray)


def test_short_reads_and_writes_are_completed(tmp_path, monkeypatch):
    """os.preadv/pwritev move at most ~2 GiB a call: a DiskArray loops until every byte is moved."""
    import os

    real_r, real_w = os.preadv, os.pwritev
    monkeypatch.setattr(os, "pwritev", lambda fd, bufs, pos: real_w(fd, [bufs[0][:5]], pos))
    monkeypatch.setattr(os, "preadv", lambda fd, bufs, pos: real_r(fd, [bufs[0][:3]], pos))
    ref = torch.randn(2, 7, 3)
    a = DiskArray.empty(tmp_path / "s.bin", ref.shape)
    a[:, 0:7] = ref
    assert torch.equal(a[:, 0:7], ref)
