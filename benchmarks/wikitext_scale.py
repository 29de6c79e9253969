"""WikiText-2 through every New-LLM stage at growing size: wall time and peak RSS per stage, their growth
exponents against tokens, and New-LLM's cost against the matched Transformer's epoch (issue 10, items 1-2).

A scratch copy of the pipeline (its own git, DVC repo and MLflow store) is tokenized once (BPE 8000 on the
whole of WikiText-2); then, for each training-token count N (`phase1.max_tokens` = `train.max_tokens` = N,
0 = the whole split; `--phase1-tokens M` trains Phase 1 on the first M instead), the real stage scripts run
one after another, each in its own process, timed and measured by `os.wait4` (ru_maxrss: the process's peak
resident set, page cache excluded):

    phase1_cvfp        Phase 1 on N (or M) tokens (chunks of phase1.chunk_tokens, the iterate on disk when large)
    phase2_train       the context cache (train, val, test) + one Phase 2 epoch on N tokens
    train_baseline     the matched Transformer (param_budget sizes it), one epoch on the same N tokens

Reading the ratio: New-LLM's training per epoch-equivalent is Phase 1 (all its iterations) + the context
cache + one Phase 2 epoch, against one Transformer epoch; both from the stages' own timing files, training
only (evaluation excluded) and whole stage walls.

    .venv/bin/python benchmarks/wikitext_scale.py                           # 100k, 500k, 2M, all; CPU
    .venv/bin/python benchmarks/wikitext_scale.py --tokens 100000 --device cuda
    .venv/bin/python benchmarks/wikitext_scale.py --json reports/bench/wikitext_scale.json

The settings (printed) are the study's: context_dim 512, embed_dim 256, 2 + 2 layers, 64 streams for
Phase 1 and the cache (the independent streams batched), batch 16 x 32 tokens; val and test are their first
50 k tokens (`tokenizer.max_eval_tokens`), so evaluation is a fixed cost and the rows show training's growth.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import yaml  # noqa: E402
from helpers import SHARED_DATA, env, make_project, merge  # noqa: E402

from newllm.report.study import slope  # noqa: E402  (growth exponent: the log-log least-squares slope)

LR = 0.001
EVAL_TOKENS = 50_000  # val and test prefixes: the evaluation stays a fixed cost while training grows


def settings(data: Path, context_dim: int, iterations: int, device: str, baselines: list[str]) -> dict:
    return {
        "device": device, "context_dim": context_dim, "embed_dim": 256, "context_layers": 2, "token_layers": 2,
        "dataset": {"source": "wikitext2", "wikitext_dir": str(data)},
        "tokenizer": {"kind": "bpe", "vocab_size": 8000, "lowercase": False, "max_eval_tokens": EVAL_TOKENS},
        "phase1": {"iterations": iterations, "min_iterations": iterations, "streams": 64, "chunk_tokens": 32768},
        "phase2": {"streams": 64},
        "train": {"epochs": 1, "batch_size": 16, "seq_len": 32, "patience": 0},
        "eval_batch_size": 10,
        "baselines": baselines,
        "transformer": {"n_layer": 2, "n_head": 4, "dropout": 0.1},
        "protocol": {"lrs": [LR], "replicates": [1]},
    }


def measure(cmd: list[str], cwd: Path, log: Path) -> tuple[float, float]:
    """Run cmd -> (wall seconds, peak RSS in GiB of the process and its children)."""
    t0 = time.perf_counter()
    with open(log, "ab") as out:
        # NEWLLM_WARM=0: the stage in this process itself, not in a warm server's fork, whose memory
        # wait4 would not see
        proc = subprocess.Popen(cmd, cwd=cwd, env={**env(), "NEWLLM_WARM": "0"}, stdout=out, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"{' '.join(cmd)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}")
    return wall, usage.ru_maxrss / 2**20  # KiB -> GiB


def write_json(a: argparse.Namespace, rows: list[dict], flops: dict[str, float] | None) -> None:
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"settings": settings(a.data, a.context_dim, a.iterations, a.device, a.baselines),
                                      "rows": rows, "flops_per_token": flops}, indent=1) + "\n")


def prepare(proj: Path, log: Path) -> list[dict]:
    """The once-per-project stages (tokenization of the whole corpus, New-LLM's parameter budget) -> rows."""
    rows = []
    for name, script in (("validate", "validate"), ("generate_dataset", "generate_dataset"),
                         ("tokenize", "tokenize_data"), ("param_budget", "param_budget")):
        wall, rss = measure([sys.executable, f"stages/{script}.py"], proj, log)
        rows.append({"tokens": None, "stage": name, "wall_s": wall, "rss_gib": rss})
        print(f"{name:>16}: {wall:7.1f} s  peak RSS {rss:5.2f} GiB", flush=True)
    return rows


def set_params(proj: Path, over: dict) -> None:
    path = proj / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), over), sort_keys=False))


