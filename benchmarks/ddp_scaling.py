"""Data-parallel scaling: tokens/s of the real training stages with 1 and N processes (torch DDP under
torchrun, `distributed.nproc`), and the scaling efficiency tok/s(N) / (N x tok/s(1)) (issue 13, item 1).

A scratch copy of the pipeline (its own git, DVC repo and MLflow store) on WikiText-2, BPE 8000, trains
each model's sweep cell for one epoch (Phase 1: its iterations) on the first --tokens train tokens, once per
process count, through
`dvc repro` (the param is a dep: DVC reruns the cell). Rates are the stages' own (reports/timing:
training steps only, evaluation excluded), so start-up and evaluation do not blur them. The total CPU
threads are the same for every count: one process uses all cores, N processes get cores / N threads each.

    .venv/bin/python benchmarks/ddp_scaling.py                        # CPU: 1 and 2 processes (gloo)
    .venv/bin/python benchmarks/ddp_scaling.py --device cuda --nproc 1,2   # one process per GPU (nccl)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import yaml  # noqa: E402
from helpers import SHARED_DATA, make_project, merge, run  # noqa: E402

CELLS = {"transformer": ("baseline_sweep@transformer-0.001", "sweep/transformer/lr0.001"),
         "lstm": ("baseline_sweep@lstm-0.001", "sweep/lstm/lr0.001"),
         "phase2": ("phase2_sweep@0.001", "sweep/phase2_train/lr0.001"),
         "phase1": ("phase1_cvfp", "phase1/seed0")}  # last: the others read its first checkpoint


def rate(timing: dict, metrics: dict) -> float:
    """Training tokens/s: the stage's own rate, or for Phase 1 its train tokens over its wall time (its
    exact passes and final checks included: under DDP they are a relay and do not speed up)."""
    return timing.get("tokens_per_s") or metrics["train_tokens"] / timing["wall_time_s"]


def settings(data: Path, tokens: int, device: str) -> dict:
    return {
        "device": device, "context_dim": 256, "embed_dim": 256, "context_layers": 2, "token_layers": 2,
        "dataset": {"source": "wikitext2", "wikitext_dir": str(data)},
        "tokenizer": {"kind": "bpe", "vocab_size": 8000, "lowercase": False, "max_eval_tokens": 10_000},
        "phase1": {"iterations": 2, "min_iterations": 2, "streams": 64, "max_tokens": tokens},
        "phase2": {"streams": 64},
        "train": {"epochs": 1, "batch_size": 16, "seq_len": 64, "patience": 0, "max_tokens": tokens},
        "baselines": ["transformer", "lstm"],
        "protocol": {"lrs": [0.001], "replicates": [1]},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "wikitext-2")
    ap.add_argument("--tokens", type=int, default=100_000, help="train tokens of the one epoch")
    ap.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--models", default="transformer,lstm,phase2,phase1")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    counts = [int(n) for n in a.nproc.split(",")]
    models = a.models.split(",")
    work = a.workdir or Path(tempfile.mkdtemp(prefix="ddp_scaling_"))
    proj = make_project(work / "proj", settings(a.data, a.tokens, a.device))
    print(f"scratch project {proj}; WikiText-2 BPE 8000, {a.tokens:,} train tokens, one epoch, batch 16 x 64, "
          f"{a.device}, {os.cpu_count()} CPUs", flush=True)
    t0 = time.perf_counter()
    run(["dvc", "repro", "phase1_cvfp", "param_budget"], proj, timeout=3600)  # the inputs, once
    print(f"data, Phase 1 and the budget: {time.perf_counter() - t0:.0f} s", flush=True)
    rows = []
    for n in counts:
        params = yaml.safe_load((proj / "params.yaml").read_text())
        (proj / "params.yaml").write_text(yaml.safe_dump(merge(params, {"distributed": {"nproc": n}}), sort_keys=False))
        for m in models:
            stage, record = CELLS[m]
            t = time.perf_counter()
            run(["dvc", "repro", "--single-item", stage], proj, timeout=3600)
            wall = time.perf_counter() - t
            timing = json.loads((proj / f"reports/timing/{record}.json").read_text())
            metrics = json.loads((proj / f"reports/metrics/{record}.json").read_text())
            loss = metrics.get("val_loss", metrics.get("train_er_pct"))  # Phase 1: its train ER %
            rows.append({"model": m, "nproc": n, "tokens_per_s": rate(timing, metrics), "stage_wall_s": round(wall, 1),
                         "val_loss": loss, "params_total": metrics.get("params_total", metrics.get("params_context_block"))})
            print(f"{m:12s} nproc {n}: {rows[-1]['tokens_per_s']:>10,.0f} tok/s  stage {wall:6.1f} s  "
                  f"val loss (Phase 1: train ER %) {loss:.4f}", flush=True)
    print("\n| model | params | nproc | tokens/s | speed-up | efficiency | val loss (Phase 1: train ER %) |\n"
          "|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        one = next(x for x in rows if x["model"] == r["model"] and x["nproc"] == counts[0])
        up = r["tokens_per_s"] / one["tokens_per_s"]
        r.update(speedup=round(up, 3), efficiency=round(up * counts[0] / r["nproc"], 3))
        print(f"| {r['model']} | {r['params_total']:,} | {r['nproc']} | {r['tokens_per_s']:,.0f} | {up:.2f}x | "
              f"{r['efficiency']:.0%} | {r['val_loss']:.4f} |")
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"device": a.device, "tokens": a.tokens, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
