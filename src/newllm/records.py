"""DVC's record files, written whole or not at all: a stage's metrics (`reports/metrics/<record>.json`), its
timing file (`reports/timing/`) and its per-step curve (`reports/plots/<record>.csv`). No MLflow."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

# Final values that are measurements of speed, not results: written to the stage's timing file (dvc.yaml)
# instead of its metrics file, so `dvc exp show --only-changed` and `dvc metrics diff` show results only.
TIMING_KEYS = ("tokens_per_s", "train_wall_time_s", "context_cache_s", "wall_time_s", "peak_gpu_bytes")


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_metrics(path: Path, metrics: dict[str, Any]) -> Path:
    atomic_write(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def write_plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def split_timing(final: dict[str, Any], declared: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results for the metrics file, speed measurements for the timing file when the stage has one)."""
    if declared.timing_file is None:
        return final, {}
    return ({k: v for k, v in final.items() if k not in TIMING_KEYS},
            {k: v for k, v in final.items() if k in TIMING_KEYS})


def _read_plot(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return list(csv.DictReader(f))
