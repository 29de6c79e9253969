"""DVC stage: New-LLM's parameter count at the current params, and the budget each baseline is held to.

Each baseline stage depends on its own data/budget/<name>.json, so a New-LLM param (context_dim=512)
reruns the parameter-matched Transformer but not the LSTM or CVP, whose budget file does not change.
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
    trainable, total = count_params(Phase2Model(NewLLM.from_config(params, cache.vocab_size, load_pretrained=False)))
    OUT.mkdir(parents=True, exist_ok=True)
    for name in params.baselines:
        # a baseline with a `match_params` knob is sized to New-LLM (dvc.yaml lists each such knob)
        matched = getattr(getattr(params, name), "match_params", False)
        budget = {"baseline": name, "target_params": total if matched else None}
        (OUT / f"{name}.json").write_text(json.dumps(budget, indent=2) + "\n")
    run.finish({"newllm_params_total": total, "newllm_params_phase2_trainable": trainable,
                "vocab_size": cache.vocab_size})
    print(f"param_budget: New-LLM has {total:,} parameters (vocab {cache.vocab_size})")


if __name__ == "__main__":
    run_stage("param_budget", main)
