"""A tensor kept in a raw file and read or written a slab at a time: what lets a corpus's per-position
vectors (Phase 1's iterates, Phase 2's context cache) exceed RAM while the process stays O(slab).

Why not np.memmap: every page a mapping touches counts in the process's resident set until it is unmapped,
so reading a memmap end to end grows RSS to the file's size. `os.preadv` / `os.pwritev` go through the page
cache, which the kernel owns and reclaims, and the process holds only the slab it asked for.

`DiskArray` answers the few tensor calls the trainer and Phase 1 make on their per-position data:
`shape` / `size()` / `dim()`, `a[i:j]` (a view of rows along dim 0), `reshape(...)` (same bytes, C order) and,
on an array of >= 2 dims, `a[:, i:j]` (a read, one contiguous run per index of dim 0, returned as a
Tensor) and `a[:, i:j] = values` (a write).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
from torch import Tensor


class DiskArray:
    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype: torch.dtype = torch.float32,
                 *, create: bool = True, _offset: int = 0):
        self.path, self.shape, self.dtype, self._offset = Path(path), torch.Size(shape), dtype, _offset
        self._itemsize = torch.empty((), dtype=dtype).element_size()
        if create:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "wb") as f:  # sparse: blocks are allocated as slabs are written
                f.truncate(math.prod(shape) * self._itemsize)
        self._fd: int | None = None

    @classmethod
    def empty(cls, path: str | Path, shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> DiskArray:
        return cls(path, shape, dtype)

    # ------------------------------------------------------------------------------------------- shape
    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return math.prod(self.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def _view(self, shape: tuple[int, ...], offset: int) -> DiskArray:
        return DiskArray(self.path, shape, self.dtype, create=False, _offset=offset)

    def reshape(self, *shape: int) -> DiskArray:
        shape = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], (tuple, list, torch.Size)) else shape
        if -1 in shape:
            known = math.prod(s for s in shape if s != -1)
            shape = tuple(self.numel() // known if s == -1 else s for s in shape)
        if math.prod(shape) != self.numel():
            raise ValueError(f"cannot reshape a DiskArray of shape {tuple(self.shape)} to {shape}")
        return self._view(shape, self._offset)

    def __repr__(self) -> str:
        return f"DiskArray({str(self.path)!r}, shape={tuple(self.shape)}, dtype={self.dtype})"

    # ------------------------------------------------------------------------------------------- I/O
    def _slab(self, key) -> tuple[int, int] | None:
        """key -> (i, j) for a[:, i:j] (None for a[i:j], a view of rows); anything else is refused."""
        if isinstance(key, slice):
            return None
        if (isinstance(key, tuple) and len(key) == 2 and key[0] == slice(None) and isinstance(key[1], slice)
                and key[1].step in (None, 1) and self.dim() >= 2):
            i, j, _ = key[1].indices(self.shape[1])
            return i, max(i, j)
        raise TypeError(f"DiskArray supports a[i:j] and a[:, i:j], got {key!r}")

    def _runs(self, i: int, j: int):
        """(byte offset, row index) of each contiguous run of a[:, i:j]."""
        inner = math.prod(self.shape[2:])
        row = self.shape[1] * inner
        for r in range(self.shape[0]):
            yield (self._offset + r * row + i * inner) * self._itemsize, r

    def _file(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR)
        return self._fd

    def __getitem__(self, key) -> DiskArray | Tensor:
        slab = self._slab(key)
        if slab is None:  # a[i:j]: entries i..j-1 of dim 0 (a prefix, or a DDP rank's rows), still on disk
            start, stop, step = key.indices(self.shape[0])
            if step != 1:
                raise TypeError(f"DiskArray supports a[i:j] with step 1 only, got {key!r}")
            stop = max(start, stop)
            return self._view((stop - start, *self.shape[1:]), self._offset + start * math.prod(self.shape[1:]))
        i, j = slab
        out = torch.empty((self.shape[0], j - i, *self.shape[2:]), dtype=self.dtype)
        if j > i:
            fd = self._file()
            for pos, r in self._runs(i, j):
                _all(os.preadv, fd, memoryview(out[r].view(torch.uint8).numpy()).cast("B"), pos, self.path)
        return out

    def __setitem__(self, key, values: Tensor) -> None:
        slab = self._slab(key)
        if slab is None:
            raise TypeError("DiskArray writes go to a[:, i:j]")
        i, j = slab
        values = values.detach().to("cpu", self.dtype).expand(self.shape[0], j - i, *self.shape[2:]).contiguous()
        fd = self._file()
        for pos, r in self._runs(i, j):
            _all(os.pwritev, fd, memoryview(values[r].view(torch.uint8).numpy()).cast("B"), pos, self.path)

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None:
            os.close(self._fd)


def _all(io, fd: int, buf: memoryview, pos: int, path: Path) -> None:
    """os.preadv / os.pwritev until every byte is moved: one call moves at most ~2 GiB on Linux."""
    while len(buf):
        n = io(fd, [buf], pos)
        if n <= 0:
            raise OSError(f"{path}: {'read' if io is os.preadv else 'write'} stopped at byte {pos} (file truncated?)")
        buf, pos = buf[n:], pos + n


# Per-position data above this size goes to disk when the caller gives a scratch path: memory then stays
# flat as the corpus grows (a 100 k-token, 512-dim iterate is 200 MB; WikiText-2's whole train split 5.5 GB).
IN_MEMORY_BYTES = 256 * 2**20


def scratch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32, path: str | Path | None = None,
                   device: str | torch.device = "cpu") -> Tensor | DiskArray:
    """An uninitialised (shape) buffer: a Tensor on `device`, or a DiskArray at `path` when one is given and
    the buffer is larger than IN_MEMORY_BYTES (on a GPU: larger than half its free memory too)."""
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    device = torch.device(device)
    # a GPU holds it when it fits in half its free memory: disk -> GPU copies would cost more than they save
    on_gpu = device.type == "cuda" and nbytes < torch.cuda.mem_get_info(device)[0] // 2
    if path is not None and nbytes > IN_MEMORY_BYTES and not on_gpu:
        return DiskArray.empty(path, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)
