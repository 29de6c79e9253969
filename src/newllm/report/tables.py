"""The comparison table, computed only from this workspace's metrics files (nothing typed in)."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newllm.dag import Stage
from newllm.errors import PipelineError
from newllm.registry import CONTROLS, MODELS, by_record

NEWLLM = MODELS["newllm"].record
COLUMNS = ["model", "params (trainable / total)", "tokens seen", "optimiser steps", "best / last epoch",
           "val loss (selects)", "test loss", "test PPL", "test accuracy", "train wall time (s)", "train tokens/s"]


@dataclass
class Table:
    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        lines = ["| " + " | ".join(self.columns) + " |", "|" + "---|" * len(self.columns)]
        lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def html(self) -> str:
        head = "".join(f"<th>{c}</th>" for c in self.columns)
        body = "".join("<tr>" + "".join(f"<td>{_fmt(v)}</td>" for v in row) + "</tr>" for row in self.rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.4f}" if abs(v) < 100 else f"{v:,.1f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def read_metrics(root: Path, stage: Stage) -> dict[str, Any]:
    """A stage's final metrics, from the file dvc.yaml declares for it."""
    path = root / stage.metrics_file
    if not path.is_file():
        raise PipelineError(f"missing {path}: run `dvc repro` so every model's stage has written its metrics")
    return json.loads(path.read_text())


def read_curve(root: Path, stage: Stage) -> list[dict[str, float]]:
    path = root / stage.plots_file
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def model_stages(baselines: list[str]) -> list[str]:
    """The records (metrics/plots names) of the models the report compares: New-LLM, `baselines`, controls."""
    return [NEWLLM, *(MODELS[b].record for b in baselines), *(MODELS[c].record for c in CONTROLS)]


def display(record: str) -> str:
    return by_record(record).display


def main_table(root: Path, declared: dict[str, Stage], baselines: list[str]
               ) -> tuple[Table, dict[str, dict[str, Any]]]:
    """`declared`: dvc.yaml's stages (config.stages), which say where each stage's files are."""
    metrics = {s: read_metrics(root, declared[s]) for s in model_stages(baselines)}
    phase1_s = read_metrics(root, declared["phase1_cvfp"])["wall_time_s"]
    rows = []
    for stage, m in metrics.items():
        unmatched = by_record(stage).role == "baseline" and not m.get("matched")
        name = display(stage) + (" (unmatched)" if unmatched else "")
        epochs = f"{m['best_epoch']} / {m['epochs_run']}" + (" **undertrained**" if m["undertrained"] else "")
        rows.append([name, f"{m['params_trainable']:,} / {m['params_total']:,}", m["train_tokens"],
                     m["optimizer_steps"], epochs, m["val_loss"], m["test_loss"], m["test_ppl"],
                     m["test_accuracy"], train_wall_time(stage, m, phase1_s), m["tokens_per_s"]])
    return Table(COLUMNS, rows), metrics


def train_wall_time(stage: str, m: dict[str, Any], phase1_s: float) -> float:
    """New-LLM's training cost is Phase 1 + the context cache + Phase 2, not Phase 2 alone."""
    trains = by_record(stage).trains
    if trains == "lm":
        return m["train_wall_time_s"]
    return round((phase1_s if trains == "cvfp" else 0.0) + m.get("context_cache_s", 0.0) + m["train_wall_time_s"], 3)


def ratios(metrics: dict[str, dict[str, Any]]) -> dict[str, float]:
    """New-LLM / baseline ratios of test loss and PPL (below 1: New-LLM is better), for every baseline
    sized to New-LLM's parameter count; an unmatched one gets none."""
    out = {}
    new = metrics[NEWLLM]
    for stage, m in metrics.items():
        if m.get("matched"):
            out[f"test_loss_ratio_vs_{stage}"] = new["test_loss"] / m["test_loss"]
            out[f"test_ppl_ratio_vs_{stage}"] = new["test_ppl"] / m["test_ppl"]
    return out


def decision_band(ppl: float) -> str:
    """The research's decision bands for New-LLM's perplexity (SPEC §5)."""
    if ppl < 50:
        return "below 50: worth continuing"
    if ppl <= 100:
        return "between 50 and 100: needs architecture work"
    return "above 100: rethink the approach"
