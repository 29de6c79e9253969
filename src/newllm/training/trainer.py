"""The one generic language-model trainer: every model (New-LLM's Phase 2, the Transformer, the LSTM, the
CVP model) is trained and evaluated by the code in this file, so their numbers are comparable by
construction.

Data layout is the classic word-language-model one: the token stream is cut into B contiguous streams
(`batchify`), and each step reads a window of `seq_len` positions from all B streams at once. A model is
called as

    logits, state = model(x, state, **extras)

where `x` is (B, T) token ids, `extras` are optional per-position tensors aligned with `x` (New-LLM's
cached context vectors, say), and `state` is whatever the model carries from one window to the next:
None for a stateless model (the Transformer), (h, c) for the LSTM, the context vector for CVP. The state
is detached between windows (truncated BPTT) and reset to None at the start of every epoch and of every
evaluation, so no evaluation sees the training stream's last state.

This module knows nothing of MLflow or files: the stage logs what `train_lm` returns.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from newllm import distributed
from newllm.errors import Diverged
from newllm.registry import TrainConfig
from newllm.training.batches import (
    batchify,
    batchify_extras,
    detach_state,
    map_state,
    sliding_windows,
    windows,
)

COSINE_MIN_LR = 1e-6  # the research's cosine annealing used eta_min 1e-6
PROGRESS_EVERY_S = 60.0  # within a long epoch: a progress line (no terminal) and a live point this often


# ----------------------------------------------------------------------------------------------- device
def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA device (use auto or cpu)")
    return device


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no loss scaling needed, unlike fp16); plain fp32 on CPU, where bf16 matmuls
    are slow on most processors and would make CPU results differ from the reference numbers."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return nullcontext()


def _model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


# ----------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: nn.Module, ids: Tensor, seq_len: int | TrainConfig, batch_size: int,
             extras: Mapping[str, Tensor] | None = None,
             device: str | torch.device | None = None) -> dict[str, float]:
    """The one evaluation every model goes through.

    Returns loss (mean cross-entropy per predicted token, summed over every window and divided by the
    number of predictions, so a short last window weighs by its size), ppl = exp(loss), top-1 accuracy,
    and tokens (the number of predictions). `ids` is batchified like the training stream: the tail that
    does not fill the last row is dropped and each stream's first token is not predicted. The model's
    state starts empty and is carried across windows, as in training. A model that sees only its window
    (`windowed = True`: the Transformer) is fed overlapping windows instead (`sliding_windows`): the same
    tokens are scored, each with up to seq_len - 1 tokens of context, the counterpart of carried state.
    `device` None = where the model is; otherwise the model is moved there (and stays).
    """
    if isinstance(seq_len, TrainConfig):
        seq_len = seq_len.seq_len
    if device is None:
        device = _model_device(model)
    else:
        device = resolve_device(device)
        model.to(device)
    was_training = model.training
    model.eval()
    # under DDP each rank scores its block of rows and the sums are added (distributed.py)
    data = distributed.shard_rows(batchify(ids, batch_size)).to(device)
    ex = {k: distributed.shard_rows(v) for k, v in batchify_extras(extras, batch_size).items()}
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    total_correct = torch.zeros((), dtype=torch.long, device=device)
    total = 0
    state = None
    spans = (sliding_windows(data.size(1), seq_len) if getattr(model, "windowed", False)
             else ((i, t, t) for i, t in windows(data.size(1), seq_len)))
    for i, t, scored in spans:
        x, y = data[:, i:i + t], data[:, i + 1 + t - scored:i + 1 + t]
        with autocast(device):
            logits, state = model(x, state, **{k: v[:, i:i + t].to(device) for k, v in ex.items()})
        logits = logits[:, t - scored:].float()  # the loss in fp32 whatever the autocast dtype
        total_loss += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1), reduction="sum")
        total_correct += (logits.argmax(-1) == y).sum()
        total += y.numel()
    model.train(was_training)
    if distributed.world_size() > 1:
        sums = distributed.all_sum(torch.stack([total_loss, total_correct.double(),
                                                torch.tensor(float(total), dtype=torch.float64, device=device)]))
        total_loss, total_correct, total = sums[0], sums[1], int(sums[2].item())
    loss = total_loss.item() / total
    return {"loss": loss, "ppl": math.exp(min(loss, 700.0)), "accuracy": int(total_correct.item()) / total,
            "tokens": total}


# ----------------------------------------------------------------------------------------------- training
@dataclass
class TrainResult:
    best_epoch: int  # 1-based; the epoch whose weights the model holds after train_lm (0: the initial ones)
    best_val_loss: float
    best_val_ppl: float
    best_val_accuracy: float
    initial_val_loss: float  # of the weights before the first step
    history: list[dict[str, float]]  # one dict per epoch (see train_lm)
    epochs_run: int
    stopped_early: bool
    wall_time_s: float  # the whole call, evaluation included
    train_tokens: int  # predicted positions trained on, over all epochs
    steps: int  # optimiser steps, over all epochs
    tokens_per_s: float  # train_tokens / time spent in training steps (evaluation excluded)
    device: str
    best_state: dict[str, Tensor] = field(repr=False, default_factory=dict)  # on CPU


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: float) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":  # plain SGD, no momentum: the word_language_model recipe
        return torch.optim.SGD(params, lr=lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r} (adam, adamw, sgd)")


def cosine_lr(cfg: TrainConfig, lr: float, epoch: int) -> float:
    """lr of 0-based `epoch` under per-epoch cosine annealing from `lr` to COSINE_MIN_LR (as the
    research's CosineAnnealingLR(T_max=epochs) stepped once per epoch)."""
    lo = min(COSINE_MIN_LR, lr)
    return lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * epoch / cfg.epochs))


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def check_finite(loss: float, where: str, last_finite: float) -> None:
    """Divergence is a failure, not a result: a NaN/inf loss stops training at once (Diverged)."""
    if not math.isfinite(loss):
        last = f"last finite loss {last_finite:.4f}" if math.isfinite(last_finite) else "no finite loss before"
        raise Diverged(f"loss became {loss} at {where} ({last}); lower the lr or set grad_clip")


