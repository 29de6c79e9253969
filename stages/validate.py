"""DVC stage `validate`: the whole of params.yaml is checked whenever it changes (params.yaml is its dep),
even when no other stage would rerun, and in a fresh clone (its marker is not committed). An unknown key
anywhere, an unregistered model in `baselines`, a dataset file or folder that is not there, an empty list,
`device: cuda` where torch sees no GPU: one line naming the key, before any stage computes or opens an
MLflow run. Its output never changes, so it reruns nothing downstream."""

import sys

from newllm import progress
from newllm.config import stages
from newllm.errors import PipelineError
from newllm.pipeline import check_device, load_params_or_exit

OUT = progress.PARAMS_OK

if __name__ == "__main__":
    OUT.unlink(missing_ok=True)  # only a run that passes leaves it
    params = load_params_or_exit()
    tick = progress.begin(stages(params), "validate")  # `[stage 1/M]`: a repro whose params changed starts here
    try:
        check_device(params)  # `device: cuda` on a machine without one
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("params.yaml is valid\n")  # the same bytes every time: downstream stays cached
    if tick is not None:
        tick.finish()
