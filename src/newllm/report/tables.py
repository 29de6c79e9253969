"""The comparison table, computed only from this workspace's metrics files (nothing typed in): every
model at its chosen lr, mean ± sample std over the seeds (tokens, steps, time and speed are means)."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from newllm.dag import Stage
from newllm.errors import PipelineError
from newllm.protocol import chosen_lr, phase1_record, runs
from newllm.registry import MODELS, by_record, compared

NEWLLM = MODELS["newllm"].record
COLUMNS = ["model", "params (trainable / total)", "lr (chosen on val)", "tokens seen", "optimiser steps",
           "best / last epoch, per seed", "val loss (selects)", "test loss", "test PPL", "test accuracy",
           "train wall time (s)", "train tokens/s"]


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
    """A stage's final metrics, from the file dvc.yaml declares for it, with its timing file's values."""
    path = root / stage.metrics_file
    if not path.is_file():
        raise PipelineError(f"missing {path}: run `dvc repro` so every model's stage has written its metrics")
    timing = root / stage.timing_file if stage.timing_file else None
    return {**json.loads(path.read_text()), **(json.loads(timing.read_text()) if timing and timing.is_file() else {})}


def read_curve(root: Path, stage: Stage) -> list[dict[str, float]]:
    path = root / stage.plots_file
    if not path.is_file():
        return []
    with path.open() as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def model_stages(baselines: list[str]) -> list[str]:
    """The records of the models the report compares: New-LLM, `baselines`, controls."""
    return [spec.record for spec in compared(baselines)]


def display(record: str) -> str:
    return by_record(record).display


def seed_runs(root: Path, declared: dict[str, Stage], params: Any) -> dict[str, list[dict[str, Any]]]:
    """model record -> its final metrics on every seed (`seed` first), each from the run with its chosen lr."""
    out = {}
    for record in model_stages(params.baselines):
        lr = chosen_lr(record, root)
        out[record] = []
        for seed, cell in runs(params, record, root).items():
            m = read_metrics(root, declared[cell])
            if (m.get("seed"), m.get("lr")) != (seed, lr):  # a file left by an older run of that cell
                raise PipelineError(f"{declared[cell].metrics_file} holds seed {m.get('seed')}, lr {m.get('lr')}; "
                                    f"expected seed {seed}, lr {lr}: rerun `dvc repro`")
            out[record].append(m)
    return out


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for one value: no spread measured)."""
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def pm(summary: dict[str, Any], key: str) -> str:
    """`key`'s mean ± std from a model's summary (summarise), as the table prints it."""
    std = summary[f"{key}_std"]
    return _fmt(summary[key]) + ("" if std is None else f" ± {_fmt(std)}")


def summarise(per_seed: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Each model's means over seeds (and std as `<key>_std`), plus what is the same on every seed."""
    out = {}
    for record, seeds in per_seed.items():
        s: dict[str, Any] = {"seeds": [m["seed"] for m in seeds], "lr": seeds[0]["lr"],
                             "matched": seeds[0].get("matched"), "params_total": seeds[0]["params_total"],
                             "params_trainable": seeds[0]["params_trainable"], "val_tokens": seeds[0]["val_tokens"],
                             "undertrained_seeds": sum(bool(m["undertrained"]) for m in seeds),
                             # best epoch 0: the untrained initial weights (older records lack the key)
                             "never_improved_seeds": sum(bool(m.get("never_improved")) for m in seeds)}
        for key in ("val_loss", "test_loss", "test_ppl", "test_accuracy", "train_tokens", "optimizer_steps",
                    "tokens_per_s", "train_wall_time_s", "context_cache_s"):
            if key in seeds[0]:
                s[key], s[f"{key}_std"] = mean_std([float(m[key]) for m in seeds])
        out[record] = s
    return out


def main_table(root: Path, declared: dict[str, Stage], params: Any
               ) -> tuple[Table, dict[str, list[dict[str, Any]]], dict[str, dict[str, Any]]]:
    """`declared`: dvc.yaml's stages (config.stages), which say where each stage's files are. Returns the
    table, every model's per-seed metrics and their summary."""
    per_seed = seed_runs(root, declared, params)
    sweep = read_metrics(root, declared["pick_lr"])
    summary = summarise(per_seed)
    phase1_s = {m["seed"]: read_metrics(root, declared[phase1_record(m["seed"])])["wall_time_s"]
                for m in per_seed[NEWLLM]}
    rows = []
    for record, seeds in per_seed.items():
        m = summary[record]
        unmatched = by_record(record).role == "baseline" and not m["matched"]
        name = display(record) + (" (unmatched)" if unmatched else "")
        epochs = ", ".join(f"{r['best_epoch']}/{r['epochs_run']}" for r in seeds)
        if m["undertrained_seeds"]:
            epochs += f" **undertrained** ({m['undertrained_seeds']} of {len(seeds)})"
        if m["never_improved_seeds"]:
            epochs += (f" **never beat its initial weights** ({m['never_improved_seeds']} of {len(seeds)}: "
                       "those numbers are of an untrained model)")
        wall = [train_wall_time(record, r, phase1_s.get(r["seed"], 0.0)) for r in seeds]
        rows.append([name, f"{m['params_trainable']:,} / {m['params_total']:,}", f"{m['lr']:g}" + (" (edge)" if sweep[record]["at_sweep_edge"] else ""),
                     round(m["train_tokens"]), round(m["optimizer_steps"]), epochs,
                     pm(m, "val_loss"), pm(m, "test_loss"), pm(m, "test_ppl"), pm(m, "test_accuracy"),
                     f"{statistics.fmean(wall):.2f}", round(m["tokens_per_s"], 1)])
    return Table(COLUMNS, rows), per_seed, summary


def train_wall_time(stage: str, m: dict[str, Any], phase1_s: float) -> float:
    """New-LLM's training cost is Phase 1 + the context cache + Phase 2, not Phase 2 alone."""
    trains = by_record(stage).trains
    if trains == "lm":
        return m["train_wall_time_s"]
    return round((phase1_s if trains == "cvfp" else 0.0) + m.get("context_cache_s", 0.0) + m["train_wall_time_s"], 3)


def difference(a: list[float], b: list[float]) -> tuple[float, float | None]:
    """mean(a) - mean(b) and its standard error over seeds (None with one seed each: no spread)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if len(a) < 2 or len(b) < 2:
        return diff, None
    return diff, math.sqrt(statistics.variance(a) / len(a) + statistics.variance(b) / len(b))


def beyond_spread(diff: float, se: float | None) -> bool | None:
    """The rule the report states: a difference counts when it exceeds twice its standard error (a rough
    guide with 3 seeds, not a significance test: the report says so)."""
    return None if se is None else abs(diff) > 2 * se


def ratios(summary: dict[str, dict[str, Any]]) -> dict[str, float]:
    """New-LLM / baseline ratios of mean test loss and PPL (below 1: New-LLM is better), for every baseline
    sized to New-LLM's parameter count; an unmatched one gets none."""
    out = {}
    new = summary[NEWLLM]
    for stage, m in summary.items():
        if m.get("matched"):
            out[f"test_loss_ratio_vs_{stage}"] = new["test_loss"] / m["test_loss"]
            out[f"test_ppl_ratio_vs_{stage}"] = new["test_ppl"] / m["test_ppl"]
    return out


def decision_band(ppl: float) -> str:
    """The research's decision bands for New-LLM's perplexity (docs/research.md §5)."""
    if ppl < 50:
        return "below 50: worth continuing"
    if ppl <= 100:
        return "between 50 and 100: needs architecture work"
    return "above 100: rethink the approach"
