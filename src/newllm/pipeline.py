"""The harness every `stages/*.py` entry runs in.

Order matters: params are validated first (before torch or MLflow are imported, so a typo costs a
second), then the tracking store is checked, then the stage body computes. On any failure the stage's
declared outputs are removed, so DVC can never cache half a result, and the MLflow run ends FAILED
(or KILLED on Ctrl-C / SIGTERM), never RUNNING.
"""

from __future__ import annotations

import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from newllm.config import ConfigError, Params, load_params, stages
from newllm.errors import PipelineError


def _remove(paths: list[str]) -> None:
    for p in map(Path, paths):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def load_params_or_exit(path: str = "params.yaml") -> Params:
    try:
        return load_params(path)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def check_device(params: Params) -> None:
    """`device: cuda` needs a GPU that torch can see: refused in one line before a stage computes or opens an
    MLflow run (validate says it first). torch is imported only then: on cpu/auto the check costs nothing."""
    if params.device != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        why = "this torch is a CPU build" if torch.version.cuda is None else "no CUDA device is visible"
        raise PipelineError(f"params.yaml: device is cuda, but torch sees no CUDA device here ({why}); set device: "
                            "auto (CUDA when present, else CPU) or cpu")


def make_deterministic() -> None:
    """Same params and seed -> same metrics on CPU: without this, the parallel scatter-add of embedding
    gradients sums in thread order and Phase 1's weights differ in their last bits from run to run."""
    import torch

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # what deterministic cuBLAS needs
    # = torch.use_deterministic_algorithms(True, warn_only=True) (a CUDA op without a deterministic kernel
    # warns) without its import of torch._inductor's config: 1.7 s per stage, for torch.compile, never used
    set_mode = getattr(torch._C, "_set_deterministic_algorithms", None)
    if set_mode is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        set_mode(True, warn_only=True)


def _warm_eligible(relaunches: bool) -> bool:
    """This process is `python <script> ...` (a stage as DVC runs it) and will not re-execute itself under
    torchrun, nor is a torchrun rank: then a warm process can run the script instead (warm.py)."""
    script = getattr(sys.modules.get("__main__"), "__file__", None)
    return (not relaunches and "LOCAL_RANK" not in os.environ and script is not None and bool(sys.argv[0])
            and os.path.realpath(script) == os.path.realpath(sys.argv[0]))


def run_stage(stage: str | Callable[[Params], str], body: Callable[[Params, Any], None],
              precheck: Callable[[Params], None] | None = None, data_parallel: bool = False) -> None:
    """Validate params, open the stage's MLflow run, run `body(params, run)`, clean up on failure.

    `data_parallel`: with `distributed.nproc` > 1 the stage re-executes itself under torchrun (once the
    params are known good); rank 0 then opens the MLflow run and writes, the other ranks get a run that
    logs and writes nothing (`run.main` False) and print nothing but errors.

    `stage` is the stage's record (its metrics file under reports/metrics/, dag.py): "tokenize",
    "sweep/lstm/lr0.001", or a function of the params giving it (a cell named by its command line, which
    may read the chosen lr). Its outputs are the ones dvc.yaml declares (`run.declared`). `precheck(params)`
    checks the params against the stage's input files (sizes) before any MLflow run opens."""
    params = load_params_or_exit()
    if _warm_eligible(data_parallel and params.distributed.nproc > 1):
        from newllm import progress, warm

        if (repro := progress.repro_key()) is not None:  # the warm child's parent is not DVC: tell it which is
            os.environ[progress.REPRO_ENV] = repro
        warm.delegate()  # runs this script in a warm process and exits; returns when none answers
    try:
        record = stage if isinstance(stage, str) else stage(params)
        declared = stages(params)
        if record not in declared:
            raise PipelineError(f"dvc.yaml has no stage for {record!r} under these params (a baseline runs only "
                                f"when params.yaml's baselines lists it: {', '.join(params.baselines)}; an lr "
                                f"or a seed only when protocol lists it)")
        check_device(params)
        if precheck is not None:
            precheck(params)
    except PipelineError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    outs = list(declared[record].outs)
    from newllm import distributed, progress, tracking  # MLflow and torch: only once the params are good

    # `[stage N/M]`, once per stage: not again in the processes torchrun starts for it
    tick = progress.begin(declared, record) if "LOCAL_RANK" not in os.environ else None

    if data_parallel and params.distributed.nproc > 1 and not distributed.launched():
        if params.eval_batch_size < params.distributed.nproc:  # every rank scores at least one row
            print(f"error: params.yaml: eval_batch_size ({params.eval_batch_size}) must be >= distributed.nproc "
                  f"({params.distributed.nproc}): each process scores eval_batch_size / nproc rows", file=sys.stderr)
            raise SystemExit(2)
        distributed.relaunch(params.distributed.nproc)
    make_deterministic()
    if distributed.launched():
        if not data_parallel:
            print(f"error: {record} runs as one process (distributed.nproc applies to the training stages); "
                  "start it without torchrun", file=sys.stderr)
            raise SystemExit(2)
        distributed.init(params.device)
        if not distributed.is_main():
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 (the process's stdout, to its end)

    main = distributed.is_main()
    if not main:  # under DDP the outputs are rank 0's: another rank never removes them
        outs = []
    try:
        if main:
            with tracking.stage_run(record, params, name_parent=tick is not None and tick.claim_parent()) as run:
                body(params, run)
        else:
            with tracking.rank_run(record, params) as run:
                body(params, run)
        if tick is not None:
            tick.finish()
    except PipelineError as e:
        _remove(outs)
        print(f"error: {record}: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except (KeyboardInterrupt, tracking.Terminated) as e:  # one line, not a traceback; the run ended KILLED
        _remove(outs)
        if not main:  # torchrun stopping this rank because another one failed: rank 0 says what happened
            raise SystemExit(143) from None
        name = "SIGINT" if isinstance(e, KeyboardInterrupt) else str(e)
        from newllm.training.resume import RESUME_DIR

        saved = RESUME_DIR / f"{record}.pt"
        then = f"; `dvc repro` resumes from {saved}" if saved.is_file() else ""
        print(f"error: {record}: stopped by {name}; MLflow run ended KILLED, no output kept{then}", file=sys.stderr)
        raise SystemExit(130 if name == "SIGINT" else 143) from None
    except BaseException:
        _remove(outs)
        raise


def run_cell(name: str, argv: list[str], body: Callable[[Params, Any, Any], None],
             precheck: Callable[[Params], None] | None = None) -> None:
    """run_stage for one protocol cell of registered model `name`, named by its command line (`--lr X` or
    `--seed N`, protocol.cell); `body(params, run, cell)` gets the cell's seed and lr."""
    from newllm.protocol import cell
    from newllm.registry import MODELS

    resolved: dict[str, Any] = {}

    def record(params: Params) -> str:
        resolved["cell"] = cell(params, MODELS[name].record, argv)
        return resolved["cell"].record

    run_stage(record, lambda params, run: body(params, run, resolved["cell"]), precheck, data_parallel=True)
