"""The Transformer baseline: a decoder-only GPT-2 (Hugging Face `GPT2LMHeadModel`, built from a config,
never downloaded), wrapped to the trainer's calling convention `logits, state = model(x, state)`.

GPT-2 is pre-LN with GELU, an FFN of 4 × n_embd, learned positions and a head tied to the token embedding.
(The research's own baseline was post-LN with an untied head; the difference is a documented choice, and
the parameter count below is what makes the comparison fair.)
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import GPT2Config, GPT2LMHeadModel

from newllm.models import sizing
from newllm.registry import TransformerConfig

# transformers renamed the KV-cache argument `past_key_values` -> `cache` (5.x deprecates the old name);
# we support both, since pyproject allows >= 4.45
_CACHE_KW = "cache" if "cache" in inspect.signature(GPT2LMHeadModel.forward).parameters else "past_key_values"


def gpt2_param_count(vocab_size: int, n_layer: int, n_embd: int, seq_len: int) -> int:
    """Unique parameters of GPT2LMHeadModel with a tied head (n_inner = 4 × n_embd).

    Per block: ln_1 2d, c_attn d·3d + 3d, attn c_proj d·d + d, ln_2 2d, mlp c_fc d·4d + 4d,
    mlp c_proj 4d·d + d  ->  12d² + 13d. Plus wte V·d, wpe T·d, ln_f 2d. The head shares wte's matrix
    (GPT2LMHeadModel ties them and has no head bias), so the vocabulary matrix is counted once —
    the same way New-LLM's count (all of `model.parameters()`, which PyTorch deduplicates) treats it.
    """
    d = n_embd
    return n_layer * (12 * d * d + 13 * d) + (vocab_size + seq_len) * d + 2 * d


def match_width(target_params: int, vocab_size: int, n_layer: int, n_head: int, seq_len: int,
                tolerance: float = 0.10) -> int:
    """The width n_embd (a multiple of n_head) whose GPT-2 parameter count is closest to target_params.

    Raises ValueError when even the closest width is more than `tolerance` (±10 %) away, e.g. when the
    vocabulary alone (at the narrowest width n_head) already exceeds the target.
    """
    try:  # the closed-form count, scanned over multiples of n_head
        return sizing.match_width(lambda d: gpt2_param_count(vocab_size, n_layer, d, seq_len), target_params,
                                  step=n_head, tolerance=tolerance)
    except ValueError as e:
        raise ValueError(f"{e}: GPT-2 n_embd, vocab {vocab_size}, {n_layer} layers, {n_head} heads") from None



class TransformerLM(nn.Module):
    windowed = True  # sees only its input window: evaluation slides it (batches.sliding_windows)

    def __init__(self, vocab_size: int, n_layer: int, n_head: int, n_embd: int, seq_len: int,
                 dropout: float = 0.1):
        super().__init__()
        if n_embd % n_head:
            raise ValueError(f"n_embd ({n_embd}) must be divisible by n_head ({n_head})")
        self.config = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=n_embd, n_layer=n_layer,
                                 n_head=n_head, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                                 bos_token_id=0, eos_token_id=0, tie_word_embeddings=True)
        self.gpt = GPT2LMHeadModel(self.config)
        self.seq_len = seq_len

    @classmethod
    def from_config(cls, cfg: TransformerConfig, vocab_size: int) -> TransformerLM:
        return cls(vocab_size, cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.seq_len, cfg.dropout)

    @classmethod
    def matched_config(cls, cfg: TransformerConfig, vocab_size: int, target_params: int) -> dict[str, int]:
        """The config changes that bring the model to ~target_params (±10 %): the width n_embd."""
        return {"n_embd": match_width(target_params, vocab_size, cfg.n_layer, cfg.n_head, cfg.seq_len)}

    def forward(self, x: Tensor, state: None = None) -> tuple[Tensor, None]:
        """x (B, T) with T <= seq_len -> logits (B, T, V). Stateless: each window is attended to alone."""
        if x.size(1) > self.seq_len:
            raise ValueError(f"sequence of {x.size(1)} tokens exceeds n_positions {self.seq_len}")
        return self.gpt(input_ids=x, use_cache=False).logits, None

    # ------------------------------------------------------------------ streaming generation (KV cache)
    @torch.no_grad()
    def step(self, x: Tensor, cache=None) -> tuple[Tensor, object]:
        """Feed new tokens x (B, t) after the cached ones: returns logits of the new positions (B, t, V)
        and the updated KV cache (pass None to start one). The caller keeps the total length within
        seq_len (see `stream`)."""
        out = self.gpt(input_ids=x, use_cache=True, **{_CACHE_KW: cache})
        new_cache = getattr(out, "cache", None)
        return out.logits, new_cache if new_cache is not None else out.past_key_values

    @torch.no_grad()
    def stream(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield sampled token ids one at a time, prompt (1-D ids) first fed through the KV cache.

        Each new token costs one cached forward step. When the context would exceed n_positions, the
        cache is rebuilt from the last seq_len // 2 tokens (positions are absolute in GPT-2, so a cache
        cannot simply be shifted) — the attention memory stays bounded by seq_len.
        """
        was_training = self.training
        self.eval()
        ctx = prompt.reshape(1, -1)[:, -self.seq_len:].to(next(self.parameters()).device)
        logits, cache = self.step(ctx)
        n_cached = ctx.size(1)
        for _ in range(max_new_tokens):
            nxt = sample(logits[0, -1], temperature, top_k, generator)
            yield nxt
            ctx = torch.cat([ctx, ctx.new_tensor([[nxt]])], dim=1)
            if n_cached + 1 > self.seq_len:
                ctx = ctx[:, -(self.seq_len // 2):]
                logits, cache = self.step(ctx)
                n_cached = ctx.size(1)
            else:
                logits, cache = self.step(ctx[:, -1:], cache)
                n_cached += 1
        self.train(was_training)


def sample(logits: Tensor, temperature: float = 1.0, top_k: int | None = None,
           generator: torch.Generator | None = None) -> int:
    """One token id from 1-D logits: temperature, then optional top-k, then a multinomial draw."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator).item())
