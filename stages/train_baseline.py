"""DVC stage `baseline@<name>` (or a control such as `end_to_end`): train one registered model that trains
as a language model (registry.py, `trains: lm`) with the generic trainer on the shared token cache.
`train_baseline.py <name> --lr X` is a sweep cell (on params.yaml's seed), `--seed N` a replicate with the
chosen lr."""

import sys

from newllm.data import token_cache
from newllm.pipeline import run_cell

NAME = sys.argv[1] if len(sys.argv) > 1 else ""


def main(params, run, cell) -> None:
    import dataclasses
    import json

    import torch

    from newllm.data.token_cache import load_cache
    from newllm.errors import PipelineError
    from newllm.models import factory
    from newllm.report.figures import lm_curves
    from newllm.training.lm_stage import fit_lm

    cache = load_cache()
    run.log_dataset(cache, params.dataset.source)
    spec = factory.spec(NAME)
    cfg = getattr(params, spec.section)
    cls = factory.model_class(NAME)
    matched = {}
    if spec.role == "baseline":
        target = json.loads(run.declared.dep("data/budget/").read_text())["target_params"]
        if target and hasattr(cls, "matched_config"):  # New-LLM's size: the model says which knobs reach it
            try:
                matched = cls.matched_config(cfg, cache.vocab_size, target)
            except ValueError as e:
                raise PipelineError(f"{e}; set protocol.match_params: false") from None
            cfg = dataclasses.replace(cfg, **matched)
        # re-sized with New-LLM: an ablation of New-LLM's size retrains this baseline at the new size
        run.log_tags({"newllm.matched_to": f"New-LLM's {target:,} params under {run.changed}: "
                      + ", ".join(f"{k}={v}" for k, v in matched.items()) if matched else "unmatched"})
    # a control of New-LLM is New-LLM's network (its top-level params), trained with this section's knobs
    arch = params.newllm_config() if spec.arch == "newllm" else cfg
    torch.manual_seed(cell.seed)
    model = cls.from_config(arch, cache.vocab_size)
    run.log_params({"lr": cell.lr})
    final, history = fit_lm(run, model, cache, cfg, lr=cell.lr, seed=cell.seed, device=params.device,
                            eval_batch_size=params.eval_batch_size)
    if run.main:  # under DDP, rank 0 alone writes
        factory.save_model(run.declared.checkpoint, NAME, model, arch, cache.vocab_size)
    if spec.role == "baseline":
        final["matched"] = bool(matched)  # a baseline without a width search stays unmatched: no ratio
    if matched:
        final.update(**matched, matched_to_params=target)
    run.log_figure(lm_curves(history, spec.record), f"{spec.record}_curves.png")
    run.finish(final)
    print(f"{cell.record}: best val loss {final['val_loss']:.4f} (PPL {final['val_ppl']:.2f}) at epoch "
          f"{final['best_epoch']}, {final['params_total']:,} params")


if __name__ == "__main__":
    from newllm.registry import MODELS

    LM = [name for name, s in MODELS.items() if s.trains == "lm"]
    if NAME not in LM:  # never let a wrong name reach run_stage, which removes that stage's outputs
        sys.exit(f"usage: train_baseline.py {{{','.join(LM)}}} (--lr X | --seed N)")
    run_cell(NAME, sys.argv[2:], main, precheck=lambda params: token_cache.check_sizes(params, MODELS[NAME].section))
