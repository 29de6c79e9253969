"""The Mamba baseline (Gu & Dao 2023, a selective state-space model): Hugging Face's `MambaForCausalLM`, built
from a config (never downloaded), wrapped to the trainer's convention `logits, state = model(x, state)`.

On a CPU, HF runs the selective scan in pure PyTorch: with `use_mambapy` and the `mambapy` package, the
parallel scan of mamba.py (Blelloch's, over the sequence) instead of a Python loop over positions. That
scan starts every sequence from a zero state (HF's source says so: a parallel scan from a cached state
would be wrong), so Mamba is trained and evaluated as the Transformer is, one window at a time (sliding
at evaluation, `windowed`), not with its state carried across windows. Generation is the recurrence
itself: the prompt through the parallel scan once, then one step per token on the fixed-size cache (per
layer: the conv window, expand·dim × conv_kernel, and the SSM state, expand·dim × state_size).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor, nn
from transformers import MambaConfig as HFMambaConfig
from transformers import MambaForCausalLM

from newllm.models.sizing import match_width, meta_count
from newllm.models.transformer import sample
from newllm.registry import MambaConfig


class MambaLM(nn.Module):
    windowed = True  # trained and scored per window (see the module doc); evaluation slides it
    cache_method = "recurrent cache"  # the memory probe's name for what `step` carries

    def __init__(self, vocab_size: int, dim: int = 128, num_layers: int = 2, state_size: int = 16,
                 expand: int = 2, conv_kernel: int = 4):
        super().__init__()
        self.config = HFMambaConfig(vocab_size=vocab_size, hidden_size=dim, num_hidden_layers=num_layers,
                                    state_size=state_size, expand=expand, conv_kernel=conv_kernel,
                                    use_mambapy=True, pad_token_id=0, bos_token_id=0, eos_token_id=0,
                                    tie_word_embeddings=True)
        self.mamba = MambaForCausalLM(self.config)

    @classmethod
    def from_config(cls, cfg: MambaConfig, vocab_size: int) -> MambaLM:
        return cls(vocab_size, cfg.dim, cfg.num_layers, cfg.state_size, cfg.expand, cfg.conv_kernel)

    @classmethod
    def matched_config(cls, cfg: MambaConfig, vocab_size: int, target_params: int) -> dict[str, int]:
        """The width `dim` at ~target_params, depth, state and expansion as configured."""
        build = lambda d: cls(vocab_size, d, cfg.num_layers, cfg.state_size, cfg.expand, cfg.conv_kernel)  # noqa: E731
        return {"dim": match_width(meta_count(build), target_params)}

    def forward(self, x: Tensor, state: None = None) -> tuple[Tensor, None]:
        """x (B, T) -> logits (B, T, V), each window from a zero state (the parallel scan's)."""
        return self.mamba(input_ids=x, use_cache=False).logits, None

    # ------------------------------------------------------------------ streaming (the recurrence)
    @torch.no_grad()
    def step(self, x: Tensor, cache=None) -> tuple[Tensor, object]:
        """Feed tokens x (B, t) after those in `cache` (None: start one): logits (B, t, V) and the cache
        after them. A first call runs the parallel scan; a later one steps the recurrence token by token,
        since HF's scan cannot start from a cached state."""
        if cache is None:
            out = self.mamba(input_ids=x, use_cache=True)
            return out.logits, out.cache
        logits = []
        for i in range(x.size(1)):
            out = self.mamba(input_ids=x[:, i:i + 1], cache=cache, use_cache=True)
            logits.append(out.logits)
            cache = out.cache
        return torch.cat(logits, dim=1), cache

    @torch.no_grad()
    def stream(self, prompt: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
               generator: torch.Generator | None = None) -> Iterator[int]:
        """Yield sampled token ids one at a time: the prompt (1-D ids) once, then one recurrent step each."""
        was_training = self.training
        self.eval()
        logits, cache = self.step(prompt.reshape(1, -1).to(next(self.parameters()).device))
        for i in range(max_new_tokens):
            nxt = sample(logits[0, -1], temperature, top_k, generator)
            yield nxt
            if i + 1 < max_new_tokens:
                logits, cache = self.step(logits.new_tensor([[nxt]], dtype=torch.long), cache)
        self.train(was_training)
