"""DVC stage: New-LLM's parameter count at the current params, and the budget each baseline is held to.

Each baseline stage depends on its own data/budget/<name>.json, so a New-LLM param (context_dim=512)
reruns the parameter-matched Transformer but not the LSTM or CVP, whose budget file does not change.
"""

import json
from pathlib import Path

from newllm.pipeline import run_stage

OUT = Path("data/budget")


def main(params, run) -> None:
    from newllm.config import BASELINES
    from newllm.data.token_cache import load_cache
    from newllm.models import Phase2Model, count_params
    from newllm.models.factory import build_newllm

    cache = load_cache()
    trainable, total = count_params(Phase2Model(build_newllm(params, cache.vocab_size, load_pretrained=False)))
    OUT.mkdir(parents=True, exist_ok=True)
    for name in BASELINES:
        matched = name == "transformer" and params.transformer.match_params
        budget = {"baseline": name, "target_params": total if matched else None}
        (OUT / f"{name}.json").write_text(json.dumps(budget, indent=2) + "\n")
    run.finish({"newllm_params_total": total, "newllm_params_phase2_trainable": trainable,
                "vocab_size": cache.vocab_size})
    print(f"param_budget: New-LLM has {total:,} parameters (vocab {cache.vocab_size})")


if __name__ == "__main__":
    run_stage("param_budget", main, outs=[str(OUT)])
