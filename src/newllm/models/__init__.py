"""Models. New-LLM (CVFP) lives in `cvfp`; the baselines in `transformer`, `lstm`, `cvp`."""

from torch import nn

from newllm.models.cvfp import (
    ContextBlock,
    ContextLayer,
    InputEmbedding,
    NewLLM,
    Phase2Model,
    TokenBlock,
    TokenLayer,
)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied (shared) tensor counts once."""
    params = list(module.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


__all__ = ["ContextBlock", "ContextLayer", "InputEmbedding", "NewLLM", "Phase2Model", "TokenBlock",
           "TokenLayer", "count_params"]
