"""DVC stage: Phase 2 of CVFP, next-token training of the TokenBlock on the frozen, cached contexts.

`phase2_train.py newllm_phase1_off` is the Phase 1 control: the same Phase 2 on the embedding and
ContextBlock left at their initialisation (the weights Phase 1 starts from, for the same seed).
Then `--lr X` (a sweep cell, on params.yaml's seed) or `--seed N` (a replicate, with the chosen lr).
"""

import os
import sys
import time
from pathlib import Path

from newllm.data import token_cache
from newllm.pipeline import run_cell

NAME = sys.argv[1] if len(sys.argv) > 1 else ""
CELL = sys.argv[2:]
# caches too large for RAM, removed at the end; one per DDP rank (RANK: torchrun's)
TMP = Path("data/tmp") / "_".join([NAME, *CELL, "contexts", f"rank{os.environ.get('RANK', '0')}"])


def main(params, run, cell) -> None:
    import torch

    from newllm.config import stages
    from newllm.data.token_cache import load_cache
    from newllm.models import factory
    from newllm.models.cvfp import NewLLM, Phase2Model
    from newllm.protocol import phase1_record
    from newllm.report.figures import lm_curves
    from newllm.training import checkpoint
    from newllm.training.checkpoint import CheckpointError
    from newllm.training.context_cache import build_caches
    from newllm.training.lm_stage import fit_lm
    from newllm.training.trainer import resolve_device

    cache = load_cache()
    run.log_dataset(cache, params.dataset.source)
    with_phase1 = factory.spec(NAME).trains == "cvfp"
    if with_phase1:
        phase1 = stages(params)[phase1_record(cell.seed)].checkpoint  # the ContextBlock of this seed
        frozen, _ = checkpoint.load(phase1, expect=factory.context_hparams(params, cache.vocab_size))  # before compute
    torch.manual_seed(cell.seed)
    # with Phase 1 its checkpoint holds the embedding; without, GPT-2's matrix (if chosen) is read here
    llm = NewLLM.from_config(params.newllm_config(), cache.vocab_size, load_pretrained=not with_phase1)
    if with_phase1:
        missing, unexpected = llm.load_state_dict(frozen, strict=False)
        if unexpected or any(k.startswith(("embedding.", "context_block.")) for k in missing):
            raise CheckpointError(f"{phase1} does not hold a ContextBlock for these params "
                                  f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    device = resolve_device(params.device)
    llm.to(device)
    model = Phase2Model(llm)  # freezes embedding + ContextBlock

    # The ContextBlock is frozen, so every position's contexts are computed once (exact recurrence)
    t0 = time.perf_counter()
    extras = build_caches(llm, cache, params.phase2.streams, params.phase2.max_tokens, params.eval_batch_size,
                          TMP, device)
    cache_s = time.perf_counter() - t0
    run.log_params({"lr": cell.lr})
    final, history = fit_lm(run, model, cache, params.phase2, lr=cell.lr, seed=cell.seed, device=params.device,
                            eval_batch_size=params.eval_batch_size, extras=extras)
    if run.main:  # under DDP, rank 0 alone writes
        factory.save_model(run.declared.checkpoint, NAME, llm, params.newllm_config(),
                           cache.vocab_size)
    record = factory.spec(NAME).record
    run.log_figure(lm_curves(history, record), f"{record}_curves.png")
    final["context_cache_s"] = round(cache_s, 3)
    run.finish(final)
    print(f"{cell.record}: best val loss {final['val_loss']:.4f} (PPL {final['val_ppl']:.2f}, acc "
          f"{final['val_accuracy']:.2%}) at epoch {final['best_epoch']}; {final['params_trainable']:,} trainable "
          f"of {final['params_total']:,} params")


if __name__ == "__main__":
    import shutil

    try:
        from newllm.registry import MODELS

        if MODELS.get(NAME) is None or MODELS[NAME].trains not in ("cvfp", "phase2"):
            sys.exit("usage: phase2_train.py {newllm,newllm_phase1_off} (--lr X | --seed N)")
        run_cell(NAME, CELL, main, precheck=lambda params: token_cache.check_sizes(params, "phase2"))
    finally:
        shutil.rmtree(TMP, ignore_errors=True)
