"""Build, save and reload any registered model (registry.py) without naming it in code.

A model's class is found by its registry entry, `newllm.models.<module>.<model_class>`, imported only when
it is built, so a stage imports the one model module it trains. A checkpoint stores the model's name, the
vocabulary size and the config it was built from, so it rebuilds alone: the report and `newllm generate`
need no model params, and DVC reruns them when the checkpoint changes.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from torch import nn

from newllm.registry import MODELS, ModelSpec
from newllm.training import checkpoint

# What Phase 1's checkpoint (embedding + ContextBlock) depends on: exactly the model keys its stage reads
CONTEXT_KEYS = ("context_dim", "embed_dim", "context_layers", "context_norm", "embedding")


def spec(name: str) -> ModelSpec:
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r} (one of {', '.join(MODELS)})")
    return MODELS[name]


def model_class(name: str) -> type[nn.Module]:
    s = spec(name)
    return getattr(importlib.import_module(f"newllm.models.{s.module}"), s.model_class)


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied (shared) tensor counts once."""
    params = list(module.parameters())  # parameters() yields a shared tensor once
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)


def context_hparams(params: Any, vocab_size: int) -> dict[str, Any]:
    """Phase 1's checkpoint meta, checked by Phase 2 before it computes."""
    arch = params.newllm_config()
    return {"vocab_size": vocab_size, **{k: getattr(arch, k) for k in CONTEXT_KEYS}}


def save_model(path: Path, name: str, model: nn.Module, config: Any, vocab_size: int) -> None:
    """Weights plus what rebuilds them: the model's name and the config (dataclass or mapping) it was built from."""
    cfg = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else dict(config)
    checkpoint.save(path, model.state_dict(), {"model": name, "vocab_size": vocab_size, "config": cfg})


def load_model(name: str, vocab_size: int, path: Path) -> nn.Module:
    """A trained model rebuilt from its checkpoint alone, in eval mode; a damaged file, another model's
    or another vocabulary's checkpoint raises CheckpointError naming the file (protocol.checkpoint says
    which file holds a model's run)."""
    state, meta = checkpoint.load(path)
    if "config" not in meta:
        raise checkpoint.CheckpointError(f"{path} was written by an older version of the pipeline (no config "
                                         "in it): rerun `dvc repro`")
    checkpoint.check_meta(path, meta, {"model": name, "vocab_size": vocab_size})
    cls = model_class(name)
    # a checkpoint already holds its embedding: never re-read GPT-2's pretrained matrix (New-LLM's option)
    kwargs = {"load_pretrained": False} if "load_pretrained" in inspect.signature(cls.from_config).parameters else {}
    try:
        model = cls.from_config(SimpleNamespace(**meta["config"]), vocab_size, **kwargs)
        model.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as e:
        raise checkpoint.CheckpointError(f"{path} does not rebuild a {name} model: {str(e)[:300]}; rerun "
                                         "`dvc repro`") from None
    return model.eval()