def timing(proj: Path, record: str) -> dict:
    out = {}
    for kind in ("metrics", "timing"):
        path = proj / "reports" / kind / f"{record}.json"
        if path.is_file():
            out.update(json.loads(path.read_text()))
    return out


def phase1_tokens(a: argparse.Namespace, n: int) -> int:
    """How many of the n training tokens Phase 1 trains on (--phase1-tokens, 0 = all)."""
    return min(a.phase1_tokens or n, n)


def flops_per_token(proj: Path, tokens: int, iterations: int, phase1_tokens: int) -> dict[str, float]:
    """Matmul FLOPs per training token of each part of an epoch-equivalent, counted by torch's
    FlopCounterMode (one rule for every model: matmuls and attention, not elementwise ops) on the real
    training tokens and the trained checkpoints: why the wall ratio is what it is, whatever the machine.

    Phase 1 = iteration 0's exact pass + (iterations - 1) x steps_per_iteration x (pass A, no grad + pass B,
    fwd + bwd) + the final check (an exact pass + a parallel pass); the cache = one exact pass; an epoch =
    fwd + bwd. Phase 1 and the cache are counted on one chunk of their real layout (phase1.streams streams,
    chunk_tokens positions): their token projections run once per distinct token of a chunk, so random ids
    would overcount them. Passes over val and test (val ER, their cache) are left out: fixed costs.
    Phase 1's count is per token it trains on (the first `phase1_tokens`), the others per training token."""
    import numpy as np
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from newllm.models import factory
    from newllm.models.cvfp import Phase2Model
    from newllm.training.phase1 import block_outputs, split_streams

    params = yaml.safe_load((proj / "params.yaml").read_text())
    p1, train = params["phase1"], params["train"]
    vocab = json.loads((proj / "data" / "tokens" / "meta.json").read_text())["vocab_size"]
    ids = torch.from_numpy(np.load(proj / "data" / "tokens" / "train.npy").astype(np.int64))[:tokens]
    chunk = split_streams(ids[:phase1_tokens], p1["streams"])[:, : max(1, p1["chunk_tokens"] // p1["streams"])]
    batch = ids[: train["batch_size"] * train["seq_len"]].reshape(train["batch_size"], train["seq_len"])
    sweep = proj / "data" / "checkpoints" / "sweep"
    llm = factory.load_model("newllm", vocab, sweep / "phase2_train" / f"lr{LR}.pt")
    transformer = factory.load_model("transformer", vocab, sweep / "transformer" / f"lr{LR}.pt")

    def per_token(fn, x: torch.Tensor) -> float:
        with FlopCounterMode(display=False) as counter:
            fn()
        return counter.get_total_flops() / x.numel()

    inputs = torch.randn(*chunk.shape, llm.context_dim)
    with torch.no_grad():
        exact = per_token(lambda: llm.sequential_contexts(chunk), chunk)
        pass_a = per_token(lambda: block_outputs(llm, chunk, inputs), chunk)
        contexts = llm.sequential_contexts(batch)[0]
    pass_b = per_token(lambda: block_outputs(llm, chunk, inputs).sum().backward(), chunk)
    phase2 = per_token(lambda: Phase2Model(llm)(batch, contexts=contexts)[0].sum().backward(), batch)
    epoch = per_token(lambda: transformer(batch)[0].sum().backward(), batch)
    steps = (iterations - 1) * p1["steps_per_iteration"]
    return {"phase1": exact + steps * (pass_a + pass_b) + exact + pass_a, "phase1_step": pass_a + pass_b,
            "cache": exact, "phase2_epoch": phase2, "transformer_epoch": epoch}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "wikitext-2", help="folder with WikiText-2's raw files")
    ap.add_argument("--tokens", default="100000,500000,2000000,0", help="training-token counts (0 = all)")
    ap.add_argument("--context-dim", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=10, help="Phase 1 iterations (the default params' 10)")
    ap.add_argument("--phase1-tokens", type=int, default=0,
                    help="Phase 1 trains on the first N of them (phase1.max_tokens; 0 = as many as Phase 2)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baselines", default="transformer", help="matched baselines to time beside New-LLM (transformer,lstm)")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch project folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args()
    a.baselines = a.baselines.split(",")
    if not (a.data / "train.txt").is_file():
        sys.exit(f"no WikiText-2 at {a.data} (want train.txt, valid.txt, test.txt): pass --data")

    root = Path(a.workdir or tempfile.mkdtemp(prefix="wikitext_scale_"))
    shutil.rmtree(root / "proj", ignore_errors=True)
    proj = make_project(root / "proj", settings(a.data.resolve(), a.context_dim, a.iterations, a.device, a.baselines))
    log = root / "stages.log"
    print(f"scratch project {proj}; stage output in {log}", flush=True)
    print(f"settings: {json.dumps(settings(a.data, a.context_dim, a.iterations, a.device, a.baselines))}", flush=True)
    py = sys.executable

    rows = prepare(proj, log)
    n_train = json.loads((proj / "data" / "tokens" / "meta.json").read_text())["tokens_train"]

    sizes = [int(t) for t in a.tokens.split(",")]
    flops = None
    for size in sizes:
        n = min(size or n_train, n_train)
        set_params(proj, {"phase1": {"max_tokens": phase1_tokens(a, n)}, "train": {"max_tokens": size}})
        for name, cmd, record in (
                ("phase1_cvfp", ["stages/phase1_cvfp.py"], "phase1/seed0"),
                ("phase2_train", ["stages/phase2_train.py", "newllm", "--lr", str(LR)], f"sweep/phase2_train/lr{LR}"),
                *((b, ["stages/train_baseline.py", b, "--lr", str(LR)], f"sweep/{b}/lr{LR}") for b in a.baselines)):
            wall, rss = measure([py, *cmd], proj, log)
            t = timing(proj, record)
            row = {"tokens": n, "stage": name, "wall_s": wall, "rss_gib": rss, **{k: t.get(k) for k in (
                "tokens_per_s", "train_wall_time_s", "context_cache_s", "wall_time_s", "train_tokens", "peak_gpu_bytes",
                "val_loss", "test_loss", "params_total", "sequential_cosine", "train_er_pct")}}
            rows.append(row)
            tps = "" if t.get("tokens_per_s") is None else f"{t['tokens_per_s']:,.0f} tok/s"
            if t.get("peak_gpu_bytes"):
                tps += f"  peak GPU {t['peak_gpu_bytes'] / 2**30:.2f} GiB"
            print(f"{n:>9,} {name:>13}: {wall:7.1f} s  peak RSS {rss:5.2f} GiB  {tps}", flush=True)
            write_json(a, rows, flops)
        if flops is None and "transformer" in a.baselines:  # the checkpoints exist now; training's count is per token
            flops = flops_per_token(proj, n, a.iterations, phase1_tokens(a, n))
            write_json(a, rows, flops)

    report(rows, a, flops)


def report(rows: list[dict], a: argparse.Namespace, flops: dict[str, float] | None) -> None:
    per = {}
    for r in rows:
        if r["tokens"] is not None:
            per.setdefault(r["tokens"], {})[r["stage"]] = r
    on = f" on the first {a.phase1_tokens:,} tokens" if a.phase1_tokens else ""
    print(f"\n## WikiText-2, BPE 8000, context_dim {a.context_dim}, Phase 1 {a.iterations} iterations{on}, "
          f"device {a.device}\n")
    print("| train tokens | stage | wall (s) | peak RSS (GiB) | tokens/s | peak GPU (GiB) |")
    print("|---:|---|---:|---:|---:|---:|")
    for r in rows:
        tps = f"{r['tokens_per_s']:,.0f}" if r.get("tokens_per_s") else "-"
        gpu = f"{r['peak_gpu_bytes'] / 2**30:.2f}" if r.get("peak_gpu_bytes") else "-"
        size = "all (once)" if r["tokens"] is None else f"{r['tokens']:,}"
        print(f"| {size} | {r['stage']} | {r['wall_s']:.1f} | {r['rss_gib']:.2f} | {tps} | {gpu} |")
    sizes = sorted(per)
    if len(sizes) >= 2:
        print("\n| stage | time exponent | memory exponent | peak RSS range (GiB) |")
        print("|---|---:|---:|---|")
        for stage in ("phase1_cvfp", "phase2_train", *a.baselines):
            walls = [per[n][stage]["wall_s"] for n in sizes]
            rss = [per[n][stage]["rss_gib"] for n in sizes]
            print(f"| {stage} | {slope(sizes, walls):.2f} | {slope(sizes, rss):.2f} | "
                  f"{min(rss):.2f} - {max(rss):.2f} |")
    print("\n| train tokens | New-LLM epoch-equivalent (s) | of which cache (s) | Transformer epoch (s) | "
          "ratio (training) | ratio (stage walls) | cache share |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in sizes:
        p1, p2, tf = per[n]["phase1_cvfp"], per[n]["phase2_train"], per[n]["transformer"]
        p2_epoch = p2["train_tokens"] / p2["tokens_per_s"]
        tf_epoch = tf["train_tokens"] / tf["tokens_per_s"]
        new = p1["wall_time_s"] + p2["context_cache_s"] + p2_epoch
        print(f"| {n:,} | {new:.1f} | {p2['context_cache_s']:.1f} | {tf_epoch:.1f} | {new / tf_epoch:.2f} | "
              f"{(p1['wall_s'] + p2['wall_s']) / tf['wall_s']:.2f} | {p2['context_cache_s'] / new:.0%} |")
    if flops:
        tf = flops["transformer_epoch"]
        print(f"\nMatmul FLOPs per token (torch FlopCounterMode): Phase 1 ({a.iterations} iterations) "
              f"{flops['phase1'] / 1e6:.1f} M per token it trains on ({flops['phase1_step'] / 1e6:.2f} M a step), "
              f"cache {flops['cache'] / 1e6:.2f} M, Phase 2 epoch {flops['phase2_epoch'] / 1e6:.1f} M, the "
              f"Transformer's epoch {tf / 1e6:.1f} M.")
        for n in sizes:  # Phase 1's share of the training tokens sets its cost per training token
            phase1 = flops["phase1"] * phase1_tokens(a, n) / n
            new = phase1 + flops["cache"] + flops["phase2_epoch"]
            print(f"{n:,} training tokens, Phase 1 on {phase1_tokens(a, n):,}: New-LLM {new / 1e6:.1f} M against "
                  f"{tf / 1e6:.1f} M, a FLOP ratio of {new / tf:.2f} (Phase 1 alone {phase1 / tf:.2f}).")


if __name__ == "__main__":
    main()
