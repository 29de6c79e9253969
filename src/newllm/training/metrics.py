"""The research's metrics, computed exactly as it computed them (docs/research.md §3 "Metrics")."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import Tensor


def singular_values(matrix: Tensor, method: Literal["gram", "svd"] = "gram") -> Tensor:
    """Singular values of a (rows x dim) matrix, largest first, in float64.

    `svd`: torch.linalg.svdvals (the reference). `gram` (default): sqrt of the eigenvalues of the smaller
    Gram matrix (M^T M or M M^T), formed and decomposed in float64: the same numbers down to ~1e-8 of the
    largest (tests pin the agreement) at a fraction of an SVD's cost, which matters because Phase 1
    reports the ER every iteration. Float64 is not optional here: a float32 Gram matrix carries rounding
    noise of ~1e-7 of its largest eigenvalue, i.e. spurious singular values of ~3e-4 of the largest, and
    hundreds of those inflate the ER of a collapsed (low-rank) matrix -- the very case ER must detect.
    """
    m = matrix.detach().double()
    if method == "svd":
        return torch.linalg.svdvals(m)
    gram = m.T @ m if m.size(0) >= m.size(1) else m @ m.T
    with _one_cpu_thread(gram):
        return torch.linalg.eigvalsh(gram).clamp_min(0).sqrt().flip(0)


@contextmanager
def _one_cpu_thread(t: Tensor) -> Iterator[None]:
    """Run a CPU eigensolver on one thread. Its tridiagonal reduction is hundreds of small BLAS-2 calls,
    each a parallel region with a barrier; on a shared machine (more runnable threads than cores) every
    barrier can wait out a scheduler time slice, and a 768 x 768 eigvalsh that takes 0.05 s on one thread
    took 17 s on two. One thread loses little when the machine is idle."""
    if t.device.type != "cpu":
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def effective_rank(matrix: Tensor, max_rows: int = 10000, generator: torch.Generator | None = None,
                   method: Literal["gram", "svd"] = "gram") -> float:
    """exp(entropy) of the normalised singular values of the *uncentred* matrix (the research's ER).

    p = s / sum(s) on the singular values themselves (not squared), ER = exp(-sum p log p), between 1
    (rank one) and min(rows, dim). When the matrix has more than `max_rows` rows, a random subset of
    `max_rows` rows is used (seeded by `generator`, a CPU generator). Divide by dim for the "ER %".
    """
    if matrix.dim() != 2:
        raise ValueError(f"effective_rank wants a (rows, dim) matrix, got shape {tuple(matrix.shape)}")
    if matrix.size(0) > max_rows:
        idx = torch.randperm(matrix.size(0), generator=generator)[:max_rows]
        matrix = matrix[idx.to(matrix.device)]
    s = singular_values(matrix, method)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s / total
    p = p[p > 0]
    return math.exp(-(p * p.log()).sum().item())


def effective_rank_pct(contexts: Tensor, max_rows: int, gen: torch.Generator | None) -> tuple[float, float]:
    """contexts (..., Dc) -> (ER, 100 * ER / Dc) of their rows (at most max_rows, drawn from gen)."""
    er = effective_rank(contexts.reshape(-1, contexts.size(-1)), max_rows=max_rows, generator=gen)
    return er, 100.0 * er / contexts.size(-1)


def convergence_rate(curr: Tensor, prev: Tensor, threshold: float) -> float:
    """Share of tokens t with mean_d (curr[t] - prev[t])^2 < threshold; curr, prev (..., tokens, dim)."""
    if curr.shape != prev.shape:
        raise ValueError(f"convergence_rate: shapes differ {tuple(curr.shape)} vs {tuple(prev.shape)}")
    per_token = (curr.float() - prev.float()).pow(2).mean(dim=-1)
    return (per_token < threshold).float().mean().item()


def perplexity(mean_ce: float) -> float:
    """exp(mean cross-entropy per token), capped to stay finite for absurd losses."""
    return math.exp(min(mean_ce, 700.0))
