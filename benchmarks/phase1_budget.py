"""What Phase 1's token budget buys Phase 2 on WikiText-2: is the fixed-point training worth what it costs?

At the research's 10 iterations Phase 1 is 72 % of a New-LLM epoch-equivalent's matmul FLOPs on WikiText-2
(`wikitext_scale.py`): 9 full-batch Adam steps, each a no-grad pass plus a forward and backward over every
training token. This script measures what that buys. In one scratch project (BPE 8000 on the whole of
WikiText-2, tokenized once) and for each seed, Phase 2 trains on the same N training tokens, with the same
lr and the same early stopping on val, from ContextBlocks that differ only in Phase 1's budget:

    <M>        Phase 1 (all its iterations) on the first M training tokens (`phase1.max_tokens`)
    off        the pipeline's control: the embedding and ContextBlock left at their initialisation

Phase 2's best val loss (val selects; test stays the headline of the pipeline, not of a design choice) is
printed per variant as mean +- std over seeds and per seed against the first variant, with Phase 1's
wall time and train effective rank. The real stage scripts run, each in its own process:

    .venv/bin/python benchmarks/phase1_budget.py                                  # 100k tokens, 3 seeds
    .venv/bin/python benchmarks/phase1_budget.py --phase1 100000,25000,off --seeds 0,1,2 --json out.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

from wikitext_scale import SHARED_DATA, make_project, measure, prepare, set_params, settings, timing


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=SHARED_DATA / "wikitext-2", help="folder with WikiText-2's raw files")
    ap.add_argument("--tokens", type=int, default=100_000, help="Phase 2's training tokens (the first N)")
    ap.add_argument("--phase1", default="100000,25000,off", help="Phase 1 budgets: token counts, or off (the control)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--context-dim", type=int, default=512)
    ap.add_argument("--iterations", type=int, default=10, help="Phase 1 iterations (the default params' 10)")
    ap.add_argument("--lr", type=float, default=0.003, help="Phase 2's lr, the same for every variant")
    ap.add_argument("--epochs", type=int, default=4, help="Phase 2's epoch cap (early stopping on val, patience 1)")
    ap.add_argument("--eval-tokens", type=int, default=20_000, help="val (and test) prefix every variant is scored on")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch project folder (default: a temp dir)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    a = ap.parse_args()
    variants = [v.strip() for v in a.phase1.split(",")]
    if bad := [v for v in variants if v != "off" and not (v.isdigit() and int(v) > 0)]:
        sys.exit(f"--phase1: {bad[0]!r} is neither a positive token count nor 'off'")
    if not (a.data / "train.txt").is_file():
        sys.exit(f"no WikiText-2 at {a.data} (want train.txt, valid.txt, test.txt): pass --data")

    root = Path(a.workdir or tempfile.mkdtemp(prefix="phase1_budget_"))
    shutil.rmtree(root / "proj", ignore_errors=True)
    config = settings(a.data.resolve(), a.context_dim, a.iterations, a.device, ["transformer"])
    config["tokenizer"]["max_eval_tokens"] = a.eval_tokens
    config["train"].update({"epochs": a.epochs, "patience": 1, "max_tokens": a.tokens})
    config["protocol"]["lrs"] = [a.lr]
    proj = make_project(root / "proj", config)
    log = root / "stages.log"
    print(f"scratch project {proj}; stage output in {log}", flush=True)
    py = sys.executable
    prepare(proj, log)

    rows = []
    for seed in (int(s) for s in a.seeds.split(",")):
        for v in variants:
            set_params(proj, {"seed": seed, "phase1": {"max_tokens": 0 if v == "off" else int(v)},
                              "protocol": {"replicates": [seed + 1]}})  # any seed but `seed`: no stage here reads it
            row = {"seed": seed, "phase1": v, "phase1_wall_s": 0.0, "train_er_pct": None}
            if v == "off":
                model, record = "newllm_phase1_off", f"sweep/phase1_off/lr{a.lr}"
            else:
                model, record = "newllm", f"sweep/phase2_train/lr{a.lr}"
                measure([py, "stages/phase1_cvfp.py"], proj, log)
                p1 = timing(proj, f"phase1/seed{seed}")
                row.update(phase1_wall_s=p1["wall_time_s"], train_er_pct=p1["train_er_pct"],
                           phase1_tokens=p1["train_tokens"])
            measure([py, "stages/phase2_train.py", model, "--lr", str(a.lr)], proj, log)
            m = timing(proj, record)
            row.update({k: m.get(k) for k in ("val_loss", "val_ppl", "best_epoch", "epochs_run", "undertrained",
                                              "train_tokens", "val_tokens")})
            rows.append(row)
            er = "" if row["train_er_pct"] is None else f"  train ER {row['train_er_pct']:.1f} %"
            print(f"seed {seed} Phase 1 {v:>8}: val loss {row['val_loss']:.4f} (best epoch {row['best_epoch']} of "
                  f"{row['epochs_run']})  Phase 1 {row['phase1_wall_s']:.0f} s{er}", flush=True)
            if a.json:
                a.json.parent.mkdir(parents=True, exist_ok=True)
                a.json.write_text(json.dumps({"settings": config, "rows": rows}, indent=1) + "\n")
    report(rows, variants, a)


def report(rows: list[dict], variants: list[str], a: argparse.Namespace) -> None:
    def of(v: str) -> list[dict]:
        return [r for r in rows if r["phase1"] == v]

    ref = {r["seed"]: r["val_loss"] for r in of(variants[0])}
    print(f"\n## Phase 1's budget against Phase 2's val loss (WikiText-2, BPE 8000, context_dim {a.context_dim}, "
          f"Phase 1 {a.iterations} iterations, Phase 2 on {a.tokens:,} tokens at lr {a.lr}, "
          f"val = first {a.eval_tokens:,} tokens)\n")
    print(f"| Phase 1 on | Phase 1 wall (s) | train ER % | val loss, mean ± std | val PPL | "
          f"per seed, minus '{variants[0]}' | best epochs |")
    print("|---|---:|---:|---:|---:|---|---|")
    for v in variants:
        rs = of(v)
        losses = [r["val_loss"] for r in rs]
        sd = statistics.stdev(losses) if len(losses) > 1 else 0.0
        er = "-" if v == "off" else f"{statistics.mean(r['train_er_pct'] for r in rs):.1f}"
        wall = "-" if v == "off" else f"{statistics.mean(r['phase1_wall_s'] for r in rs):.0f}"
        name = "off (initialisation)" if v == "off" else f"{int(v):,} tokens"
        diffs = ", ".join(f"{r['val_loss'] - ref[r['seed']]:+.4f}" for r in rs if r["seed"] in ref)
        print(f"| {name} | {wall} | {er} | {statistics.mean(losses):.4f} ± {sd:.4f} | "
              f"{statistics.mean(r['val_ppl'] for r in rs):.1f} | {diffs} | "
              f"{', '.join(str(r['best_epoch']) + '/' + str(r['epochs_run']) for r in rs)} |")


if __name__ == "__main__":
    main()
