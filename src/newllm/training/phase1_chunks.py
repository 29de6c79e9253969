"""Phase 1 over a corpus too large for one batched pass, and over several processes (torchrun).

A chunk is a span of positions (cfg.chunk_tokens over all streams). The iterate P lives in `scratch_tensor`
storage (on disk when large) and is updated in place, chunk by chunk, left to right: the one context a
chunk needs from before it, P[:, a-1], is carried.

Chunks: with more than cfg.chunk_tokens positions (parallel mode), every pass runs a chunk at a time
(`chunked_step`), the same update up to float error (with noise 0: the chunks draw their noise
separately), and the iterates go to disk under `scratch` when large (`scratch_tensor`): memory is
O(chunk). Such a run keeps no resume checkpoint (its iterate is the size of the corpus): it restarts.

Under torchrun (distributed.py) each rank holds a contiguous block of the positions of every stream and
runs the chunked step on it: a shard's first input context is the previous rank's last one from the
previous iterate (the one-token lag a Jacobi step has anyway), pass A's sums and the gradients are
summed over ranks, so the update is the one-process step up to float sums (noise 0; with noise, each
rank draws its own). The exact passes (iteration 0, the final checks, val ER) are sequential along a
stream: they run as a relay, rank r from the context rank r - 1 ended with. Parallel mode only; no
resume checkpoint (as for chunks).

The algorithm and its driver are in phase1.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from newllm import distributed
from newllm.config import Phase1Config
from newllm.models.cvfp import NewLLM
from newllm.training.metrics import effective_rank_pct
from newllm.training.trainer import check_finite

FirstContext = Literal["zero", "wrap"]


def chunk_spans(n: int, size: int) -> list[tuple[int, int]]:
    """[a, b) position ranges of length `size` (the last shorter) covering [0, n)."""
    return [(a, min(a + size, n)) for a in range(0, n, max(1, size))]


def boundary_context(P, first: FirstContext, device: torch.device) -> Tensor:
    """The input context of an iterate P's (S, N, Dc) first position, (S, 1, Dc): a stream start's (zero,
    or "wrap": P[:, N-1]) or, when the ranks hold consecutive position shards (DDP), the previous rank's
    last column of P (one all-gather: the one-token lag of a Jacobi step, as at a chunk boundary). A
    collective: every rank calls it, before any rank overwrites its P."""
    S, N, Dc = P.shape
    last = P[:, N - 1:N].to(device).clone()
    if distributed.world_size() == 1:
        return last if first == "wrap" else torch.zeros(S, 1, Dc, device=device)
    cols, r = distributed.all_gather(last), distributed.rank()
    return cols[r - 1] if r > 0 else (cols[-1] if first == "wrap" else torch.zeros_like(last))


def iterate_chunks(P, spans: list[tuple[int, int]], carry: Tensor, device: torch.device):
    """For each chunk [a, b) of an iterate P (S, N, Dc) -> (a, b, inputs, old): old = P[:, a:b] and inputs its
    shift (position t gets P[:, t-1]; the first position `carry`, from boundary_context), both (S, b-a, Dc)
    on `device` and read before the caller may overwrite P[:, a:b]."""
    for a, b in spans:
        old = P[:, a:b].to(device)
        inputs, next_carry = torch.cat([carry, old[:, :-1]], dim=1), old[:, -1:].clone()  # before the caller
        yield a, b, inputs, old  # may overwrite P[:, a:b] (old is then a view of the new values)
        carry = next_carry


@torch.no_grad()
def exact_chunks(model: NewLLM, streams: Tensor, spans: list[tuple[int, int]]):
    """The exact recurrence over streams (S, N), chunk by chunk with the context carried ->
    (a, b, last-layer contexts (S, b-a, Dc)). fp32 (see sequential_pass). Over position shards (DDP) a
    relay: this rank starts from the context the previous rank ended with (the recurrence is sequential)."""
    c = distributed.receive_from_previous(streams.new_zeros(streams.size(0), model.context_dim, dtype=torch.float32))
    for a, b in spans:
        ctx, c = model.sequential_contexts(streams[:, a:b], initial=c)
        yield a, b, ctx[..., -1, :]
    distributed.pass_to_next(c)



def exact_er(model: NewLLM, all_streams: Tensor, per_chunk: int, max_rows: int, gen: torch.Generator,
             device: torch.device) -> tuple[float, float]:
    """(ER, ER %) of the exact contexts of all_streams (S, N), this rank's shard of them chunk by chunk,
    rows gathered over ranks (val's ER)."""
    lo, hi = distributed.shard_span(all_streams.size(1))
    streams = all_streams[:, lo:hi].to(device)
    rows = RowSample(streams.size(0), all_streams.size(1), model.context_dim, max_rows, gen, offset=lo)
    for a, b, exact in exact_chunks(model, streams, chunk_spans(streams.size(1), per_chunk)):
        rows.add(a, b, exact)
    return rows.er(max_rows)


@torch.no_grad()
def parallel_vs_exact(forward: Callable[[Tensor, Tensor], Tensor], model: NewLLM, streams: Tensor, P,
                      spans: list[tuple[int, int]], first: FirstContext, rows: RowSample, positions: int) -> float:
    """Mean cosine between one noiseless parallel pass from the iterate P (S, N, Dc), `forward(streams,
    inputs)`, and the exact recurrence, same weights, over every rank's positions; `rows` gathers the
    exact contexts' rows (the train ER)."""
    S, Dc, device = streams.size(0), P.shape[-1], streams.device
    cos_sum, carry = 0.0, boundary_context(P, first, device)  # before the relay: every rank gathers first
    for (a, b, exact), (_, _, inputs, _) in zip(exact_chunks(model, streams, spans),
                                                iterate_chunks(P, spans, carry, device), strict=True):
        C = forward(streams[:, a:b], inputs).reshape(S, b - a, Dc)
        cos_sum += F.cosine_similarity(C, exact, dim=-1).mean().item() * (S * (b - a)) / positions
        rows.add(a, b, exact)
    return distributed.all_sum(torch.tensor(cos_sum, dtype=torch.float64)).item() if distributed.world_size() > 1 \
        else cos_sum


class RowSample:
    """The rows `effective_rank(C.reshape(-1, Dc), max_rows, gen)` would draw from an (S, N, Dc) C (the same
    draw from `gen`), gathered chunk by chunk, so a chunked ER equals the one-pass ER. Under DDP each rank
    adds the rows of its positions (from `offset` on) and `er` sums them over ranks."""

    def __init__(self, S: int, N: int, Dc: int, max_rows: int, gen: torch.Generator, offset: int = 0):
        idx = torch.randperm(S * N, generator=gen)[:max_rows] if S * N > max_rows else torch.arange(S * N)
        self.s, self.t, self.rows, self.offset = idx // N, idx % N - offset, torch.zeros(len(idx), Dc), offset

    def add(self, a: int, b: int, C: Tensor) -> None:
        m = (self.t >= a) & (self.t < b)
        self.rows[m] = C[self.s[m].to(C.device), (self.t[m] - a).to(C.device)].float().cpu()

    def er(self, max_rows: int) -> tuple[float, float]:
        return effective_rank_pct(distributed.all_sum(self.rows), max_rows, None)


def chunked_step(forward: Callable[[Tensor, Tensor], Tensor], streams: Tensor, P, P0,
                 spans: list[tuple[int, int]], cfg: Phase1Config, gen: torch.Generator, params: list[Tensor],
                 where: str, last_loss: float, last: RowSample | None = None,
                 positions: int | None = None) -> tuple[tuple[float, float, float], int]:
    """The gradient of one parallel-iteration step over every position, a chunk at a time, equal to the
    one-pass step's up to float error, left in params' .grad -> ((cvfp, diversity, total), converged positions).
    `forward(streams[:, a:b], inputs)` is the training pass (S, b-a) x (S, b-a, Dc) -> (S*(b-a), Dc), noise
    drawn from `gen` included; the caller zeroes the gradients before and takes the optimiser step after.

    The diversity term -||C - mean C||_F / T couples all positions, but its gradient is local once mean C
    (mu) and the norm are known: -(C_t - mu) / (norm * T). So pass A (no grad) gathers mu, the norm and the
    cvfp error; pass B reruns each chunk with grad, from the same noise, and backpropagates the loss whose
    gradient is the full-batch one. With `last` (the iteration's last step), pass B also writes C over P
    (in place, its metrics' rows into `last`) and counts the positions within the convergence threshold.

    Under DDP each rank holds a block of the positions (`positions` in all): pass A's sums and pass B's
    gradients are summed over ranks (by hand, as DDP's reducer would: a rank backpropagates once per
    chunk, and the ranks' chunk counts may differ), so every rank takes the one full-batch step.
    """
    S, N = streams.shape
    T, Dc, w, device = positions or S * N, P.shape[-1], cfg.dist_reg_weight, streams.device
    carry = boundary_context(P, cfg.first_context, device)
    noise_state = gen.get_state()

    def outputs(a: int, b: int, inputs: Tensor) -> Tensor:
        return forward(streams[:, a:b], inputs).reshape(S, b - a, Dc)

    def target(a: int, b: int, old: Tensor) -> Tensor:
        return P0[:, a:b].to(device) if cfg.target == "fixed" else old

    total, sq, err = torch.zeros(Dc, dtype=torch.float64, device=device), 0.0, 0.0
    with torch.no_grad():
        for a, b, inputs, old in iterate_chunks(P, spans, carry, device):
            C = outputs(a, b, inputs).double()
            total += C.sum(dim=(0, 1))
            sq += C.pow(2).sum().item()
            err += (C - target(a, b, old)).pow(2).sum().item()
    if distributed.world_size() > 1:
        sums = distributed.all_sum(torch.cat([total, torch.tensor([sq, err], dtype=torch.float64, device=device)]))
        total, sq, err = sums[:Dc], sums[Dc].item(), sums[Dc + 1].item()
    mu = (total / T).float()
    norm = math.sqrt(max(sq - T * (total / T).pow(2).sum().item(), 0.0))
    cvfp, diversity = err / (T * Dc), -norm / T
    losses = (cvfp, diversity, (1.0 - w) * cvfp + w * diversity)
    check_finite(losses[2], where, last_loss)

    gen.set_state(noise_state)  # pass B draws pass A's noise
    converged = 0
    for a, b, inputs, old in iterate_chunks(P, spans, carry, device):
        C = outputs(a, b, inputs)
        div_grad = (C.detach() - mu) / (norm * T) if norm > 0 else torch.zeros_like(C)
        loss = (1.0 - w) * (C - target(a, b, old)).pow(2).sum() / (T * Dc) - w * (C * div_grad).sum()
        loss.backward()
        if last is not None:
            C = C.detach()
            converged += int(((C - old).pow(2).mean(dim=-1) < cfg.convergence_threshold).sum())
            last.add(a, b, C)
            P[:, a:b] = C
    if distributed.world_size() > 1:
        for p in params:
            if p.grad is not None:
                distributed.all_sum(p.grad)
        converged = int(distributed.all_sum(torch.tensor(converged)))
    return losses, converged
