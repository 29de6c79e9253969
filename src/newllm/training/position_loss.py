"""How much context each model really uses: test loss against the position within a window.

The token stream is cut into back-to-back windows of `window` + 1 tokens. Every window starts with no
past (an empty state: zero context for New-LLM and CVP, zero (h, c) for the LSTM), so the prediction at
position p of a window (of token p + 1) has seen exactly p + 1 tokens. A model that only sees its input
(`windowed`, the Transformer) sees at most `max_context` of them (its trained seq_len), in the sliding
windows `evaluate` uses. A curve that stops falling at position p says the model's predictions gain
nothing from more than ~p tokens of past: for New-LLM, the memory horizon of its fixed-size context.

Stateful models run over the window in pieces of `max_context` with the state carried, as in training;
New-LLM runs its exact recurrence (its full NewLLM, not the Phase 2 view on cached contexts, whose
contexts carry the whole stream's past).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.training.batches import sliding_windows, windows
from newllm.training.trainer import _model_device, autocast


@torch.no_grad()
def position_losses(model: nn.Module, ids: Tensor, window: int, max_context: int, batch_size: int = 16
                    ) -> tuple[Tensor, int]:
    """ids (N,) -> (mean cross-entropy at each position 0 .. window-1 (window,) float64, windows scored)."""
    n_windows = (ids.numel() - 1) // (window + 1)
    if n_windows < 1:
        raise ValueError(f"{ids.numel()} tokens are too few for one window of {window} + 1")
    device = _model_device(model)
    rows = ids[: n_windows * (window + 1)].reshape(n_windows, window + 1)
    was_training = model.training
    model.eval()
    total = torch.zeros(window, dtype=torch.float64)
    windowed = getattr(model, "windowed", False)
    for r in range(0, n_windows, batch_size):
        data = rows[r:r + batch_size].to(device)
        state = None
        spans = (sliding_windows(window + 1, max_context) if windowed
                 else ((i, t, t) for i, t in windows(window + 1, max_context)))
        for i, t, scored in spans:
            with autocast(device):
                logits, state = model(data[:, i:i + t], state)
            logits = logits[:, t - scored:].float()
            y = data[:, i + 1 + t - scored:i + 1 + t]
            ce = F.cross_entropy(logits.transpose(1, 2), y, reduction="none")  # (B, scored)
            total[i + t - scored:i + t] += ce.double().sum(0).cpu()
    model.train(was_training)
    return total / n_windows, n_windows


def log_bins(curve: Tensor) -> dict[int, float]:
    """{p: mean loss of the predictions that have seen p .. 2p - 1 tokens} for p = 1, 2, 4, ...: one
    position's loss is a handful of tokens on a small test split; a bin of a doubling range is not."""
    out, p, n = {}, 1, curve.numel()
    while 2 * p - 1 <= n:  # whole bins only: a last, partial one would be a few positions' noise
        out[p] = float(curve[p - 1:2 * p - 1].mean())
        p *= 2
    return out


@torch.no_grad()
def truncation_losses(model: nn.Module, ids: Tensor, window: int, max_context: int, targets: int = 512,
                      batch_size: int = 64) -> dict[int, float]:
    """Context truncation (Khandelwal et al. 2018): {d: mean test loss of predicting token t + 1 from only
    the last d tokens x[t-d+1 .. t]}, d = 1, 2, 4, ..., window, on the same `targets` evenly spaced
    positions t (each with `window` tokens of past available), each run from an empty state. A windowed
    model (the Transformer) sees at most `max_context` of the d tokens, its trained positions."""
    if ids.numel() < window + 2:
        raise ValueError(f"{ids.numel()} tokens are too few for a truncation window of {window}")
    device = _model_device(model)
    ts = torch.linspace(window - 1, ids.numel() - 2, min(targets, ids.numel() - window)).long().unique()
    was_training = model.training
    model.eval()
    out, d = {}, 1
    windowed = getattr(model, "windowed", False)
    while d <= window:
        seen = min(d, max_context) if windowed else d
        total = 0.0
        for r in range(0, ts.numel(), batch_size):
            t = ts[r:r + batch_size]
            data = ids[(t[:, None] - seen + 1) + torch.arange(seen)].to(device)  # (B, seen): x[t-seen+1 .. t]
            state, logits = None, None
            for i, n in windows(seen + 1, max_context):  # a stateful model in pieces, its state carried
                with autocast(device):
                    logits, state = model(data[:, i:i + n], state)
            y = ids[t + 1].to(device)
            total += float(F.cross_entropy(logits[:, -1].float(), y, reduction="sum"))
        out[d] = total / ts.numel()
        d *= 2
    model.train(was_training)
    return out


def effective_context(losses: dict[int, float], within: float = 0.01) -> int:
    """The smallest distance d whose loss is within `within` (relative) of the longest distance's loss."""
    full = losses[max(losses)]
    return min(d for d, v in losses.items() if v <= full * (1 + within))
