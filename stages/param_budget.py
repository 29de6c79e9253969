"""DVC stage: New-LLM's parameter count at the current params, and the budget each baseline is held to.

Each baseline stage depends on its own data/budget/<name>.json (New-LLM's total when
protocol.match_params), so a New-LLM size param (context_dim=512) reruns the baselines, while a New-LLM
param that keeps its size (phase1.lr) reruns none of them.
"""

import json
from pathlib import Path

from newllm.pipeline import run_stage

OUT = Path("data/budget")


def main(params, run) -> None:
    from newllm.data.token_cache import load_cache
    from newllm.models.cvfp import NewLLM, Phase2Model
    from newllm.models.factory import count_params

    cache = load_cache()
    trainable, total = count_params(Phase2Model(NewLLM.from_config(params.newllm_config(), cache.vocab_size, load_pretrained=False)))
    OUT.mkdir(parents=True, exist_ok=True)
    for name in params.baselines:
        budget = {"baseline": name, "target_params": total if params.protocol.match_params else None}
        (OUT / f"{name}.json").write_text(json.dumps(budget, indent=2) + "\n")
    run.finish({"newllm_params_total": total, "newllm_params_phase2_trainable": trainable,
                "vocab_size": cache.vocab_size})
    print(f"param_budget: New-LLM has {total:,} parameters (vocab {cache.vocab_size})")


if __name__ == "__main__":
    run_stage("param_budget", main)
