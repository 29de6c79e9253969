"""Phase 1 speed at the research's scale: the sequential reference vs the parallel (Jacobi) iteration.

The research (docs/research.md §3): 1,000 tokens, 768 dims, 3 context layers, 10 iterations -- sequential 265.98 s,
parallel 11.35 s (23.4x), train ER 64.3 % vs 55.9 % (w = 0.9). Both modes run here in the same process on
the same tokens, from the same initial weights, with the same settings, through `train_phase1`:

- sequential = the research's reference: per-token forward through the block, the previous token's context
  detached, loss accumulated over the pass, one backward and one Adam step per iteration;
- parallel   = iteration 0 exact and sequential (no learning), then every position in one batched pass.

The text is the first N whitespace words of WikiText-2's train split (lower-cased; the vocabulary is the
words seen), with a randomly initialised learned embedding that Phase 1 trains -- the pipeline's offline
default (the research's frozen GPT-2 matrix is not available offline). Early stopping is off so both modes
run every iteration, as the research's timings did.

Also printed: the matmul FLOPs of a parallel iteration's forward + backward (counted from the shapes), the
rate the parallel iterations achieve, and two rates measured in this process to compare it with: the
machine's matmul rate (a large square 2048 x 2048 @ 2048 x 2048 sgemm, fp32 -- the >= 50 % target is
against this one) and the very same matmuls run bare (torch.mm, same shapes and dtype), the ceiling for
these shapes. Usage:

    .venv/bin/python benchmarks/phase1_speed.py --tokens 1000,6400 --skip-sequential-above 1000
    .venv/bin/python benchmarks/phase1_speed.py --device cuda            # bf16 autocast
"""

from __future__ import annotations

import argparse
import copy
import os
import re
import time
from dataclasses import replace
from pathlib import Path

import torch

from newllm.config import load_params
from newllm.models.cvfp import NewLLM
from newllm.training.phase1 import train_phase1
from newllm.training.trainer import resolve_device

RESEARCH = {1000: {"sequential": (265.98, 64.3), "parallel": (11.35, 55.9)}}
DEFAULT_TEXT = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2" / "train.txt"
PARAMS_YAML = Path(__file__).resolve().parents[1] / "params.yaml"  # Phase 1's other settings: the defaults


def load_tokens(path: Path, n: int, seed: int) -> tuple[torch.Tensor, int, str]:
    if path.is_file():
        words: list[str] = []
        with path.open(encoding="utf-8") as f:
            for line in f:
                words += re.findall(r"\S+", line.lower())
                if len(words) >= n:
                    break
        if len(words) >= n:
            vocab = {w: i for i, w in enumerate(dict.fromkeys(words[:n]))}
            return torch.tensor([vocab[w] for w in words[:n]]), len(vocab), f"{path} (first {n} words)"
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5000, (n,), generator=g), 5000, "random ids (text file not found)"


def parallel_matmuls(M: int, U: int, Dc: int, De: int, L: int, embed_grad: bool) -> list[tuple[int, int, int]]:
    """(m, k, n) of every matmul in one parallel iteration's forward + backward, each an (m,k) @ (k,n).

    M positions, U distinct tokens: the token half W_x x + b is computed per distinct token
    (`NewLLM.token_projections`), so its matmuls have U rows, the recurrent half's M.
    """
    mm = []
    for layer in range(L):
        mm += [(M, Dc, Dc), (U, De, Dc)]  # forward: c @ W_c^T, x @ W_x^T
        mm += [(Dc, M, Dc), (Dc, U, De)]  # backward: dW_c, dW_x
        if layer > 0:
            mm.append((M, Dc, Dc))  # backward: d(input context); layer 0's input is detached
        if embed_grad:
            mm.append((U, Dc, De))  # backward: dx, into the learned embedding
    return mm


def matmul_rate(shapes: list[tuple[int, int, int]], device: torch.device, dtype: torch.dtype,
                repeats: int = 10, operands: list[tuple[torch.Tensor, torch.Tensor]] | None = None) -> float:
    """GFLOP/s of running exactly these matmuls back to back with torch.mm (best of `repeats`, after one
    warm-up round)."""
    ops = operands or [(torch.randn(m, k, device=device, dtype=dtype),
                        torch.randn(k, n, device=device, dtype=dtype)) for m, k, n in shapes]
    flops = sum(2 * m * k * n for m, k, n in shapes)
    for a, b in ops:  # warm-up
        torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for a, b in ops:
            torch.mm(a, b)
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return flops / best / 1e9


