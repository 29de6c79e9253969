"""What every next-token stage (Phase 2 and each baseline) does around the generic trainer: log each
epoch, evaluate the best weights on val and test, and return the final metrics and the per-epoch history
(the stage saves the checkpoint and draws the curves)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from newllm.data.token_cache import TokenCache
from newllm.models.factory import count_params
from newllm.registry import TrainConfig
from newllm.training import resume
from newllm.training.trainer import evaluate, train_lm


def fit_lm(run: Any, model: nn.Module, cache: TokenCache, cfg: TrainConfig, *, lr: float, seed: int,
           device: str, eval_batch_size: int, extras: dict[str, dict[str, torch.Tensor]] | None = None
           ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train `model` with the one generic trainer (it ends holding its best epoch's weights); each epoch's
    metrics go to `run.log_step`. Returns (final metrics, per-epoch history)."""
    extras = extras or {}

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        run.log_step(metrics, step=epoch)

    ids = {s: torch.from_numpy(getattr(cache, s).astype("int64")) for s in ("train", "val", "test")}
    result = train_lm(model, ids["train"], ids["val"], cfg, lr=lr, extras_train=extras.get("train"),
                      extras_val=extras.get("val"), device=device, seed=seed, on_epoch=on_epoch,
                      eval_batch_size=eval_batch_size, resume=run.resumed, on_checkpoint=run.save_resume,
                      checkpoint_every_s=resume.EVERY_S, on_progress=run.log_live)
    history = [{"epoch": e, **m} for e, m in enumerate(result.history, start=1)]  # a resume's included
    # The best weights, through the one evaluation, on the val tokens every model predicts.
    val = evaluate(model, ids["val"], cfg.seq_len, eval_batch_size, extras=extras.get("val"))
    trainable, total = count_params(model)
    final: dict[str, Any] = {
        "best_epoch": result.best_epoch, "epochs_run": result.epochs_run, "optimizer_steps": result.steps,
        # still improving when training ended (the epoch cap bound, or early stopping is off)
        "undertrained": result.best_epoch == result.epochs_run,
        # no epoch beat the initial weights: these are the numbers of an untrained model
        "never_improved": result.best_epoch == 0, "initial_val_loss": round(result.initial_val_loss, 6),
        "val_loss": round(val["loss"], 6), "val_ppl": round(val["ppl"], 4),
        "val_accuracy": round(val["accuracy"], 6), "val_tokens": val["tokens"], "train_tokens": result.train_tokens,
        "tokens_per_s": round(result.tokens_per_s, 1), "train_wall_time_s": round(result.wall_time_s, 3),
        "params_trainable": trainable, "params_total": total, "lr": lr, "seed": seed,
        "device": result.device,
        # on CUDA: the peak of torch's allocator over the process (a speed figure: goes to reports/timing)
        **({"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if result.device.startswith("cuda") else {}),
    }
    if ids["test"].numel():
        test = evaluate(model, ids["test"], cfg.seq_len, eval_batch_size, extras=extras.get("test"))
        final.update(test_loss=round(test["loss"], 6), test_ppl=round(test["ppl"], 4),
                     test_accuracy=round(test["accuracy"], 6), test_tokens=test["tokens"])
    return final, history
