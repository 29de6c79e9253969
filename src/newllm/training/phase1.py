"""Phase 1 of CVFP: fixed-point training of the ContextBlock (docs/research.md §3): the algorithm and its driver.

Pure training code: no MLflow, no files. The stage logs what the callback and `Phase1Result` report.

The recurrence is c_t = CB(c_{t-1}, x_t) (c_t: the last layer's output, zero before a stream's first token).
Iteration 0 runs it exactly, token by token, without learning, giving P^(0). Each later iteration k
(`parallel_iteration`) feeds every position t the previous iteration's context of position t-1 and runs all
positions in one batched pass:

    C^(k)[t] = CB(P^(k-1)[t-1], x_t),    P^(k) = C^(k).detach()

This is a Jacobi iteration of the recurrence: with the weights held still, position t is exact after t+1
iterations, and the fixed point (P = CB(shift(P), X)) *is* the sequential state sequence. For that to hold
a stream's first position must get what the recurrence gives it, the zero context
(cfg.first_context "zero", the default). The research instead gave token 0 the previous iteration's last
context, P[N-1] (a cyclic stream, whose fixed point is not the sequential one); cfg.first_context "wrap"
reproduces it. Either way the context is carried across iterations, never reset (the research's bug 2).

The losses (`cvfp_losses`) apply to the block's (last layer's) output, as in the research: the only output
fed back, so the one whose fixed point is being sought (earlier layers are functions of it and x):

    cvfp      = mean((C - target)^2)                  target: P^(0) (`fixed`) or P^(k-1) (`previous`)
    diversity = -||C - mean_t C||_F / tokens
    total     = (1 - w) * cvfp + w * diversity,       w = dist_reg_weight

Each iteration takes cfg.steps_per_iteration Adam steps (each a fresh forward from the same input
contexts, with fresh noise when cfg.noise > 0); the last step's outputs become P. Only the ContextBlock and
the embedding module's trainable parameters get an optimiser (the learned embedding is the context path's
input; a GPT-2 matrix is frozen and only its embed_norm trains).

Early stop when the convergence rate (share of positions with mean_d (C^(k) - P^(k-1))^2 < tau) reaches
cfg.min_converged, checked only from iteration cfg.min_iterations on (and never before iteration 2): the
rate compares iterates one optimiser step apart, so early on it is met before the block has trained --
iteration 1 even runs the very weights of iteration 0's exact pass, so it reproduces it (100 % by
construction). The defaults (min_iterations = iterations = 10) run every iteration.

cfg.mode "sequential" is the research's slow reference (`sequential_iteration`, in parallel_iteration's
place in the same loop): each step runs the recurrence token by token with grad, each token's input context
the previous token's output of the same pass, detached; the loss is accumulated over the pass, one backward.

On CUDA the training forward passes run under bf16 autocast; the exact no-grad passes (iteration 0, the
final sequential check, val ER, `compute_contexts`) run in fp32 everywhere.

Streams: `cfg.streams` = S cuts the training prefix into S contiguous chunks of N // S tokens (the < S
leftover tokens are dropped); each chunk is its own stream (zero context at its start), and all S x N
positions form one batch. Chunks and DDP shards (cfg.chunk_tokens, torchrun) are in phase1_chunks.py;
Phase 2's context cache (the same layout, padded instead of dropped) in context_cache.py.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from newllm import distributed
from newllm.config import Phase1Config
from newllm.data.disk_array import scratch_tensor
from newllm.models.cvfp import NewLLM
from newllm.training.metrics import convergence_rate, effective_rank_pct
from newllm.training.phase1_chunks import (
    FirstContext,
    RowSample,
    chunk_spans,
    chunked_step,
    exact_chunks,
    exact_er,
    parallel_vs_exact,
)
from newllm.training.trainer import autocast, check_finite, resolve_device


@dataclass
class Phase1Result:
    iterations_run: int  # including iteration 0
    converged: bool  # stopped early: convergence rate >= cfg.min_converged
    history: list[dict[str, float]]  # the metrics passed to on_iteration, one dict per iteration
    train_er: float  # ER of the exact contexts of the final weights (last layer, train), like val_er (the
    # last iterate's with check_sequential=False)
    train_er_pct: float  # 100 * train_er / context_dim
    convergence_rate: float  # of the last iteration (0 if only iteration 0 ran)
    sequential_cosine: float  # mean cos(parallel contexts, exact recurrence), both with the final weights
    val_er: float | None
    val_er_pct: float | None
    wall_time_s: float  # the whole call, final checks included
    train_tokens: int  # S * N positions trained on
    streams: int
    contexts: Tensor | None = field(repr=False)  # (S, N, Dc) final last-layer contexts, CPU (None: on disk)


# ----------------------------------------------------------------------------------------------- layout
def split_streams(ids: Tensor, streams: int) -> Tensor:
    """(N,) -> (S, N // S): S contiguous chunks; the < S leftover tokens at the end are dropped."""
    if ids.dim() != 1:
        raise ValueError(f"split_streams wants a 1-D token stream, got shape {tuple(ids.shape)}")
    n = ids.numel() // streams
    if n < 1:
        raise ValueError(f"{ids.numel()} tokens are too few for {streams} streams")
    return ids[: n * streams].reshape(streams, n)


def shift_contexts(prev: Tensor, first: FirstContext = "zero") -> Tensor:
    """prev (S, N, Dc), the previous iteration's last-layer outputs -> every position's input context:
    position t gets prev[:, t-1]; position 0 gets zero ("zero") or prev[:, N-1] ("wrap")."""
    head = prev[:, -1:] if first == "wrap" else torch.zeros_like(prev[:, :1])
    return torch.cat([head, prev[:, :-1]], dim=1)


# ----------------------------------------------------------------------------------------------- passes
@torch.no_grad()
def sequential_pass(model: NewLLM, stream_ids: Tensor, initial: Tensor | None = None) -> Tensor:
    """The exact recurrence over S streams (S, N), no grad -> every layer's output P (S, N, L, Dc).

    The context is carried token to token and reset (to `initial`, default zero) only at a stream start.
    Always fp32, also on CUDA: errors would compound along the recurrence under bf16, and this pass is
    the reference the parallel iterates are measured against.
    """
    contexts, _ = model.sequential_contexts(stream_ids, initial=initial)
    return contexts


def _parallel_outputs(model: NewLLM, stream_ids: Tensor, inputs: Tensor) -> list[Tensor]:
    """All positions in one batched pass: stream_ids (S, N), inputs (S, N, Dc) -> L tensors (S*N, Dc)."""
    xp = model.token_projections(stream_ids.reshape(-1))  # L x (S*N, Dc), per distinct token
    return model.context_block.outputs(inputs.reshape(-1, inputs.size(-1)), xp=xp)


def parallel_contexts(model: NewLLM, stream_ids: Tensor, prev: Tensor, first: FirstContext = "zero") -> Tensor:
    """One Jacobi iteration: C[t] = CB(prev[t-1], x_t) for all positions at once -> (S, N, L, Dc).

    prev (S, N, Dc) is the previous iteration's last-layer output; runs under the caller's grad mode.
    """
    outs = _parallel_outputs(model, stream_ids, shift_contexts(prev, first))
    S, N = stream_ids.shape
    return torch.stack(outs, dim=1).reshape(S, N, len(outs), -1)



# ----------------------------------------------------------------------------------------------- training
def add_noise(x: Tensor, std: float, gen: torch.Generator | None) -> Tensor:
    """x (..., Dc) + N(0, std^2) noise drawn from `gen`; x itself when std <= 0."""
    return x if std <= 0 else x + std * torch.randn(x.shape, generator=gen, device=x.device)


def parallel_iteration(model: NewLLM, streams: Tensor, prev: Tensor, first: FirstContext = "zero",
                       noise: float = 0.0, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """One training forward of a Jacobi iteration, with grad: streams (S, N), prev (S, N, Dc) ->
    (inputs, C), each (S*N, Dc): the (noisy) input contexts shift(prev) and the last layer's outputs, fp32."""
    inputs = add_noise(shift_contexts(prev, first), noise, gen)
    return inputs, block_outputs(model, streams, inputs)


def block_outputs(model: NewLLM, streams: Tensor, inputs: Tensor) -> Tensor:
    """streams (S, N) and their input contexts (S, N, Dc) -> the last layer's outputs (S*N, Dc), fp32, under
    the training autocast: the parallel pass Phase 1 trains and checks."""
    with autocast(streams.device):
        return _parallel_outputs(model, streams, inputs)[-1].float()


def sequential_iteration(model: NewLLM, streams: Tensor, prev: Tensor, first: FirstContext = "zero",
                         noise: float = 0.0, gen: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """cfg.mode "sequential" (the research's slow reference), parallel_iteration's drop-in: token by token,
    each token's input context the previous token's output of this same pass, detached. prev (S, N, Dc)
    only gives the first position's context ("wrap"). Returns (inputs, C), each (S*N, Dc)."""
    cb, Dc = model.context_block, prev.size(-1)
    # unbind: per-token views with one stacked backward (x[:, t] would zero-fill an (S, N, De) grad per token)
    xs = model.embedding(streams).unbind(1)
    c = prev[:, -1] if first == "wrap" else prev.new_zeros(prev.size(0), Dc)
    inputs, outputs = [], []
    with autocast(streams.device):
        for x_t in xs:
            inputs.append(add_noise(c.detach(), noise, gen))
            c = cb.outputs(inputs[-1], x_t)[-1]
            outputs.append(c)
    return torch.stack(inputs, 1).reshape(-1, Dc), torch.stack(outputs, 1).float().reshape(-1, Dc)


def cvfp_losses(C: Tensor, target: Tensor, w: float) -> tuple[Tensor, Tensor, Tensor]:
    """C, target (tokens, Dc), fp32 -> (cvfp, diversity, total)."""
    cvfp = F.mse_loss(C, target)  # on the raw contexts, never on re-normalised copies
    diversity = -(C - C.mean(dim=0)).norm() / C.size(0)
    return cvfp, diversity, (1.0 - w) * cvfp + w * diversity


def clip_and_step(opt: torch.optim.Optimizer, params: list[Tensor], grad_clip: float) -> float:
    """A clipped Adam step -> the gradient norm before clipping (grad_clip 0 = off)."""
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else math.inf)
    opt.step()
    return norm.item()


def iteration_metrics(losses: tuple[Tensor, Tensor, Tensor], grad_norm: float, C: Tensor, P: Tensor,
                      cfg: Phase1Config, er_gen: torch.Generator, step_time: float) -> dict[str, float]:
    """Iteration k's metrics but time_s: the last step's losses, C = C^(k) and P = P^(k-1) (S, N, Dc)."""
    er, er_pct = effective_rank_pct(C, cfg.er_max_rows, er_gen)
    return {"cvfp_loss": losses[0].item(), "diversity_loss": losses[1].item(), "total_loss": losses[2].item(),
            "grad_norm": grad_norm, "er": er, "er_pct": er_pct,
            "convergence_rate": convergence_rate(C, P, cfg.convergence_threshold), "step_time_s": step_time}


@dataclass
class _Run:
    """What every iteration of one train_phase1 call shares."""
    model: NewLLM
    cfg: Phase1Config
    streams: Tensor  # (S, N) this rank's positions of every stream, on the device
    spans: list[tuple[int, int]]  # chunk position ranges of N (one span: a single pass)
    T: int  # positions over all ranks
    lo: int  # this rank's first position
    opt: torch.optim.Optimizer
    params: list[Tensor]
    noise_gen: torch.Generator
    er_gen: torch.Generator


def dense_iteration(run: _Run, P: Tensor, P0: Tensor, k: int, last_loss: float) -> tuple[dict, Tensor, float]:
    """Iteration k over all positions in one batched pass -> (metrics but time_s, P^(k), last loss)."""
    m, cfg, (S, N), Dc = run.model, run.cfg, run.streams.shape, run.model.context_dim
    forward = parallel_iteration if cfg.mode == "parallel" else sequential_iteration  # looked up per call: tests spy
    target = (P0 if cfg.target == "fixed" else P).reshape(-1, Dc)
    t0 = time.perf_counter()
    for step in range(cfg.steps_per_iteration):  # each a fresh forward from the same P, fresh noise
        _, C = forward(m, run.streams, P, cfg.first_context, cfg.noise, run.noise_gen)
        losses = cvfp_losses(C, target, cfg.dist_reg_weight)
        check_finite(losses[2].item(), f"iteration {k} step {step + 1}", last_loss)
        run.opt.zero_grad(set_to_none=True)
        losses[2].backward()
        grad_norm = clip_and_step(run.opt, run.params, cfg.grad_clip)
        check_finite(grad_norm, f"iteration {k} step {step + 1} (gradient norm)", last_loss)
        last_loss = losses[2].item()
    C = C.detach().reshape(S, N, Dc)
    _sync(run.streams.device)
    metrics = iteration_metrics(losses, grad_norm, C, P, cfg, run.er_gen, step_time=time.perf_counter() - t0)
    return metrics, C, last_loss  # the last step's outputs are P^(k), carried on (never reset: bug 2)


def chunked_iteration(run: _Run, P, P0, k: int, last_loss: float) -> tuple[dict, Any, float]:
    """Iteration k a chunk (and a rank's shard) at a time, P updated in place -> (metrics but time_s, P, loss)."""
    m, cfg, (S, _), Dc = run.model, run.cfg, run.streams.shape, run.model.context_dim

    def forward(streams: Tensor, inputs: Tensor) -> Tensor:
        return block_outputs(m, streams, add_noise(inputs, cfg.noise, run.noise_gen))

    t0 = time.perf_counter()
    for step in range(cfg.steps_per_iteration):  # each a fresh pass from the same P, fresh noise
        last = (RowSample(S, run.T // S, Dc, cfg.er_max_rows, run.er_gen, offset=run.lo)
                if step + 1 == cfg.steps_per_iteration else None)
        run.opt.zero_grad(set_to_none=True)
        losses, n_conv = chunked_step(forward, run.streams, P, P0, run.spans, cfg, run.noise_gen, run.params,
                                      f"iteration {k} step {step + 1}", last_loss, last, run.T)
        grad_norm = clip_and_step(run.opt, run.params, cfg.grad_clip)
        check_finite(grad_norm, f"iteration {k} step {step + 1} (gradient norm)", last_loss)
        last_loss = losses[2]
    _sync(run.streams.device)
    er, er_pct = last.er(cfg.er_max_rows)
    metrics = {"cvfp_loss": losses[0], "diversity_loss": losses[1], "total_loss": losses[2],
               "grad_norm": grad_norm, "er": er, "er_pct": er_pct, "convergence_rate": n_conv / run.T,
               "step_time_s": time.perf_counter() - t0}
    return metrics, P, last_loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_phase1(model: NewLLM, train_ids: Tensor, cfg: Phase1Config, *, seed: int = 0,
                 val_ids: Tensor | None = None,
                 on_iteration: Callable[[int, dict[str, float]], None] | None = None,
                 device: str | torch.device = "auto", check_sequential: bool = True,
                 resume: dict[str, Any] | None = None,
                 on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
                 checkpoint_every_s: float = 60.0, scratch: str | Path | None = None) -> Phase1Result:
    """Train model.context_block (+ the embedding's trainable parameters) in place, on `device` (the
    model is moved there); see the module doc.

    train_ids (N,) is the train token stream (its first cfg.max_tokens, 0 = all). Per iteration
    `on_iteration(k, metrics)` gets: er, er_pct, time_s (the whole iteration, metrics included) and, for
    k >= 1, cvfp_loss, diversity_loss, total_loss, grad_norm (before clipping), convergence_rate,
    step_time_s (forward + backward + optimiser steps only). After training: val ER (one sequential pass
    over val_ids, same stream layout) and `sequential_cosine` (skipped, NaN, with check_sequential=False).
    `seed` seeds the input noise and the ER row subsampling; the weights are the caller's.

    With more than cfg.chunk_tokens positions, or under torchrun, every pass runs a chunk (and a rank's
    shard) at a time: phase1_chunks.py says how, and why it is the same update.

    A non-finite loss or gradient norm raises Diverged in the step it appears. Resume: `on_checkpoint(state)`
    gets the whole state after an iteration once `checkpoint_every_s` passed since the last save;
    `resume=state` continues from it to the numbers of an uninterrupted run (CPU).
    """
    t_start = time.perf_counter()
    device = resolve_device(device)
    model.to(device)
    world = distributed.world_size()
    if world > 1 and cfg.mode != "parallel":
        raise ValueError("Phase 1 runs in parallel mode under several processes (sequential mode is one stream)")
    distributed.broadcast_from_main(model)
    ids = train_ids[: cfg.max_tokens] if cfg.max_tokens else train_ids
    all_streams = split_streams(ids.long(), cfg.streams)  # (S, N_all)
    val_len = val_ids.numel() // max(1, min(cfg.streams, val_ids.numel())) if val_ids is not None else world
    if min(all_streams.size(1), val_len) < world:  # each rank a non-empty block (the stage's precheck says so)
        raise ValueError(f"Phase 1 over {world} processes needs at least {world} positions a stream (train and val)")
    lo, hi = distributed.shard_span(all_streams.size(1))  # this rank's positions (all of them in one process)
    streams = all_streams[:, lo:hi].to(device)  # (S, N)
    S, N, Dc = *streams.shape, model.context_dim
    T = S * all_streams.size(1)  # positions over all ranks
    per_chunk = max(1, cfg.chunk_tokens // S) if cfg.chunk_tokens and cfg.mode == "parallel" else N
    spans = chunk_spans(N, per_chunk)
    chunked = len(spans) > 1 or world > 1
    noise_gen = torch.Generator(device=device).manual_seed(seed + distributed.rank())
    er_gen = torch.Generator().manual_seed(seed)
    params = [p for m in (model.embedding, model.context_block) for p in m.parameters() if p.requires_grad]
    if not cfg.train_last_gain:  # the diversity term grows with the output's scale: keep that gain at its init
        gain = getattr(model.context_block.layers[-1].norm, "weight", None)
        params = [p for p in params if p is not gain]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))
    scratch = Path(scratch) if scratch is not None and chunked else None
    run = _Run(model, cfg, streams, spans, T, lo, opt, params, noise_gen, er_gen)
    iterate = chunked_iteration if chunked else dense_iteration

    if resume is None:  # iteration 0: the exact recurrence, no learning -> P^(0)
        t0 = time.perf_counter()
        if chunked:
            P = scratch_tensor((S, N, Dc), path=scratch and scratch / "P.bin", device=device)
            rows = RowSample(S, T // S, Dc, cfg.er_max_rows, er_gen, offset=lo)
            for a, b, exact in exact_chunks(model, streams, spans):
                P[:, a:b] = exact
                rows.add(a, b, exact)
            er, er_pct = rows.er(cfg.er_max_rows)
            P0 = None
            if cfg.target == "fixed":
                P0 = scratch_tensor((S, N, Dc), path=scratch and scratch / "P0.bin", device=device)
                for a, b in spans:
                    P0[:, a:b] = P[:, a:b]
        else:
            P = P0 = sequential_pass(model, streams)[..., -1, :]  # (S, N, Dc)
            er, er_pct = effective_rank_pct(P, cfg.er_max_rows, er_gen)
        _sync(device)
        history = [{"er": er, "er_pct": er_pct, "time_s": time.perf_counter() - t0}]
        if on_iteration:
            on_iteration(0, history[0])
        conv, first = 0.0, 1
    else:
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        noise_gen.set_state(resume["noise_rng"])
        er_gen.set_state(resume["er_rng"])
        P, P0 = resume["P"].to(device), resume["P0"].to(device)
        history, conv, first = resume["history"], resume["convergence_rate"], resume["iteration"] + 1
    last_save, last_loss = time.monotonic(), math.nan

    converged = False
    for k in range(first, cfg.iterations):
        t0 = time.perf_counter()
        metrics, P, last_loss = iterate(run, P, P0, k, last_loss)
        metrics["time_s"] = time.perf_counter() - t0
        conv = metrics["convergence_rate"]
        history.append(metrics)
        if on_iteration:
            on_iteration(k, metrics)
        # the rate is met long before the block has trained (module doc): stop from min_iterations, never < 2
        if k >= max(cfg.min_iterations, 2) and conv >= cfg.min_converged:
            converged = True
            break
        if (on_checkpoint is not None and isinstance(P, Tensor) and world == 1
                and time.monotonic() - last_save >= checkpoint_every_s):
            on_checkpoint({"iteration": k, "model": model.state_dict(), "optimizer": opt.state_dict(),
                           "noise_rng": noise_gen.get_state(), "er_rng": er_gen.get_state(), "P": P,
                           "P0": P if P0 is None else P0, "history": history, "convergence_rate": conv})
            last_save = time.monotonic()

    # Final checks, all with the final weights: P was made by the weights before the last step, so one
    # more (no-grad, noiseless) Jacobi step from it is what the trained block's parallel pass gives.
    cosine, train_er, train_er_pct = math.nan, history[-1]["er"], history[-1]["er_pct"]
    if check_sequential:  # how far the parallel contexts are from the exact recurrence's, same weights
        rows = RowSample(S, T // S, Dc, cfg.er_max_rows, er_gen, offset=lo)
        cosine = parallel_vs_exact(lambda x, inputs: block_outputs(model, x, inputs), model, streams, P, spans,
                                   cfg.first_context, rows, T)
        train_er, train_er_pct = rows.er(cfg.er_max_rows)  # as val's: exact contexts
    val_er = val_er_pct = None
    if val_ids is not None:
        all_val = split_streams(val_ids.long(), max(1, min(cfg.streams, val_ids.numel())))
        val_er, val_er_pct = exact_er(model, all_val, max(1, per_chunk * S // all_val.size(0)), cfg.er_max_rows,
                                      er_gen, device)
    _sync(device)
    return Phase1Result(
        iterations_run=len(history), converged=converged, history=history, train_er=train_er,
        train_er_pct=train_er_pct, convergence_rate=conv, sequential_cosine=cosine,
        val_er=val_er, val_er_pct=val_er_pct, wall_time_s=time.perf_counter() - t_start,
        train_tokens=T, streams=S, contexts=P.cpu() if isinstance(P, Tensor) and world == 1 else None)