def sgemm_rate(device: torch.device, n: int = 2048, repeats: int = 5) -> float:
    """GFLOP/s of a large square fp32 matmul (n x n @ n x n): this machine's matmul rate."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    return matmul_rate([(n, n, n)], device, torch.float32, repeats=repeats, operands=[(a, b)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", default="1000", help="comma-separated token counts (e.g. 1000,6400)")
    ap.add_argument("--device", default="cpu", help="cpu | cuda | auto (cuda: bf16 autocast)")
    ap.add_argument("--skip-sequential-above", type=int, default=1000,
                    help="run the (slow) sequential reference only for token counts <= N")
    ap.add_argument("--dim", type=int, default=768, help="context_dim = embed_dim")
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--iterations", type=int, default=10)
    ap.add_argument("--dist-reg-weight", type=float, default=0.9)
    ap.add_argument("--target", choices=["fixed", "previous"], default="fixed")
    ap.add_argument("--first-context", choices=["zero", "wrap"], default="zero")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    mm_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    D, L = args.dim, args.layers
    cfg = replace(load_params(PARAMS_YAML).phase1, iterations=args.iterations, target=args.target,
                  dist_reg_weight=args.dist_reg_weight, first_context=args.first_context,
                  min_converged=float("inf"))  # early stopping off: time every iteration

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU, {torch.get_num_threads()} threads, {os.cpu_count()} cores"
    print(f"Phase 1 speed -- device {device} ({dev_name}); {'bf16 autocast' if mm_dtype != torch.float32 else 'fp32'}")
    print(f"context_dim = embed_dim = {D}, {L} context layers, {args.iterations} iterations, "
          f"w = {args.dist_reg_weight}, target {args.target}, first context {args.first_context}, lr {cfg.lr}, "
          f"grad clip {cfg.grad_clip}; learned embedding trained in Phase 1")

    # torch.optim imports torch._dynamo on first use (~1.7 s, once per process): pay it before timing
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1, device=device))])
    print(f"load average (shared machine): {' '.join(f'{x:.2f}' for x in os.getloadavg())}")

    for n in [int(t) for t in args.tokens.split(",")]:
        ids, vocab, source = load_tokens(args.text, n, args.seed)
        torch.manual_seed(args.seed)
        init = NewLLM(vocab, D, D, L, L)
        print(f"\n== {n} tokens from {source}; vocabulary {vocab} (all distinct tokens of the text)")
        results = {}
        modes = ["sequential", "parallel"] if n <= args.skip_sequential_above else ["parallel"]
        for mode in modes:
            model = copy.deepcopy(init)
            res = train_phase1(model, ids, replace(cfg, mode=mode), seed=args.seed, device=device)
            results[mode] = res
            steps = sum(h["step_time_s"] for h in res.history[1:])
            print(f"{mode:>10}: {res.wall_time_s:8.2f} s total  (iteration 0 {res.history[0]['time_s']:.2f} s, "
                  f"iterations 1..{res.iterations_run - 1} {steps:.2f} s in steps + "
                  f"{sum(h['time_s'] for h in res.history[1:]) - steps:.2f} s in metrics, "
                  f"final checks {res.wall_time_s - sum(h['time_s'] for h in res.history):.2f} s)  "
                  f"train ER {res.train_er:.1f} = {res.train_er_pct:.1f} %  "
                  f"convergence {100 * res.convergence_rate:.1f} %  "
                  f"cos(parallel-trained, exact) {res.sequential_cosine:.4f}")

        par = results["parallel"]
        ref = RESEARCH.get(n)
        if "sequential" in results:
            seq = results["sequential"]
            print(f"   speed-up: {seq.wall_time_s / par.wall_time_s:.1f}x   "
                  f"ER gap (sequential - parallel): {seq.train_er_pct - par.train_er_pct:+.1f} points")
        if ref:
            (st, se), (pt, pe) = ref["sequential"], ref["parallel"]
            print(f"   research: sequential {st:.2f} s (ER {se} %), parallel {pt:.2f} s (ER {pe} %), "
                  f"speed-up {st / pt:.1f}x")

        distinct = int(torch.unique(ids[: par.train_tokens]).numel())
        shapes = parallel_matmuls(par.train_tokens, distinct, D, D, L, embed_grad=True)
        flops = sum(2 * m * k * n_ for m, k, n_ in shapes)
        steps = par.history[1:]
        step_s = sum(h["step_time_s"] for h in steps)
        achieved = flops * len(steps) / step_s / 1e9
        ceiling = matmul_rate(shapes, device, mm_dtype)
        machine = sgemm_rate(device)  # measured here, beside the ceiling, under the same load
        print(f"   parallel iterations: {flops / 1e9:.2f} GFLOP of matmuls per iteration (forward + backward), "
              f"{len(steps)} iterations in {step_s:.3f} s -> {achieved:.1f} GFLOP/s achieved\n"
              f"     = {100 * achieved / machine:.0f} % of the machine's fp32 matmul rate "
              f"(2048 x 2048 @ 2048 x 2048 sgemm, best of 5: {machine:.1f} GFLOP/s)\n"
              f"     = {100 * achieved / ceiling:.0f} % of the same-shape ceiling "
              f"(these matmuls bare with torch.mm, {ceiling:.1f} GFLOP/s)")
        if n == 1000 and device.type == "cpu":
            ok = [f"parallel total {par.wall_time_s:.2f} s <= 2 s: {'yes' if par.wall_time_s <= 2 else 'NO'}",
                  f"matmul efficiency {100 * achieved / machine:.0f} % of the machine's fp32 matmul rate >= 50 %: "
                  f"{'yes' if achieved >= 0.5 * machine else 'NO'}"]
            if "sequential" in results:
                seq = results["sequential"]
                ok += [f"speed-up {seq.wall_time_s / par.wall_time_s:.1f}x >= 23x: "
                       f"{'yes' if seq.wall_time_s >= 23 * par.wall_time_s else 'NO'}",
                       f"|ER gap| {abs(seq.train_er_pct - par.train_er_pct):.1f} <= 15 points: "
                       f"{'yes' if abs(seq.train_er_pct - par.train_er_pct) <= 15 else 'NO'}"]
            print("   targets (CPU, 2 cores): " + "; ".join(ok))


if __name__ == "__main__":
    main()
