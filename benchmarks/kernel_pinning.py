"""Can CPU float kernels be pinned so that the record reproduces bit for bit on any x86-64 machine (issue 23)?

The same short training (byte-level Tiny Shakespeare; an LSTM, a Transformer and New-LLM's Phase 1 +
Phase 2-style next-token training, at small widths, through the pipeline's own `train_lm`/`train_phase1`
under `make_deterministic`) runs in a fresh process per setting. Each prints a digest of every final
weight; the table says which settings change the bits, and what each costs in wall time.

A different machine differs from this one in the kernels its libraries pick at run time: ATen's
vectorised kernels by CPU capability (`ATEN_CPU_CAPABILITY`: default / avx2 / avx512), MKL's GEMM path
(`MKL_CBWR`: its conditional numerical reproducibility modes), oneDNN's ISA (`ONEDNN_MAX_CPU_ISA`), and
the thread count (a parallel reduction sums in an order set by the number of threads). So each of those
is varied here on one machine; a pinned setting is one whose digest no longer depends on any of them.

    .venv/bin/python benchmarks/kernel_pinning.py            # the table (a few minutes on 2 cores)
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt"
PINNED = {"MKL_CBWR": "COMPATIBLE,STRICT", "ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
SETTINGS = [  # (name, env, threads)
    ("as is, 2 threads", {}, 2),
    ("as is, 1 thread", {}, 1),
    ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}, 2),
    ("MKL_CBWR=COMPATIBLE", {"MKL_CBWR": "COMPATIBLE"}, 2),
    ("MKL_CBWR=AVX2,STRICT", {"MKL_CBWR": "AVX2,STRICT"}, 2),
    ("ONEDNN_MAX_CPU_ISA=SSE41", {"ONEDNN_MAX_CPU_ISA": "SSE41"}, 2),
    ("all three pinned, 2 threads", PINNED, 2),
    ("all three pinned, 1 thread", PINNED, 1),
]


def child() -> None:
    import torch
    from helpers import section  # tests/helpers.py: a params.yaml section with some keys changed

    from newllm.models.cvfp import NewLLM
    from newllm.models.lstm import LSTMLM
    from newllm.models.transformer import TransformerLM
    from newllm.pipeline import make_deterministic
    from newllm.training.phase1 import train_phase1
    from newllm.training.trainer import train_lm

    torch.set_num_threads(int(os.environ["PIN_THREADS"]))
    make_deterministic()
    data = torch.frombuffer(bytearray(CORPUS.read_bytes()[:60_000]), dtype=torch.uint8).long()
    train, val = data[:50_000], data[50_000:]
    cfg = section("train", epochs=2, patience=0, batch_size=16, seq_len=32)
    digests, t0 = {}, time.perf_counter()
    builders = {"lstm": lambda: LSTMLM(256, 64, 64, 1, dropout=0.1),
                "transformer": lambda: TransformerLM(256, n_layer=2, n_head=2, n_embd=64, seq_len=32, dropout=0.1),
                "newllm": lambda: NewLLM(256, context_dim=64, embed_dim=32, context_layers=2, token_layers=2)}
    for name, build in builders.items():
        torch.manual_seed(0)
        model = build()
        if name == "newllm":
            train_phase1(model, train[:8000], section("phase1", iterations=5, min_converged=1.0), seed=0,
                         device="cpu", check_sequential=False)
        train_lm(model, train, val, cfg, lr=3e-3, device="cpu", seed=0, progress=False)
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
        digests[name] = h.hexdigest()[:12]
    print(json.dumps({"digests": digests, "seconds": round(time.perf_counter() - t0, 2),
                      "capability": torch.backends.cpu.get_cpu_capability()}))


def main() -> None:
    if not CORPUS.is_file():
        sys.exit(f"{CORPUS}: not found (the benchmark reads ../shared/data's Tiny Shakespeare)")
    tests = Path(__file__).resolve().parents[1] / "tests"
    rows, ref = [], None
    for name, extra, threads in SETTINGS:
        env = {**os.environ, **extra, "PIN_THREADS": str(threads), "NEWLLM_WARM": "0",
               "PYTHONPATH": f"{tests}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
        for k in PINNED:
            if k not in extra:
                env.pop(k, None)
        out = subprocess.run([sys.executable, __file__, "--child"], env=env, capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"{name}: {out.stderr[-2000:]}")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        ref = ref or r["digests"]
        same = [m for m in r["digests"] if r["digests"][m] == ref[m]]
        rows.append((name, r, same))
        print(f"{name:<32} {r['capability']:<8} {r['seconds']:7.2f} s  "
              + "  ".join(f"{m} {d}{'' if m in same else ' (differs)'}" for m, d in r["digests"].items()), flush=True)


if __name__ == "__main__":
    if sys.argv[1:] == ["--child"]:
        child()
    else:
        main()
