"""Generation A of New-LLM: Context Vector Propagation (docs/research.md §2).

One causal recurrence over positions with a fixed-size context vector c (c_0 = 0):

    h_t      = FNN([e_t ; c_{t-1}])        # num_layers × (Linear -> ReLU -> Dropout), width hidden_dim
    logits_t = W_o h_t + b_o
    Δ_t      = W_u h_t + b_u
    c_t      = c_{t-1} + Δ_t               # additive update (the first version)

with the ablation switches the research tried:
    context_norm  c_t = LN(c_{t-1} + Δ_t)
    gating        f = σ(W_f h_t), i = σ(W_i h_t), c_t = f ⊙ c_{t-1} + i ⊙ Δ_t   (then LN if context_norm)
    context_clip  c_t = clamp(c_t, -clip, clip)   (> 0; applied last)
    positional    e_t += P[t], a learned table over the positions of a window (0 .. seq_len - 1)

Modules exist only for the switches that are on (no dead gate or LayerNorm parameters inflating the
parameter count). Init N(0, 0.02), biases 0, as the research.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from newllm.models.sizing import match_width, meta_count
from newllm.registry import CVPConfig


class CVPLM(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int = 128, context_dim: int = 256, hidden_dim: int = 256,
                 num_layers: int = 2, dropout: float = 0.1, context_norm: bool = True, gating: bool = False,
                 context_clip: float = 0.0, positional: bool = False, seq_len: int = 32):
        super().__init__()
        self.context_dim, self.context_clip, self.seq_len = context_dim, context_clip, seq_len
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.pos = nn.Embedding(seq_len, embed_dim) if positional else None
        # The first FNN layer reads [e_t ; c_{t-1}]; it is kept as two matrices so the e_t half (which does
        # not depend on the recurrence) is computed for all T positions in one matmul before the loop.
        self.in_e = nn.Linear(embed_dim, hidden_dim)  # carries the first layer's bias
        self.in_c = nn.Linear(context_dim, hidden_dim, bias=False)
        self.fnn = nn.ModuleList(nn.Linear(hidden_dim, hidden_dim) for _ in range(num_layers - 1))
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_dim, vocab_size)  # W_o, b_o
        self.update = nn.Linear(hidden_dim, context_dim)  # W_u, b_u
        # gates as written in docs/research.md §2: σ(W h_t), no bias
        self.forget = nn.Linear(hidden_dim, context_dim, bias=False) if gating else None
        self.input_gate = nn.Linear(hidden_dim, context_dim, bias=False) if gating else None
        self.norm = nn.LayerNorm(context_dim) if context_norm else None
        self.apply(self._init)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @classmethod
    def from_config(cls, cfg: CVPConfig, vocab_size: int) -> CVPLM:
        return cls(vocab_size, cfg.embed_dim, cfg.context_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout,
                   cfg.context_norm, cfg.gating, cfg.context_clip, cfg.positional, cfg.seq_len)

    @classmethod
    def matched_config(cls, cfg: CVPConfig, vocab_size: int, target_params: int) -> dict[str, int]:
        """Context and hidden width together, the embedding at half of it (the defaults' shape)."""
        def build(w: int) -> CVPLM:
            return cls(vocab_size, w // 2, w, w, cfg.num_layers, cfg.dropout, cfg.context_norm, cfg.gating,
                       cfg.context_clip, cfg.positional, cfg.seq_len)

        w = match_width(meta_count(build), target_params)
        return {"embed_dim": w // 2, "context_dim": w, "hidden_dim": w}

    @property
    def streamable(self) -> bool:
        """A positional table indexes positions within a training window: such a model cannot generate
        one token at a time (generation and the memory probe check this)."""
        return self.pos is None

    def init_state(self, batch_size: int, device: torch.device | None = None) -> Tensor:
        # in the parameters' dtype (fp32), also under bf16 autocast: the context accumulates over many
        # steps and should not be rounded to 8 mantissa bits at each one
        return torch.zeros(batch_size, self.context_dim, device=device, dtype=self.update.weight.dtype)

    def forward(self, x: Tensor, state: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """x (B, T) -> logits (B, T, V) and c_T (B, context_dim); state None = c_0 = 0.

        The loop over t is inherently sequential (c_t needs c_{t-1}); each step is batched over B, and
        everything that does not depend on c (embedding side of layer 1, the vocabulary head) is done
        for all positions at once outside the loop.
        """
        B, T = x.shape
        e = self.embed(x)
        if self.pos is not None:
            if T > self.seq_len:
                raise ValueError(f"window of {T} tokens exceeds the position table ({self.seq_len})")
            e = e + self.pos.weight[:T]
        pre = self.in_e(e)  # (B, T, hidden): W_e e_t + b for every t
        c = self.init_state(B, x.device) if state is None else state
        # gates and update read the same h_t: one fused matmul per step instead of three
        if self.forget is not None:
            w_upd = torch.cat([self.update.weight, self.forget.weight, self.input_gate.weight])
            b_upd = torch.cat([self.update.bias, self.update.bias.new_zeros(2 * self.context_dim)])
        else:
            w_upd, b_upd = self.update.weight, self.update.bias
        hs = []
        for t in range(T):
            h = self.drop(F.relu(pre[:, t] + self.in_c(c)))
            for layer in self.fnn:
                h = self.drop(F.relu(layer(h)))
            u = F.linear(h, w_upd, b_upd)
            if self.forget is not None:
                delta, f, i = u.split(self.context_dim, dim=-1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * delta
            else:
                c = c + u
            if self.norm is not None:
                c = self.norm(c)
            if self.context_clip > 0:
                c = c.clamp(-self.context_clip, self.context_clip)
            hs.append(h)
        return self.head(torch.stack(hs, dim=1)), c
