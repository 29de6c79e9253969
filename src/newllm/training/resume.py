"""Resume checkpoints: a training stage's whole state, so `dvc repro` after a kill -9 continues where the
stage stopped and ends with the metrics and checkpoint bytes of an uninterrupted run.

What a trainer puts in one is its own business (weights, optimiser, RNG states, loop position, early-stopping
state); the stage harness adds the MLflow run id and the curve logged so far. Files live in
data/resume/<record>.pt: git-ignored and no DVC out, so DVC does not delete them before it reruns the stage.
(A `persist: true` out would survive as well, but it turns off DVC's run-cache for its stage, and every
training cell relies on that cache.) Each file holds the key of what made it, the stage's params hash and
its deps' contents; one with another key is ignored with a notice, never loaded.
"""

from __future__ import annotations

import hashlib
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESUME_DIR = Path("data/resume")
# Save mid-epoch once this many seconds passed since the last save (epoch ends always save): a step's cost
# differs 1000x between models and devices, a time bound caps the lost work directly. Results never depend on it.
EVERY_S = float(os.environ.get("NEWLLM_RESUME_EVERY_S", "60"))


def dep_key(params_hash: str, deps: tuple[str, ...]) -> str:
    """What a resume file must have been made under: the stage's params and the bytes of every dep."""
    h = hashlib.sha256(params_hash.encode())
    for dep in sorted(deps):
        path = Path(dep)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            h.update(str(f).encode())
            if f.is_file():
                with f.open("rb") as fh:
                    for block in iter(lambda: fh.read(1 << 20), b""):
                        h.update(block)
    return h.hexdigest()[:16]


class ResumeFile:
    """`key()` is computed only when a file is read or written: hashing the deps of a stage that never
    saves one (the report's are every checkpoint) would be wasted time."""

    def __init__(self, record: str, key: Callable[[], str], root: Path = RESUME_DIR):
        self.path = root / f"{record}.pt"
        self._key_fn, self._key = key, None

    @property
    def key(self) -> str:
        if self._key is None:
            self._key = self._key_fn()
        return self._key

    def load(self) -> dict[str, Any] | None:
        """The saved state, or None (no file, another key, or a damaged file: each said in one line)."""
        if not self.path.is_file():
            return None
        import torch

        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:  # a file cut short by a full disk: start over, do not crash
            print(f"resume: ignoring damaged {self.path} ({type(e).__name__}); starting from scratch",
                  file=sys.stderr)
            return None
        if state.get("key") != self.key:
            print(f"resume: ignoring {self.path}: it was made under other params or inputs; starting from "
                  "scratch", file=sys.stderr)
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        """Atomic: written beside and renamed, so a kill mid-write leaves the previous file whole."""
        import torch

        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        try:
            torch.save({**state, "key": self.key}, tmp)
            tmp.replace(self.path)
        finally:
            tmp.unlink(missing_ok=True)

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)
