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
