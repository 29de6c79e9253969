"""DVC stage `baseline@<name>`: train one baseline (transformer | lstm | cvp) on the shared token cache."""

import json
import sys
from pathlib import Path

from newllm.pipeline import run_stage

NAME = sys.argv[1] if len(sys.argv) > 1 else ""
CKPT = Path(f"data/checkpoints/{NAME}.pt")


def main(params, run) -> None:
    import torch

    from newllm.data.token_cache import load_cache
    from newllm.errors import PipelineError
    from newllm.models.factory import build_baseline
    from newllm.training.lm_stage import check_sizes, fit_lm

    cache = load_cache()
    cfg = getattr(params, NAME)
    check_sizes(cache, cfg, NAME, params.eval_batch_size)
    budget = json.loads(Path(f"data/budget/{NAME}.json").read_text())
    n_embd = None
    if budget["target_params"]:
        from newllm.models.transformer import match_width

        try:
            n_embd = match_width(budget["target_params"], cache.vocab_size, cfg.n_layer, cfg.n_head, cfg.seq_len)
        except ValueError as e:
            raise PipelineError(f"{e}; set transformer.match_params: false or change its n_layer") from None
    torch.manual_seed(params.seed)
    model = build_baseline(NAME, params, cache.vocab_size, n_embd=n_embd)
    meta = {"baseline": NAME, "vocab_size": cache.vocab_size, "n_embd": n_embd}
    final = fit_lm(run, NAME, model, cache, cfg, seed=params.seed, device=params.device,
                   eval_batch_size=params.eval_batch_size, ckpt_path=CKPT, ckpt_meta=meta)
    if n_embd is not None:
        final.update(n_embd=n_embd, matched_to_params=budget["target_params"])
    run.finish(final)
    print(f"{NAME}: best val loss {final['val_loss']:.4f} (PPL {final['val_ppl']:.2f}) at epoch "
          f"{final['best_epoch']}, {final['params_total']:,} params")


if __name__ == "__main__":
    from newllm.config import BASELINES

    if NAME not in BASELINES:
        sys.exit(f"usage: train_baseline.py {{{','.join(BASELINES)}}}")
    run_stage(NAME, main, outs=[str(CKPT)])
