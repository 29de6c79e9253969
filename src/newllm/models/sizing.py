"""Width search: the size knob that brings a baseline to New-LLM's total parameter count (±10 %)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def match_width(build: Callable[[int], nn.Module], target: int, step: int = 2, tolerance: float = 0.10,
                max_width: int = 1 << 14) -> int:
    """The width w (a multiple of `step`) whose model `build(w)` has total params closest to `target`.

    Models are built on the meta device: shapes only, no memory and no initialisation (nor RNG draws).
    The count grows with w, so the scan stops once it passes the target. Raises ValueError when even the
    closest width is more than `tolerance` away (e.g. a vocabulary matrix alone larger than the target).
    """
    best_w, best_n = step, None
    for w in range(step, max_width + 1, step):
        with torch.device("meta"):
            n = sum(p.numel() for p in build(w).parameters())
        if best_n is None or abs(n - target) < abs(best_n - target):
            best_w, best_n = w, n
        if n > target:
            break
    if abs(best_n - target) > tolerance * target:
        raise ValueError(f"match_width: no width within ±{tolerance:.0%} of {target:,} params (closest: "
                         f"{best_w} -> {best_n:,})")
    return best_w
