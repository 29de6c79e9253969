"""Training throughput and peak memory of Phase 2, the Transformer, the LSTM and CVP at matched size.

Every model trains on the same batches (B x T windows of one token stream) with Adam; Phase 2 trains
on cached contexts (computed once, timed separately). Each model runs in its own subprocess so that
CPU peak memory (ru_maxrss) is its own; on CUDA the peak is torch.cuda.max_memory_allocated.

    python benchmarks/throughput.py                    # CPU, default sizes
    python benchmarks/throughput.py --device cuda      # bf16 autocast on the GPU

Target (issue 4): Phase 2 at >= 1.0x the Transformer's tokens/s.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

MODELS = ("phase2", "transformer", "lstm", "cvp")


def build(name: str, a: argparse.Namespace):
    from dataclasses import replace

    import torch

    from newllm.config import load_params
    from newllm.models.cvfp import NewLLM, Phase2Model
    from newllm.models.cvp import CVPLM
    from newllm.models.factory import count_params
    from newllm.models.lstm import LSTMLM
    from newllm.models.transformer import TransformerLM, match_width

    base = load_params()  # the project's params.yaml: every knob not set here keeps its default
    torch.manual_seed(0)
    llm = NewLLM(a.vocab, a.context_dim, a.embed_dim, a.layers, a.layers)
    target = count_params(llm)[1]
    if name == "phase2":
        return Phase2Model(llm), llm
    if name == "transformer":
        cfg = replace(base.transformer, n_layer=a.layers, n_head=4, seq_len=a.seq_len,
                      n_embd=match_width(target, a.vocab, a.layers, 4, a.seq_len))
        return TransformerLM.from_config(cfg, a.vocab), None

    def closest(make):  # the hidden width (multiple of 8) whose model is closest to New-LLM's size
        return min(range(8, 2049, 8), key=lambda h: abs(count_params(make(h))[1] - target))

    def make(h: int):
        if name == "lstm":
            return LSTMLM.from_config(replace(base.lstm, embed_dim=h, hidden_dim=h, num_layers=a.layers), a.vocab)
        return CVPLM.from_config(replace(base.cvp, embed_dim=h, context_dim=h, hidden_dim=h, num_layers=a.layers),
                                 a.vocab)

    return make(closest(make)), None


def measure(name: str, a: argparse.Namespace) -> dict:
    import torch
    import torch.nn.functional as F

    from newllm.models.factory import count_params
    from newllm.training.batches import detach_state
    from newllm.training.context_cache import compute_contexts
    from newllm.training.trainer import autocast, resolve_device

    torch.set_num_threads(a.threads) if a.threads else None
    device = resolve_device(a.device)
    model, llm = build(name, a)
    model.to(device).train()
    gen = torch.Generator().manual_seed(0)
    n = a.batch * (a.seq_len + 1) * (a.steps + a.warmup)
    stream = torch.randint(0, a.vocab, (n,), generator=gen)
    data = stream[: (n // a.batch) * a.batch].view(a.batch, -1).to(device)
    extras, cache_s = {}, 0.0
    if llm is not None:
        t0 = time.perf_counter()
        ctx = compute_contexts(llm, stream, streams=a.batch, device=device)
        cache_s = time.perf_counter() - t0
        extras = ctx[: data.numel()].view(a.batch, -1, *ctx.shape[1:]).to(device)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    state, t_start = None, 0.0
    for step in range(a.warmup + a.steps):
        if step == a.warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t_start = time.perf_counter()
        i = step * a.seq_len
        x, y = data[:, i:i + a.seq_len], data[:, i + 1:i + 1 + a.seq_len]
        kw = {"contexts": extras[:, i:i + a.seq_len]} if llm is not None else {}
        with autocast(device):
            logits, state = model(x, state, **kw)
        loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state = detach_state(state)
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - t_start
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    trainable, total = count_params(model)
    return {"model": name, "params_total": total, "params_trainable": trainable,
            "tokens_per_s": a.batch * a.seq_len * a.steps / elapsed, "peak_mem_mib": peak / 2**20,
            "context_cache_s": cache_s, "device": str(device)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--context-dim", type=int, default=256)
    p.add_argument("--embed-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--one", choices=MODELS, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(measure(a.one, a)))
        return
    rows = []
    for name in MODELS:
        out = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--one", name], capture_output=True,
                             text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    ref = next(r for r in rows if r["model"] == "transformer")
    print(f"device {rows[0]['device']}, vocab {a.vocab}, batch {a.batch} x seq {a.seq_len}, {a.steps} timed steps")
    print(f"{'model':<12}{'params':>12}{'trainable':>12}{'tokens/s':>12}{'x Transf.':>11}{'peak MiB':>11}{'x Transf.':>11}")
    for r in rows:
        print(f"{r['model']:<12}{r['params_total']:>12,}{r['params_trainable']:>12,}{r['tokens_per_s']:>12,.0f}"
              f"{r['tokens_per_s'] / ref['tokens_per_s']:>11.2f}{r['peak_mem_mib']:>11.1f}"
              f"{r['peak_mem_mib'] / ref['peak_mem_mib']:>11.2f}")
    p2 = rows[0]
    print(f"phase2 context cache (one pass, not in tokens/s): {p2['context_cache_s']:.2f} s")
    print(f"target phase2 >= 1.0x Transformer tokens/s: {'met' if p2['tokens_per_s'] >= ref['tokens_per_s'] else 'NOT met'}")


if __name__ == "__main__":
    main()
