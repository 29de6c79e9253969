"""Width search: the size knob that brings a baseline to New-LLM's total parameter count (±10 %)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def match_width(count: Callable[[int], int], target: int, step: int = 2, tolerance: float = 0.10,
                max_width: int = 1 << 14) -> int:
    """The width w (a multiple of `step`) whose parameter count `count(w)` is closest to `target`.

    The count grows with w, so the scan stops once it passes the target. Raises ValueError when even the
    closest width is more than `tolerance` away (e.g. a vocabulary matrix alone larger than the target).
    """
    best_w, best_n = step, None
    for w in range(step, max_width + 1, step):
        n = count(w)
        if best_n is None or abs(n - target) < abs(best_n - target):
            best_w, best_n = w, n
        if n > target:
            break
    if abs(best_n - target) > tolerance * target:
        raise ValueError(f"match_width: no width within ±{tolerance:.0%} of {target:,} params (closest: "
                         f"{best_w} -> {best_n:,})")
    return best_w


def meta_count(build: Callable[[int], nn.Module]) -> Callable[[int], int]:
    """count(w) for match_width: total params of build(w), built on the meta device (shapes only: no
    memory, no initialisation, no RNG draws)."""
    def count(w: int) -> int:
        with torch.device("meta"):
            return sum(p.numel() for p in build(w).parameters())

    return count
