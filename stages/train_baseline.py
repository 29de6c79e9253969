"""DVC stage `baseline@<name>`: train one registered baseline (registry.py) on the shared token cache."""

import sys

from newllm.pipeline import run_stage

NAME = sys.argv[1] if len(sys.argv) > 1 else ""


def main(params, run) -> None:
    import dataclasses
    import json
    from pathlib import Path

    import torch

    from newllm.data.token_cache import load_cache
    from newllm.errors import PipelineError
    from newllm.models import factory
    from newllm.report.figures import lm_curves
    from newllm.training.lm_stage import check_sizes, fit_lm

    cache = load_cache()
    spec = factory.spec(NAME)
    cfg = getattr(params, spec.section)
    check_sizes(cache, cfg, spec.section, params.eval_batch_size)
    cls = factory.model_class(NAME)
    target = json.loads(Path(f"data/budget/{NAME}.json").read_text())["target_params"]
    matched = {}
    if target and hasattr(cls, "matched_config"):  # New-LLM's size: the model says which knobs get it there
        try:
            matched = cls.matched_config(cfg, cache.vocab_size, target)
        except ValueError as e:
            raise PipelineError(f"{NAME}: {e}; set protocol.match_params: false") from None
        cfg = dataclasses.replace(cfg, **matched)
    torch.manual_seed(params.seed)
    model = cls.from_config(cfg, cache.vocab_size)
    final, history = fit_lm(run, model, cache, cfg, seed=params.seed, device=params.device,
                            eval_batch_size=params.eval_batch_size)
    factory.save_model(factory.checkpoint_path(NAME), NAME, model, cfg, cache.vocab_size)
    final["matched"] = bool(matched)  # a baseline without a width search stays unmatched: no ratio
    if matched:
        final.update(**matched, matched_to_params=target)
    run.log_figure(lm_curves(history, NAME), f"{NAME}_curves.png")
    run.finish(final)
    print(f"{NAME}: best val loss {final['val_loss']:.4f} (PPL {final['val_ppl']:.2f}) at epoch "
          f"{final['best_epoch']}, {final['params_total']:,} params")


if __name__ == "__main__":
    from newllm.registry import BASELINES

    if NAME not in BASELINES:  # never let a wrong name reach run_stage, which removes that stage's outputs
        sys.exit(f"usage: train_baseline.py {{{','.join(BASELINES)}}}")
    run_stage(NAME, main)
