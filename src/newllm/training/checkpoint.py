"""Checkpoints: a state dict plus the hyperparameters needed to rebuild the model, validated on load.

Each carries the SHA-256 of its own content, checked on every load: DVC trusts a cached file whose size and
mtime did not change, and torch reads bytes flipped inside a tensor without complaint, so bit rot would
otherwise reach the next stage, the report and `newllm generate` silently."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from newllm.errors import PipelineError


class CheckpointError(PipelineError):
    """A checkpoint is missing, damaged, or was written for another configuration."""


def digest(state_dict: dict[str, Any], meta: dict[str, Any]) -> str:
    """SHA-256 over the meta and every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256(json.dumps(meta, sort_keys=True, default=str).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"\0{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, whatever the dtype (bf16 included)
    return h.hexdigest()


def save(path: str | os.PathLike, state_dict: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomic: written to a temp file and renamed, so a crash never leaves a truncated checkpoint."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    state = {k: v.detach().cpu() for k, v in state_dict.items()}
    try:
        torch.save({"state_dict": state, "meta": meta, "sha256": digest(state, meta)}, tmp)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def load(path: str | os.PathLike, expect: dict[str, Any] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state_dict, meta), its digest verified. `expect` lists meta values that must match (e.g. the vocab size)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (run the stage that writes it: `dvc repro`)")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
        state, meta = blob["state_dict"], blob["meta"]
    except Exception as e:  # torch raises many kinds for a damaged file (pickle, zip, runtime errors)
        raise CheckpointError(f"damaged checkpoint {path} ({type(e).__name__}: {e}); rerun {rerun(path)}") from None
    if "sha256" not in blob:
        raise CheckpointError(f"checkpoint {path} carries no content digest (written by an older version of the "
                              f"pipeline); rerun {rerun(path)}")
    if digest(state, meta) != blob["sha256"]:
        raise CheckpointError(f"checkpoint {path} is corrupted: its content no longer matches the SHA-256 recorded "
                              f"when it was written (changed on disk since); rerun {rerun(path)}")
    check_meta(path, meta, expect or {})
    return state, meta


def rerun(path: Path) -> str:
    """`dvc repro -f -s <the stage of ./dvc.yaml that writes path>`: only that stage, not its upstream."""
    try:
        from newllm.config import load_params, stages

        target = Path(path).resolve()
        name = next(s.name for s in stages(load_params()).values() if target in {Path(o).resolve() for o in s.outs})
        return f"`dvc repro -f -s {name}`"
    except Exception:  # not in a project, or params that do not load: the generic advice
        return "`dvc repro -f -s <stage>` on the stage of dvc.yaml that writes it"


def check_meta(path: str | os.PathLike, meta: dict[str, Any], expect: dict[str, Any]) -> None:
    for key, want in expect.items():
        if meta.get(key) != want:
            raise CheckpointError(f"checkpoint {path} was written with {key}={meta.get(key)!r}, but the current "
                                  f"params give {want!r}; rerun the stage that writes it")
