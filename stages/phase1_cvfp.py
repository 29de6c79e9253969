"""DVC stage: Phase 1 of CVFP, fixed-point training of the ContextBlock (docs/research.md §3).

`phase1_cvfp.py` trains the ContextBlock of params.yaml's `seed`; `--seed N` that of a replicate seed.
"""

import sys
from pathlib import Path

from newllm.pipeline import run_stage

SEED = int(sys.argv[2]) if len(sys.argv) == 3 and sys.argv[1] == "--seed" and sys.argv[2].isdigit() else None


def seed_of(params) -> int:
    return params.seed if SEED is None else SEED


def scratch(params) -> Path:
    """Where Phase 1's iterate goes when it is too large for RAM (git- and DVC-ignored, removed at the end);
    one folder per process under torchrun (each holds its shard of the positions)."""
    from newllm import distributed

    return Path("data/tmp") / f"phase1_seed{seed_of(params)}" / f"rank{distributed.rank()}"


def precheck(params) -> None:
    """Before any MLflow run: the stream count against the cached train tokens."""
    from newllm.data.token_cache import load_cache
    from newllm.errors import PipelineError

    cache = load_cache()
    n_train = min(len(cache.train), params.phase1.max_tokens or len(cache.train))
    if n_train // params.phase1.streams < 2:
        raise PipelineError(f"params.yaml: phase1.streams ({params.phase1.streams}) is too large for the "
                            f"{n_train:,} Phase 1 tokens (needs >= 2 tokens a stream)")
    nproc, s = params.distributed.nproc, params.phase1.streams
    for split, n in (("train", n_train), ("val", len(cache.val))):  # each process holds a block of positions
        if n // min(s, n) < nproc:
            raise PipelineError(f"params.yaml: distributed.nproc ({nproc}) is larger than the {n // min(s, n):,} "
                                f"positions a Phase 1 stream has in {split} ({n:,} tokens in {s} streams)")


def main(params, run) -> None:
    import contextlib
    import shutil

    import torch

    from newllm.data.token_cache import load_cache
    from newllm.models.cvfp import NewLLM
    from newllm.models.factory import context_hparams, count_params
    from newllm.report.figures import phase1_curves
    from newllm.training import checkpoint, resume
    from newllm.training.phase1 import train_phase1

    cache = load_cache()
    run.log_dataset(cache, params.dataset.source)
    seed = seed_of(params)
    torch.manual_seed(seed)
    model = NewLLM.from_config(params.newllm_config(), cache.vocab_size)

    def on_iteration(k: int, metrics: dict) -> None:
        run.log_step(metrics, step=k)
        losses = "" if k == 0 else (f"total {metrics['total_loss']:.4f}, cvfp {metrics['cvfp_loss']:.3g}, "
                                    f"converged {metrics['convergence_rate']:.1%}, ")
        print(f"phase1 iteration {k}/{params.phase1.iterations - 1}: {losses}ER {metrics['er_pct']:.1f}%, "
              f"{metrics['time_s']:.1f} s", flush=True)

    train = torch.from_numpy(cache.train.astype("int64"))
    val = torch.from_numpy(cache.val.astype("int64"))
    try:
        result = train_phase1(model, train, params.phase1, seed=seed, val_ids=val, on_iteration=on_iteration,
                              device=params.device, resume=run.resumed, on_checkpoint=run.save_resume,
                              checkpoint_every_s=resume.EVERY_S, scratch=scratch(params))
    finally:  # a kill -9 leaves it; the next run overwrites it
        shutil.rmtree(scratch(params), ignore_errors=True)  # this rank's; the last one out removes the folder
        with contextlib.suppress(OSError):
            scratch(params).parent.rmdir()
    history = [{"iteration": k, **m} for k, m in enumerate(result.history)]  # a resume's included
    frozen = {k: v for k, v in model.state_dict().items() if k.startswith(("embedding.", "context_block."))}
    if run.main:  # under torchrun every rank holds the same weights; rank 0 writes them
        checkpoint.save(run.declared.checkpoint, frozen, context_hparams(params, cache.vocab_size))
    run.log_figure(phase1_curves(history), "phase1_curves.png")
    final = {
        "iterations_run": result.iterations_run, "converged": int(result.converged),
        "train_er": round(result.train_er, 3), "train_er_pct": round(result.train_er_pct, 3),
        "val_er": round(result.val_er, 3) if result.val_er is not None else None,
        "val_er_pct": round(result.val_er_pct, 3) if result.val_er_pct is not None else None,
        "convergence_rate": round(result.convergence_rate, 6),
        "sequential_cosine": round(result.sequential_cosine, 6),
        "train_tokens": result.train_tokens, "streams": result.streams,
        "wall_time_s": round(result.wall_time_s, 3),
        "params_context_block": count_params(model.context_block)[1], "seed": seed,
        **({"peak_gpu_bytes": torch.cuda.max_memory_allocated()} if torch.cuda.is_initialized() else {}),
    }
    run.finish(final)
    print(f"phase1 seed {seed}: {result.iterations_run} iterations, train ER {result.train_er_pct:.1f}% "
          f"(val {final['val_er_pct']}%), converged {result.convergence_rate:.1%}, "
          f"cos vs sequential {result.sequential_cosine:.4f}, {result.wall_time_s:.1f}s")


if __name__ == "__main__":
    from newllm.protocol import phase1_record

    if len(sys.argv) > 1 and SEED is None:
        sys.exit("usage: phase1_cvfp.py [--seed N]")
    run_stage(lambda params: phase1_record(seed_of(params)), main, precheck, data_parallel=True)
