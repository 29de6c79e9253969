"""Checkpoints: a state dict plus the hyperparameters needed to rebuild the model, validated on load."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from newllm.errors import PipelineError


class CheckpointError(PipelineError):
    """A checkpoint is missing, damaged, or was written for another configuration."""


def save(path: str | os.PathLike, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomic: written to a temp file and renamed, so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save({"state_dict": {k: v.detach().cpu() for k, v in state_dict.items()}, "meta": meta}, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, meta). `expect` lists meta values that must match (e.g. the vocab size)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (run the stage that writes it: `dvc repro`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = blob["state_dict"], blob["meta"]
    except Exception as e:  # torch raises many kinds for a damaged file (pickle, zip, runtime errors)
        raise CheckpointError(f"damaged checkpoint {path} ({type(e).__name__}: {e}); rerun `dvc repro -f` "
                              "on the stage that writes it") from None
    check_meta(path, meta, expect or {})
    return state, meta


def check_meta(path: str | os.PathLike, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    for key, want in expect.items():
        if meta.get(key) != want:
            raise CheckpointError(f"checkpoint {path} was written with {key}={meta.get(key)!r}, but the current "
                                  f"params give {want!r}; rerun the stage that writes it")
