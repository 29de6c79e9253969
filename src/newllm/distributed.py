"""Data parallelism with torch's own DistributedDataParallel, launched by `torchrun`.

A training stage runs as one process, or under `torchrun --standalone --nproc_per_node=N` (which
`distributed.nproc: N` does for it: the stage re-executes itself under torchrun). Each rank then trains
on its own contiguous 1/N of the batch's streams and evaluates its 1/N of the evaluation rows; DDP
averages the gradients, so one step equals the single-process step on the whole batch, up to the order
of float sums (every rank holds as many tokens). Rank 0 alone writes outputs and the MLflow run.
"""

from __future__ import annotations

import atexit
import datetime
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
    # Phase 1's exact passes are a relay (rank r waits for rank r - 1 in a collective): longer than the
    # default 10 min (nccl) / 30 min (gloo) on a large corpus. A rank that dies still ends the job at once
    # (torchrun watches its processes); the timeout only bounds a true hang.
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=6))
    atexit.register(lambda: dist.is_initialized() and dist.destroy_process_group())


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    return rank() == 0


def shard_span(n: int) -> tuple[int, int]:
    """This rank's contiguous block [lo, hi) of n items: the first n % world ranks hold one more; all of
    them in one process, or when there are fewer items than ranks."""
    w = world_size()
    if w == 1 or n < w:
        return 0, n
    q, r = divmod(n, w)
    lo = rank() * q + min(rank(), r)
    return lo, lo + q + (rank() < r)


def shard_rows(t: Tensor) -> Tensor:
    """This rank's contiguous block of rows (streams) of [rows, ...] (a Tensor or a DiskArray)."""
    lo, hi = shard_span(t.size(0))
    return t if (lo, hi) == (0, t.size(0)) else t[lo:hi]


def all_sum(t: Tensor) -> Tensor:
    """`t` summed over ranks, in place (a no-op in one process)."""
    if world_size() > 1:
        if dist.get_backend() == "nccl" and not t.is_cuda:  # nccl reduces GPU tensors only
            t.copy_(all_sum(t.cuda()))
        else:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather(t: Tensor) -> list[Tensor]:
    """Every rank's `t` (same shape on every rank), in rank order; [t] in one process."""
    if world_size() == 1:
        return [t]
    out = [torch.empty_like(t) for _ in range(world_size())]
    dist.all_gather(out, t.contiguous())
    return out


def receive_from_previous(like: Tensor) -> Tensor | None:
    """What the previous rank passed on (`pass_to_next`), shaped like `like`; None on rank 0. A relay:
    rank r starts where rank r - 1 ended (Phase 1's exact recurrence over position shards)."""
    if rank() == 0:
        return None
    t = torch.empty_like(like)
    dist.recv(t, src=rank() - 1)
    return t


def pass_to_next(t: Tensor) -> None:
    if world_size() > 1 and rank() + 1 < world_size():
        dist.send(t.contiguous(), dst=rank() + 1)


def broadcast_from_main(model: nn.Module) -> None:
    """Every rank starts from rank 0's weights (what DDP does when it wraps a model)."""
    if world_size() > 1:
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


def wrap(model: nn.Module) -> nn.Module:
    """The module the training step calls: DDP around `model` when there are several ranks."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    p = next(model.parameters())
    return DistributedDataParallel(model, device_ids=[p.device.index] if p.device.type == "cuda" else None)
