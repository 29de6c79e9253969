"""Phase 1 of CVFP: fixed-point training of the ContextBlock (SPEC §3), and the context cache of Phase 2.

Pure training code: no MLflow, no files. The stage logs what the callback and `Phase1Result` report.

The recurrence is c_t = CB(c_{t-1}, x_t) (c_t: the last layer's output, zero before a stream's first token).
Iteration 0 runs it exactly, token by token, without learning, giving P^(0). Each later iteration k feeds
every position t the previous iteration's context of position t-1 and runs all positions in one batched
pass:

    C^(k)[t] = CB(P^(k-1)[t-1], x_t),    P^(k) = C^(k).detach()

This is a Jacobi iteration of the recurrence: with the weights held still, position t is exact after t+1
iterations, and the fixed point (P = CB(shift(P), X)) *is* the sequential state sequence. For that to hold
a stream's first position must get what the recurrence gives it, the zero context
(cfg.first_context "zero", the default). The research instead gave token 0 the previous iteration's last
context, P[N-1] (a cyclic stream, whose fixed point is not the sequential one); cfg.first_context "wrap"
reproduces it. Either way the context is carried across iterations, never reset (the research's bug 2).

The losses apply to the block's output (the last layer's), as in the research: it is the only output that
is fed back, so it is the one whose fixed point is being sought (earlier layers are functions of it and x):

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

cfg.mode "sequential" is the research's slow reference, for comparison: every iteration runs the
recurrence token by token with grad, each token's input context being the previous token's output of the
same pass, detached; the loss is accumulated over the pass, then one backward and one optimiser step.

On CUDA the training forward passes run under bf16 autocast; the exact no-grad passes (iteration 0, the
final sequential check, val ER, `compute_contexts`) run in fp32 everywhere.

Streams: `cfg.streams` = S cuts the training prefix into S contiguous chunks of N // S tokens (the < S
leftover tokens are dropped); each chunk is its own stream (zero context at its start), and all S x N
positions form one batch. `compute_contexts` uses the same layout, but pads instead of dropping, so it
returns a context for every position.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from newllm.config import Phase1Config
from newllm.models.cvfp import NewLLM
from newllm.training.metrics import convergence_rate, effective_rank
from newllm.training.trainer import autocast, resolve_device

FirstContext = Literal["zero", "wrap"]


@dataclass
class Phase1Result:
    iterations_run: int  # including iteration 0
    converged: bool  # stopped early: convergence rate >= cfg.min_converged
    history: list[dict[str, float]]  # the metrics passed to on_iteration, one dict per iteration
    train_er: float  # ER of the final contexts (last layer, train)
    train_er_pct: float  # 100 * train_er / context_dim
    convergence_rate: float  # of the last iteration (0 if only iteration 0 ran)
    sequential_cosine: float  # mean cos(final parallel-trained context, exact sequential recomputation)
    val_er: float | None
    val_er_pct: float | None
    wall_time_s: float  # the whole call, final checks included
    train_tokens: int  # S * N positions trained on
    streams: int
    contexts: Tensor = field(repr=False)  # (S, N, Dc) final last-layer contexts, CPU
    # trace=True only: per iteration {"input", "output", "target"} last-layer contexts (S, N, Dc), CPU;
    # iteration 0 has only "output".
    trace: list[dict[str, Tensor]] | None = field(default=None, repr=False)


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


def context_cache_shape(model: NewLLM, n_tokens: int, streams: int = 1) -> tuple[int, int, int]:
    """The (rows, L, Dc) storage compute_contexts fills for n_tokens (S streams padded to equal length)."""
    S = max(1, min(streams, n_tokens))
    return S * math.ceil(n_tokens / S), model.num_context_layers, model.context_dim


@torch.no_grad()
def compute_contexts(model: NewLLM, ids: Tensor, streams: int = 1, chunk: int = 2048,
                     dtype: torch.dtype = torch.float32, device: str | torch.device | None = None,
                     out: Tensor | None = None) -> Tensor:
    """Phase 2's cache: (N,) token ids -> (N, L, Dc) per-position, per-layer contexts, on the CPU.

    One no-grad pass of the exact recurrence with the (frozen) ContextBlock: the context is carried from
    token to token, never reset per token (the research's bug 3). The stream is cut into S contiguous
    chunks (ceil(N / S) tokens; the last padded at its end, the padding's outputs discarded) run as one
    batch, each starting from zero; S = 1 is the single-stream recurrence. `chunk` bounds the positions
    embedded at a time (memory), the context being carried across chunks; `dtype` is the stored dtype
    (bf16 halves the cache; Phase2Model casts it back). `out` (shape `context_cache_shape`) is storage
    to fill instead of a new in-memory tensor, e.g. a disk-backed memmap when the cache does not fit in
    RAM: it is filled chunk by chunk, with the same numbers. Computed in fp32 on every device (no autocast):
    under bf16 the rounding compounds along the recurrence (cos down to 0.91 against fp32 at D = 256 on
    an H100), and this loop is launch-bound on a GPU anyway.
    """
    if ids.dim() != 1:
        raise ValueError(f"compute_contexts wants a 1-D token stream, got shape {tuple(ids.shape)}")
    p = next(model.parameters())
    device = p.device if device is None else torch.device(device)
    n_tok = ids.numel()
    S = max(1, min(streams, n_tok))
    n = math.ceil(n_tok / S)
    grid = torch.cat([ids, ids.new_zeros(S * n - n_tok)]).reshape(S, n)
    shape = (S, n, model.num_context_layers, model.context_dim)
    if out is None:
        out = torch.empty(shape, dtype=dtype)
    elif out.shape != (S * n, *shape[2:]):
        raise ValueError(f"out has shape {tuple(out.shape)}, want {(S * n, *shape[2:])} (context_cache_shape)")
    out = out.view(shape)
    c = None
    for s in range(0, n, chunk):
        ctx, c = model.sequential_contexts(grid[:, s:s + chunk].to(device), initial=c)
        out[:, s:s + chunk] = ctx.to(dtype).cpu()
    return out.reshape(S * n, *out.shape[2:])[:n_tok]


# ----------------------------------------------------------------------------------------------- training
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _losses(C: Tensor, target: Tensor, w: float) -> tuple[Tensor, Tensor, Tensor]:
    """C, target (tokens, Dc), fp32 -> (cvfp, diversity, total)."""
    cvfp = F.mse_loss(C, target)  # on the raw contexts, never on re-normalised copies
    diversity = -(C - C.mean(dim=0)).norm() / C.size(0)
    return cvfp, diversity, (1.0 - w) * cvfp + w * diversity


def train_phase1(model: NewLLM, train_ids: Tensor, cfg: Phase1Config, *, seed: int = 0,
                 val_ids: Tensor | None = None,
                 on_iteration: Callable[[int, dict[str, float]], None] | None = None,
                 device: str | torch.device = "auto", trace: bool = False, check_sequential: bool = True) -> Phase1Result:
    """Train model.context_block (+ the embedding's trainable parameters) in place, on `device` (the
    model is moved there); see the module doc.

    train_ids (N,) is the train token stream (its first cfg.max_tokens, 0 = all). Per iteration
    `on_iteration(k, metrics)` gets: er, er_pct, time_s (the whole iteration, metrics included) and, for
    k >= 1, cvfp_loss, diversity_loss, total_loss, grad_norm (before clipping), convergence_rate,
    step_time_s (forward + backward + optimiser steps only). After training: val ER (one sequential pass
    over val_ids, same stream layout) and `sequential_cosine` (skipped, NaN, with check_sequential=False).
    `seed` seeds the input noise and the ER row subsampling; the weights are the caller's.
    """
    t_start = time.perf_counter()
    device = resolve_device(device)
    model.to(device)
    ids = train_ids[: cfg.max_tokens] if cfg.max_tokens else train_ids
    streams = split_streams(ids.long(), cfg.streams).to(device)
    S, N = streams.shape
    Dc, w, first_context = model.context_dim, cfg.dist_reg_weight, cfg.first_context
    noise_gen = torch.Generator(device=device).manual_seed(seed)
    er_gen = torch.Generator().manual_seed(seed)
    params = [p for m in (model.embedding, model.context_block) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg.lr, fused=device.type in ("cpu", "cuda"))

    def er_of(contexts: Tensor) -> tuple[float, float]:
        er = effective_rank(contexts.reshape(-1, Dc), max_rows=cfg.er_max_rows, generator=er_gen)
        return er, 100.0 * er / Dc

    def noisy(inputs: Tensor) -> Tensor:
        if cfg.noise <= 0:
            return inputs
        return inputs + cfg.noise * torch.randn(inputs.shape, generator=noise_gen, device=device)

    def step(loss: Tensor) -> float:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        opt.step()
        return norm.item()

    # ---- iteration 0: the exact recurrence, no learning
    t0 = time.perf_counter()
    P = sequential_pass(model, streams)[..., -1, :]  # (S, N, Dc)
    first_target = P
    er, er_pct = er_of(P)
    _sync(device)
    history = [{"er": er, "er_pct": er_pct, "time_s": time.perf_counter() - t0}]
    traced = [{"output": P.cpu()}] if trace else None
    if on_iteration:
        on_iteration(0, history[0])

    conv, converged = 0.0, False
    for k in range(1, cfg.iterations):
        t0 = time.perf_counter()
        target = (first_target if cfg.target == "fixed" else P).reshape(-1, Dc)
        for _ in range(cfg.steps_per_iteration):
            if cfg.mode == "parallel":
                inputs = noisy(shift_contexts(P, first_context))
                with autocast(device):
                    C = _parallel_outputs(model, streams, inputs)[-1].float()
            else:  # the research's slow reference: per-token forward, previous context detached
                inputs, C = _sequential_iteration(model, streams, P, first_context, noisy)
            cvfp, div, total = _losses(C, target, w)
            grad_norm = step(total)
        C = C.detach().reshape(S, N, Dc)
        _sync(device)
        step_time = time.perf_counter() - t0
        conv = convergence_rate(C, P, cfg.convergence_threshold)
        if traced is not None:
            traced.append({"input": inputs.detach().reshape(S, N, Dc).cpu(), "output": C.cpu(),
                           "target": target.reshape(S, N, Dc).cpu()})
        P = C  # carried into the next iteration (never reset: bug 2)
        er, er_pct = er_of(P)
        metrics = {"cvfp_loss": cvfp.item(), "diversity_loss": div.item(), "total_loss": total.item(),
                   "grad_norm": grad_norm, "er": er, "er_pct": er_pct, "convergence_rate": conv,
                   "step_time_s": step_time, "time_s": time.perf_counter() - t0}
        history.append(metrics)
        if on_iteration:
            on_iteration(k, metrics)
        # The rate compares iterates one optimiser step apart, so it is met long before the block has
        # trained (iteration 1 even reruns iteration 0's weights: 100 % by construction): early stop only
        # from cfg.min_iterations on, and never before iteration 2 (min_iterations may be 1).
        if k >= max(cfg.min_iterations, 2) and conv >= cfg.min_converged:
            converged = True
            break

    cosine = math.nan
    if check_sequential:  # how far the parallel-trained contexts are from the exact recurrence's
        exact = sequential_pass(model, streams)[..., -1, :]
        cosine = F.cosine_similarity(P, exact, dim=-1).mean().item()
    val_er = val_er_pct = None
    if val_ids is not None:
        val_streams = split_streams(val_ids.long(), max(1, min(cfg.streams, val_ids.numel()))).to(device)
        val_er, val_er_pct = er_of(sequential_pass(model, val_streams)[..., -1, :])
    _sync(device)
    return Phase1Result(
        iterations_run=len(history), converged=converged, history=history, train_er=history[-1]["er"],
        train_er_pct=history[-1]["er_pct"], convergence_rate=conv, sequential_cosine=cosine,
        val_er=val_er, val_er_pct=val_er_pct, wall_time_s=time.perf_counter() - t_start,
        train_tokens=S * N, streams=S, contexts=P.cpu(), trace=traced)


def _sequential_iteration(model: NewLLM, streams: Tensor, prev: Tensor, first: FirstContext,
                          noisy: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """One iteration of the research's sequential reference, with grad: token by token through the block,
    each token's input context the previous token's output of this same pass, detached (so the loss is
    accumulated over the whole pass, then one backward). Returns (inputs, outputs), each (S*N, Dc)."""
    cb = model.context_block
    # unbind: per-token views whose backward is one stack (indexing x[:, t] would zero-fill a whole
    # (S, N, De) gradient per token)
    xs = model.embedding(streams).unbind(1)
    c = prev[:, -1] if first == "wrap" else prev.new_zeros(prev.size(0), prev.size(-1))
    inputs, outputs = [], []
    with autocast(streams.device):
        for x_t in xs:
            c_in = noisy(c.detach())
            c = cb.outputs(c_in, x_t)[-1]
            inputs.append(c_in)
            outputs.append(c)
    Dc = prev.size(-1)
    return torch.stack(inputs, 1).reshape(-1, Dc), torch.stack(outputs, 1).float().reshape(-1, Dc)
