"""The LSTM baseline: PyTorch's word_language_model `RNNModel` (LSTM flavour), batch-first.

embedding -> dropout -> nn.LSTM (dropout between layers) -> dropout -> linear head, with the example's
initialisation (embedding and head U(-0.1, 0.1), head bias 0, nn.LSTM's own default for the cell) so the
classic WikiText-2 recipe reproduces through our trainer.
"""

from __future__ import annotations

from torch import Tensor, nn

from newllm.models.sizing import match_width, meta_count
from newllm.registry import LSTMConfig

LSTMState = tuple[Tensor, Tensor]  # (h, c), each (num_layers, B, hidden_dim)


class LSTMLM(nn.Module):
    def __init__(self, vocab_size: int, embed_dim: int = 200, hidden_dim: int = 200, num_layers: int = 2,
                 dropout: float = 0.2, tie_weights: bool = False):
        super().__init__()
        if tie_weights and embed_dim != hidden_dim:
            raise ValueError(f"tie_weights needs embed_dim == hidden_dim (the head reads the last layer's "
                             f"hidden state with the embedding matrix), got {embed_dim} != {hidden_dim}")
        self.drop = nn.Dropout(dropout)
        self.embed = nn.Embedding(vocab_size, embed_dim)
        # nn.LSTM applies `dropout` between layers only (and warns for a single layer, where it is a no-op)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, num_layers, dropout=dropout if num_layers > 1 else 0.0,
                            batch_first=True)
        self.head = nn.Linear(hidden_dim, vocab_size)
        if tie_weights:
            self.head.weight = self.embed.weight  # "Using the Output Embedding..." (Press & Wolf, 2016)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        nn.init.zeros_(self.head.bias)
        if not tie_weights:
            nn.init.uniform_(self.head.weight, -0.1, 0.1)

    @classmethod
    def from_config(cls, cfg: LSTMConfig, vocab_size: int) -> LSTMLM:
        return cls(vocab_size, cfg.embed_dim, cfg.hidden_dim, cfg.num_layers, cfg.dropout, cfg.tie_weights)

    @classmethod
    def matched_config(cls, cfg: LSTMConfig, vocab_size: int, target_params: int) -> dict[str, int]:
        """Embedding and hidden width together (the recipe's 200/200 shape) at ~target_params."""
        w = match_width(meta_count(lambda h: cls(vocab_size, h, h, cfg.num_layers, cfg.dropout, cfg.tie_weights)),
                        target_params)
        return {"embed_dim": w, "hidden_dim": w}

    def forward(self, x: Tensor, state: LSTMState | None = None) -> tuple[Tensor, LSTMState]:
        """x (B, T) -> logits (B, T, V) and the (h, c) after the last position; state None = zeros."""
        out, state = self.lstm(self.drop(self.embed(x)), state)
        return self.head(self.drop(out)), state
