"""The comparison protocol's cells, by name: where each model's run for a seed and a learning rate lives.

dvc.yaml runs every model once per lr of `protocol.lrs` on `seed` (its *sweep* cells), `pick_lr` keeps the
cell with the lowest val loss, and the chosen lr is retrained on each seed of `protocol.replicates`. A
model's result on `seed` is its chosen sweep cell, so no run is repeated. A cell's record is its metrics
file under reports/metrics/ (dag.py); the names here are the ones dvc.yaml's paths spell. Torch-free.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newllm.errors import PipelineError

LR_DIR = Path("data/lr")  # pick_lr's output: <model record>.json holds the chosen lr
# The full protocol's sweep, two decades (README gives its command). params.yaml's default sweeps fewer
# values so that `make run` fits in 10 minutes on 2 CPU cores; the report says so when a run does.
FULL_LRS = (0.0003, 0.001, 0.003, 0.01, 0.03)


def full_sweep_command() -> str:
    return f"dvc exp run -S 'protocol.lrs=[{','.join(lr_text(lr) for lr in FULL_LRS)}]'"


def lr_text(lr: float) -> str:
    """An lr as DVC writes a matrix value into stage names and paths (`0.001`)."""
    return str(lr)


def sweep_record(record: str, lr: float | str) -> str:
    return f"sweep/{record}/lr{lr if isinstance(lr, str) else lr_text(lr)}"


def seed_record(record: str, seed: int) -> str:
    return f"seeds/{record}/seed{seed}"


def phase1_record(seed: int) -> str:
    return f"phase1/seed{seed}"


def seeds(params: Any) -> list[int]:
    """Every seed a model's result is averaged over: `seed` (the sweep's) first."""
    return [params.seed, *params.protocol.replicates]


def chosen_lr(record: str, root: Path = Path(".")) -> float:
    path = Path(root) / LR_DIR / f"{record}.json"
    if not path.is_file():
        raise PipelineError(f"{path} not found: the lr sweep has not been picked yet (run `dvc repro`)")
    return float(json.loads(path.read_text())["lr"])


def runs(params: Any, record: str, root: Path = Path(".")) -> dict[int, str]:
    """seed -> the record of the model's run with its chosen lr on that seed."""
    lr = chosen_lr(record, root)
    if lr not in params.protocol.lrs:
        raise PipelineError(f"{Path(root) / LR_DIR / f'{record}.json'} holds lr {lr}, which protocol.lrs "
                            f"{params.protocol.lrs} no longer lists: rerun `dvc repro`")
    return {s: sweep_record(record, lr) if s == params.seed else seed_record(record, s) for s in seeds(params)}


def checkpoint(params: Any, name: str, root: Path = Path(".")) -> Path:
    """The checkpoint of registered model `name`'s run on `seed` with its chosen lr (what the report probes
    and `newllm generate` samples from), as dvc.yaml declares it."""
    from newllm.config import stages
    from newllm.registry import MODELS, compared

    if MODELS[name] not in compared(params.baselines):
        raise PipelineError(f"{name} is not trained under these params: add it to params.yaml's baselines "
                            f"({', '.join(params.baselines)})")
    record = runs(params, MODELS[name].record, root)[params.seed]
    return Path(root) / stages(params, root)[record].checkpoint


def pick(val_losses: dict[float, float]) -> float:
    """The lr with the lowest finite val loss (pick_lr passes the cells that beat their initial weights)."""
    finite = {lr: v for lr, v in val_losses.items() if math.isfinite(v)}
    if not finite:
        raise PipelineError(f"no cell of the lr sweep has a finite val loss ({val_losses}): try other protocol.lrs")
    return min(finite, key=lambda lr: (finite[lr], lr))  # a tie goes to the smaller lr


@dataclass(frozen=True)
class Cell:
    """What a training stage's command line says it is: `--lr X` (a sweep cell on `seed`) or `--seed N`
    (a replicate, with the chosen lr)."""

    record: str  # dvc.yaml's record of this cell
    seed: int
    lr: float


def cell(params: Any, model_record: str, argv: list[str]) -> Cell:
    if len(argv) == 2 and argv[0] == "--lr":
        return Cell(sweep_record(model_record, argv[1]), params.seed, float(argv[1]))
    if len(argv) == 2 and argv[0] == "--seed" and argv[1].isdigit():
        seed = int(argv[1])
        return Cell(seed_record(model_record, seed), seed, chosen_lr(model_record))
    raise PipelineError(f"expected --lr <lr> or --seed <n>, got {' '.join(argv) or 'nothing'}")
