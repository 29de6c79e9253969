"""The minGRU baseline (Feng et al. 2024, "Were RNNs All We Needed?"): a GRU whose gate and candidate read
the input only, never the previous state, so training runs as a parallel scan over the sequence.

    z_t = σ(W_z x_t)     h̃_t = g(W_h x_t)     h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t

with g(x) = x + ½ for x ≥ 0, σ(x) otherwise (the paper's log-space variant: h stays positive, so the scan
runs on logarithms). A layer is a pre-norm residual block, x + W_o minGRU(RMSNorm(x)), then a pre-norm
MLP, x + MLP(RMSNorm(x)), as in the paper's language model. The state is each layer's h_t: fixed-size, carried
across windows like the LSTM's. A window of one token (generation) takes the recurrence's own step; longer
windows the scan, and tests/models/test_baselines.py checks the two agree.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.models.sizing import match_width, meta_count
from newllm.registry import MinGRUConfig

MinGRUState = list[Tensor]  # per layer: h (B, hidden), hidden = expansion × dim


def _g(x: Tensor) -> Tensor:
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def _log_g(x: Tensor) -> Tensor:
    return torch.where(x >= 0, (F.relu(x) + 0.5).log(), -F.softplus(-x))


def scan_log(log_a: Tensor, log_b: Tensor, h0: Tensor | None) -> Tensor:
    """h_t = a_t h_{t−1} + b_t over t (dim 1) from a_t, b_t > 0 given as logs (B, T, D); h0 (B, D) or None
    (zeros): h_t = A_t (h0 + Σ_{s≤t} b_s / A_s) with A_t = Π_{r≤t} a_r, summed in log space
    (logcumsumexp), so no product underflows."""
    a_star = torch.cumsum(log_a, dim=1)
    log_h = a_star + torch.logcumsumexp(log_b - a_star, dim=1)
    if h0 is not None:
        log_h = torch.logaddexp(log_h, a_star + h0.clamp_min(1e-30).log().unsqueeze(1))
    return log_h.exp()


class MinGRU(nn.Module):
    """One minGRU over (B, T, dim) -> (B, T, hidden) and the last h."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.to_gate_and_candidate = nn.Linear(dim, 2 * hidden)

    def forward(self, x: Tensor, h0: Tensor | None) -> tuple[Tensor, Tensor]:
        k, cand = self.to_gate_and_candidate(x).chunk(2, dim=-1)
        if x.size(1) == 1:  # one step: the recurrence itself
            h_prev = torch.zeros_like(k[:, 0]) if h0 is None else h0
            z = torch.sigmoid(k[:, 0])
            h = (1 - z) * h_prev + z * _g(cand[:, 0])
            return h.unsqueeze(1), h
        # log(1 − z) = −softplus(k), log z = −softplus(−k)
        h = scan_log(-F.softplus(k), -F.softplus(-k) + _log_g(cand), h0)
        return h, h[:, -1]


class MinGRULM(nn.Module):
    def __init__(self, vocab_size: int, dim: int = 128, num_layers: int = 2, expansion: float = 1.5,
                 dropout: float = 0.1):
        super().__init__()
        hidden = max(1, round(expansion * dim))
        self.embed = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(dropout)
        self.layers = nn.ModuleList(nn.ModuleDict({
            "norm": nn.RMSNorm(dim), "rnn": MinGRU(dim, hidden), "out": nn.Linear(hidden, dim, bias=False),
            "ff_norm": nn.RMSNorm(dim),
            "ff": nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim)),
        }) for _ in range(num_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)
        nn.init.normal_(self.embed.weight, std=0.02)

    @classmethod
    def from_config(cls, cfg: MinGRUConfig, vocab_size: int) -> MinGRULM:
        return cls(vocab_size, cfg.dim, cfg.num_layers, cfg.expansion, cfg.dropout)

    @classmethod
    def matched_config(cls, cfg: MinGRUConfig, vocab_size: int, target_params: int) -> dict[str, int]:
        """The width `dim` at ~target_params, depth and expansion as configured."""
        build = lambda d: cls(vocab_size, d, cfg.num_layers, cfg.expansion, cfg.dropout)  # noqa: E731
        return {"dim": match_width(meta_count(build), target_params)}

    def forward(self, x: Tensor, state: MinGRUState | None = None) -> tuple[Tensor, MinGRUState]:
        """x (B, T) -> logits (B, T, V) and each layer's h after the last position; state None = zeros."""
        h = self.drop(self.embed(x))
        new_state = []
        for i, layer in enumerate(self.layers):
            out, last = layer["rnn"](layer["norm"](h), None if state is None else state[i])
            h = h + self.drop(layer["out"](out))
            h = h + self.drop(layer["ff"](layer["ff_norm"](h)))
            new_state.append(last)
        return self.head(self.norm(h)), new_state
