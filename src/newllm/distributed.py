"""Data parallelism with torch's own DistributedDataParallel, launched by `torchrun`.

A training stage runs as one process, or under `torchrun --standalone --nproc_per_node=N` (which
`distributed.nproc: N` does for it: the stage re-executes itself under torchrun). Each rank then trains
on its own contiguous 1/N of the batch's streams and evaluates its 1/N of the evaluation rows; DDP
averages the gradients, so one step equals the single-process step on the whole batch, up to the order
of float sums (every rank holds as many tokens). Rank 0 alone writes outputs and the MLflow run.
"""

from __future__ import annotations

import atexit
import os
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn


def launched() -> bool:
    """Started by torchrun with more than one process."""
    return "LOCAL_RANK" in os.environ and int(os.environ.get("WORLD_SIZE", "1")) > 1


def relaunch(nproc: int) -> None:
    """Re-execute this stage (same argv) under torchrun with `nproc` processes on this machine; never
    returns. torchrun takes the job down, and exits non-zero, as soon as any rank fails."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           sys.argv[0], *sys.argv[1:]]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, cmd)


def init(device: str) -> None:
    """Join torchrun's process group: nccl when this rank has a GPU, gloo otherwise."""
    cuda = device != "cpu" and torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))  # "cuda" then means this rank's GPU
    dist.init_process_group("nccl" if cuda else "gloo")
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard_rows(t: Tensor) -> Tensor:
    """This rank's contiguous block of rows (streams) of [rows, ...] (a Tensor or a DiskArray): the first
    rows % world ranks hold one more; all of it in one process, or when there are fewer rows than ranks."""
    w, n = world_size(), t.size(0)
    if w == 1 or n < w:
        return t
    q, r = divmod(n, w)
    start = rank() * q + min(rank(), r)
    return t[start:start + q + (rank() < r)]


def all_sum(t: Tensor) -> Tensor:
    """`t` summed over ranks, in place (a no-op in one process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def wrap(model: nn.Module) -> nn.Module:
    """The module the training step calls: DDP around `model` when there are several ranks."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    p = next(model.parameters())
    return DistributedDataParallel(model, device_ids=[p.device.index] if p.device.type == "cuda" else None)
