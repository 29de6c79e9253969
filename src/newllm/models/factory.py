"""Build every model of the pipeline from validated params (one place that maps params -> modules)."""

from __future__ import annotations

from torch import nn

from newllm.config import Params
from newllm.errors import PipelineError
from newllm.models.cvfp import InputEmbedding, NewLLM


def newllm_hparams(params: Params, vocab_size: int) -> dict:
    """What a New-LLM checkpoint must agree with (stored in its meta, checked on load)."""
    keys = ("context_dim", "embed_dim", "context_layers", "token_layers", "token_plan", "context_norm",
            "embedding", "tie_head")
    return {"vocab_size": vocab_size, **{k: getattr(params, k) for k in keys}}


def context_hparams(params: Params, vocab_size: int) -> dict:
    """What Phase 1's checkpoint (embedding + ContextBlock) depends on: exactly what its stage reads."""
    keys = ("context_dim", "embed_dim", "context_layers", "context_norm", "embedding")
    return {"vocab_size": vocab_size, **{k: getattr(params, k) for k in keys}}


def build_newllm(params: Params, vocab_size: int, load_pretrained: bool = True) -> NewLLM:
    """`load_pretrained=False` skips reading GPT-2's matrix (shapes only, e.g. to count params or to
    load a checkpoint that already holds it)."""
    embedding = None
    if params.embedding == "gpt2":
        try:
            embedding = (InputEmbedding.from_gpt2(params.embedding_path or "gpt2") if load_pretrained
                         else InputEmbedding(vocab_size, params.embed_dim))
        except RuntimeError as e:  # never a silent random fallback: stop with the how-to
            raise PipelineError(str(e).replace("\n", " ")) from None
        if embedding.vocab_size != vocab_size:
            raise ValueError(f"GPT-2 embedding has {embedding.vocab_size} rows, the tokenizer {vocab_size}")
        if not load_pretrained:
            embedding.wte.weight.requires_grad_(False)
    return NewLLM(vocab_size, params.context_dim, params.embed_dim, params.context_layers, params.token_layers,
                  params.token_plan, params.context_norm, params.tie_head, embedding)


def build_baseline(name: str, params: Params, vocab_size: int, n_embd: int | None = None) -> nn.Module:
    if name == "transformer":
        from newllm.models.transformer import TransformerLM

        return TransformerLM.from_config(params.transformer, vocab_size, n_embd=n_embd)
    if name == "lstm":
        from newllm.models.lstm import LSTMLM

        return LSTMLM.from_config(params.lstm, vocab_size)
    if name == "cvp":
        from newllm.models.cvp import CVPLM

        return CVPLM.from_config(params.cvp, vocab_size)
    raise ValueError(f"unknown baseline {name!r}")


MODEL_NAMES = ("newllm", "transformer", "lstm", "cvp")


def checkpoint_path(name: str, ckpt_dir: str = "data/checkpoints") -> str:
    """Where the trained weights of each model live (New-LLM's full model is Phase 2's output)."""
    return f"{ckpt_dir}/{'phase2_train' if name == 'newllm' else name}.pt"


def load_model(name: str, params: Params, vocab_size: int, ckpt_dir: str = "data/checkpoints") -> nn.Module:
    """A trained model, rebuilt from params and its checkpoint; a mismatch or damage raises
    CheckpointError naming the file."""
    from newllm.training import checkpoint

    path = checkpoint_path(name, ckpt_dir)
    if name == "newllm":
        state, _ = checkpoint.load(path, expect=newllm_hparams(params, vocab_size))
        model = build_newllm(params, vocab_size, load_pretrained=False)
    elif name in MODEL_NAMES:
        state, meta = checkpoint.load(path, expect={"vocab_size": vocab_size, "baseline": name})
        model = build_baseline(name, params, vocab_size, n_embd=meta.get("n_embd"))
    else:
        raise ValueError(f"unknown model {name!r} (one of {', '.join(MODEL_NAMES)})")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise checkpoint.CheckpointError(f"{path} does not fit the current params: {str(e)[:300]}") from None
    return model.eval()