def rng_state(device: torch.device) -> dict[str, Tensor]:
    return {"cpu": torch.get_rng_state(), **({"cuda": torch.cuda.get_rng_state(device)}
                                             if device.type == "cuda" else {})}


def set_rng_state(state: dict[str, Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def train_lm(model: nn.Module, train_ids: Tensor, val_ids: Tensor, cfg: TrainConfig, *, lr: float,
             extras_train: Mapping[str, Tensor] | None = None,
             extras_val: Mapping[str, Tensor] | None = None,
             device: str | torch.device = "auto", seed: int = 0, eval_batch_size: int | None = None,
             on_epoch: Callable[[int, dict[str, float]], None] | None = None,
             progress: bool = True, resume: dict[str, Any] | None = None,
             on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
             checkpoint_every_s: float = 60.0,
             on_progress: Callable[[dict[str, float], int], None] | None = None) -> TrainResult:
    """Train `model` on next-token prediction and keep the epoch with the best validation loss.

    Per epoch: one pass over the (prefix of the) train stream in windows of cfg.seq_len, then `evaluate`
    on val_ids. The history records train_loss (token-weighted over the epoch, dropout on), val_loss,
    val_ppl, val_accuracy, tokens_per_s (training steps only), lr (the epoch's), epoch_time_s (training
    + evaluation). `on_epoch(epoch, metrics)` is called after each epoch (1-based) for logging.

    The initial weights are evaluated first (epoch 0); an epoch "improves" when val_loss < best - cfg.min_delta,
    so a model that never beats its initial weights ends with best_epoch 0 and those weights. Without
    improvement the plateau scheduler multiplies lr by cfg.plateau_factor (at once, like the word_language_model
    example's `lr /= 4`), and early stopping ends training after cfg.patience such epochs in a row (0 = never).
    The best epoch's weights are kept in memory and loaded back into `model` at the end. A non-finite train
    or val loss raises Diverged in the step it appears.

    Resume: `on_checkpoint(state)` gets the whole loop state at every epoch end and mid-epoch once
    `checkpoint_every_s` passed since the last; `resume=state` continues from it, to the very numbers of an
    uninterrupted run on CPU (weights, optimiser, RNG, carried model state, early-stopping state).

    `progress`: one line per epoch, plus a tqdm bar over the epoch's steps (loss, tok/s, ETA) when stderr is
    a terminal; without one (`dvc repro > log`), a line every PROGRESS_EVERY_S within a long epoch instead
    of the bar's frames. `on_progress(metrics, step)` gets the running train loss and tok/s at that same
    pace (step = optimiser steps so far): live curves of a long run. Seeded with `seed` (dropout, any sampling); the model's initial
    weights are the caller's (seed before building it). On CPU two calls with equal inputs give identical
    histories.
    """
    device = resolve_device(device)
    torch.manual_seed(seed)  # also seeds every CUDA device
    model.to(device)

    if cfg.max_tokens:
        train_ids = train_ids[: cfg.max_tokens]
        extras_train = {k: v[: cfg.max_tokens] for k, v in (extras_train or {}).items()}
    # under DDP (distributed.py) each rank trains on its block of the batch's streams
    train = distributed.shard_rows(batchify(train_ids, cfg.batch_size)).to(device)
    ex_train = {k: distributed.shard_rows(v)  # stays on the host: it can be large
                for k, v in batchify_extras(extras_train, cfg.batch_size).items()}
    world, net = distributed.world_size(), distributed.wrap(model)
    progress = progress and distributed.is_main()
    if world > 1:  # a mid-epoch state is each rank's own carried state: resume from epoch ends only
        checkpoint_every_s = math.inf
    eval_bs = eval_batch_size or cfg.batch_size
    spans = list(windows(train.size(1), cfg.seq_len))

    opt = make_optimizer(model, cfg, lr)
    t_start = time.perf_counter()
    if resume is None:
        initial = evaluate(model, val_ids, cfg.seq_len, eval_bs, extras=extras_val, device=device)
        loop = {"epoch": 0, "step": 0, "lr": lr, "initial_val_loss": initial["loss"], "best_loss": initial["loss"],
                "best_epoch": 0, "best_metrics": initial, "bad_epochs": 0, "history": [], "train_tokens": 0,
                "train_time": 0.0, "steps": 0, "carry": None, "sum_loss": 0.0, "n_tok": 0,
                "best_state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}
    else:
        loop = {k: v for k, v in resume.items() if k not in ("model", "optimizer", "rng")}
        model.load_state_dict(resume["model"])
        opt.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"], device)
    lr0, history, stopped_early = lr, loop["history"], False
    last_save, last_loss = time.monotonic(), math.nan

    def save(epoch: int, step: int, state: Any, sum_loss: Tensor, n_tok: int) -> None:
        nonlocal last_save
        if on_checkpoint is None:
            return
        on_checkpoint({**loop, "epoch": epoch, "step": step, "carry": state, "sum_loss": sum_loss.item(),
                       "n_tok": n_tok, "model": model.state_dict(), "optimizer": opt.state_dict(),
                       "rng": rng_state(device)})
        last_save = time.monotonic()

    for epoch in range(loop["epoch"], cfg.epochs):
        first = loop["step"] if epoch == loop["epoch"] else 0  # mid-epoch resume: skip the steps done
        lr = cosine_lr(cfg, lr0, epoch) if cfg.scheduler == "cosine" else loop["lr"]
        _set_lr(opt, lr)
        t0 = time.perf_counter()
        model.train()
        # every epoch starts from an empty state (a mid-epoch resume from the saved one)
        state = map_state(loop["carry"], lambda t: t.to(device).detach()) if first else None
        sum_loss = torch.tensor(loop["sum_loss"] if first else 0.0, dtype=torch.float64, device=device)
        n_tok = loop["n_tok"] if first else 0
        n_tok0 = n_tok  # tokens before a mid-epoch resume: not in this process's rate
        tty = progress and sys.stderr.isatty()
        bar = tqdm(spans[first:], desc=f"epoch {epoch + 1}/{cfg.epochs}", initial=first, total=len(spans),
                   disable=not tty, leave=False, dynamic_ncols=True, unit="step")
        last_line = time.monotonic()
        for step, (i, t) in enumerate(bar, start=first):
            x, y = train[:, i:i + t], train[:, i + 1:i + 1 + t]
            with autocast(device):
                logits, state = net(x, state, **{k: v[:, i:i + t].to(device, non_blocking=True)
                                                for k, v in ex_train.items()})
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1))
            # every step: a NaN must stop this step, not poison the run (on every rank at once: the mean)
            value = loss.item() if world == 1 else distributed.all_sum(loss.detach().clone()).item() / world
            check_finite(value, f"epoch {epoch + 1} step {step + 1}", last_loss)
            last_loss = value
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            loop["steps"] += 1
            state = detach_state(state)
            sum_loss += loss.detach() * y.numel()
            n_tok += y.numel()
            if tty and step % 50 == 0:
                bar.set_postfix(loss=f"{value:.3f}", lr=f"{lr:.3g}",
                                tok_s=f"{(n_tok - n_tok0) / (time.perf_counter() - t0):,.0f}")
            if time.monotonic() - last_line >= PROGRESS_EVERY_S and (on_progress or (progress and not tty)):
                last_line = time.monotonic()
                rate, done = (n_tok - n_tok0) / (time.perf_counter() - t0), step + 1
                if progress and not tty:
                    eta = (len(spans) - done) * (time.perf_counter() - t0) / max(done - first, 1)
                    print(f"epoch {epoch + 1}/{cfg.epochs}: step {done:,}/{len(spans):,} ({done / len(spans):.0%}), "
                          f"loss {sum_loss.item() / max(n_tok, 1):.4f}, {rate:,.0f} tok/s, epoch ETA {eta / 60:.1f} min",
                          flush=True)
                if on_progress is not None:
                    on_progress({"train_loss": sum_loss.item() / max(n_tok, 1), "tokens_per_s": rate}, loop["steps"])
            if step + 1 < len(spans) and time.monotonic() - last_save >= checkpoint_every_s:
                loop["lr"] = lr
                save(epoch, step + 1, state, sum_loss, n_tok)
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize()
        t_train = time.perf_counter() - t0
        if world > 1:  # every rank's tokens: the epoch's loss and rate are the whole batch's
            sum_loss, n_tok = distributed.all_sum(sum_loss), n_tok * world
        loop["train_time"] += t_train
        loop["train_tokens"] += n_tok

        val = evaluate(model, val_ids, cfg.seq_len, eval_bs, extras=extras_val, device=device)
        check_finite(val["loss"], f"epoch {epoch + 1}'s validation", last_loss)
        metrics = {"train_loss": sum_loss.item() / n_tok, "val_loss": val["loss"], "val_ppl": val["ppl"],
                   "val_accuracy": val["accuracy"], "tokens_per_s": n_tok / max(t_train, 1e-9), "lr": lr,
                   "epoch_time_s": time.perf_counter() - t0}
        history.append(metrics)

        if val["loss"] < loop["best_loss"] - cfg.min_delta:
            loop.update(best_loss=val["loss"], best_epoch=epoch + 1, best_metrics=val, bad_epochs=0,
                        best_state={k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()})
        else:
            loop["bad_epochs"] += 1
            if cfg.scheduler == "plateau":
                lr *= cfg.plateau_factor
        loop["lr"] = lr
        if on_epoch is not None:
            on_epoch(epoch + 1, dict(metrics))
        if progress:
            tqdm.write(f"epoch {epoch + 1}: train {metrics['train_loss']:.4f}  val {val['loss']:.4f}  "
                       f"ppl {val['ppl']:.2f}  acc {val['accuracy']:.4f}  lr {metrics['lr']:.3g}  "
                       f"{metrics['tokens_per_s']:.0f} tok/s  {metrics['epoch_time_s']:.1f}s")
        if cfg.patience and loop["bad_epochs"] >= cfg.patience:
            stopped_early = epoch + 1 < cfg.epochs
            break
        save(epoch + 1, 0, None, sum_loss.zero_(), 0)

    best_state, best_metrics = loop["best_state"], loop["best_metrics"]
    model.load_state_dict(best_state)
    return TrainResult(
        best_epoch=loop["best_epoch"], best_val_loss=loop["best_loss"], best_val_ppl=best_metrics["ppl"],
        best_val_accuracy=best_metrics["accuracy"], initial_val_loss=loop["initial_val_loss"],
        history=history, epochs_run=len(history), stopped_early=stopped_early,
        wall_time_s=time.perf_counter() - t_start, train_tokens=loop["train_tokens"], steps=loop["steps"],
        tokens_per_s=loop["train_tokens"] / max(loop["train_time"], 1e-9), device=str(device),
        best_state=best_state)
