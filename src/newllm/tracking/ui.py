"""The MLflow UI: the links `make ui` prints (the runs table, opened on the experiment's answer view once a
report has saved it; the curves chart view), the answer view itself, and a real `mlflow server` on loopback."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from newllm.config import Params
from newllm.errors import PipelineError
from newllm.gitinfo import file_at
from newllm.tracking.naming import HEADLINE, PARENT_TAG, STUDY_TAG, SUMMARY, _log_params
from newllm.tracking.store import run_page, tracking_uri

# The UI's "Share" view: an experiment tag holding a runs-table state, opened by `?viewStateShareKey=<key>`.
SHARED_VIEW_TAG, ANSWER_VIEW = "mlflow.sharedViewState.", "answer"


ML_MODE = {"workflowType": "machine_learning"}  # MLflow 3's "Model training" pages, not its GenAI home


PARENTS_FILTER = f"tags.`{PARENT_TAG}` LIKE '%'"  # the experiments' parent runs only: one row per experiment


ANSWER_SORT = "newllm_test_ppl"  # the report's headline: the runs table ranks the experiments by it


def ui_run_url(params: Params, exp_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, in its model-training view: on the tracking server, else on the one
    `make ui` serves over the local store (its default port)."""
    from urllib.parse import urlencode

    uri = tracking_uri(params)
    base, later = (uri, "") if uri.startswith(("http://", "https://")) else (
        "http://127.0.0.1:5000", " (once `make ui` serves this store)")
    return f"{run_page(base, exp_id, run_id)}?{urlencode(ML_MODE)}{later}"


def answer_view(changed: list[str], headline: list[str]) -> dict[str, Any]:
    """The runs table that answers an ablation, as MLflow's UI stores a shared view: the parent runs only,
    best New-LLM test PPL first, the changed params and the headline's test PPLs (every model's, New-LLM's
    spread, its ratio to the Transformer) as its columns. Keys as the UI spells columns: params.`k`."""
    wanted = [k for k in headline if k.endswith("_test_ppl")]
    wanted = ([ANSWER_SORT, f"{ANSWER_SORT}_std", "test_ppl_ratio_vs_transformer"]
              + [k for k in wanted if k != ANSWER_SORT])
    names = {f"params.`{k}`": k for k in changed} | {f"metrics.`{HEADLINE}/{k}`": f"{HEADLINE}/{k}"
                                                      for k in wanted if k in headline}
    return {"searchFilter": PARENTS_FILTER, "orderByKey": f"metrics.`{HEADLINE}/{ANSWER_SORT}`", "orderByAsc": True,
            "selectedColumns": list(names), "columnOrder": list(names),
            "columnWidths": {c: 7 * len(n) + 40 for c, n in names.items()}}  # the whole name shows: none clipped


def _fill_changed(client: Any, parents: list[Any]) -> list[str]:
    """Every param some ablation's parent changed (a study's cells aside: they change a dozen each), logged on
    each parent that lacks it with its value at that parent's commit, so the answer's columns have no
    blank (the baseline's context_dim is 256, not "-"). Returns those params, sorted."""
    import yaml

    from newllm.config import ConfigError, flatten, parse_params, to_dict

    ablations = [r for r in parents if STUDY_TAG not in r.data.tags]
    changed = sorted({k for r in ablations for k in r.data.params})
    for r in ablations:
        missing = [k for k in changed if k not in r.data.params]
        text = file_at(r.data.tags.get("dvc.baseline_rev", ""), "params.yaml") if missing else None
        if text is None:
            continue
        try:
            there = flatten(to_dict(parse_params(yaml.safe_load(text))))
        except (ConfigError, yaml.YAMLError):
            continue
        _log_params(client, r.info.run_id, {k: there[k] for k in missing if k in there})
    return changed


def has_answer_view(client: Any, exp_id: str) -> bool:
    """Whether a report stage has saved the answer's view in this experiment (the runs link then opens it)."""
    return SHARED_VIEW_TAG + ANSWER_VIEW in client.get_experiment(exp_id).tags


def ui_links(base: str, exp_id: str, curves_stage: str, answer: bool = False) -> dict[str, str]:
    """The MLflow UI pages `make ui` prints: the runs table (one parent per DVC experiment; with `answer`,
    the view the report saved, answer_view) and `curves`, the chart view of one stage's run in every
    experiment, best val loss first. Any sort but by time lists nested runs flat (MLflow nests children only
    when sorted by start time), so its charts draw one line per experiment with no parent to expand."""
    from urllib.parse import quote, urlencode

    page = f"{base.rstrip('/')}/#/experiments/{exp_id}/runs"
    runs = {**ML_MODE, "viewStateShareKey": ANSWER_VIEW} if answer else ML_MODE
    curves = {**ML_MODE, "compareRunsMode": "CHART", "searchFilter": f"tags.`dvc.stage` = '{curves_stage}'",
              "orderByKey": f"metrics.`{SUMMARY}val_loss`", "orderByAsc": "true"}
    return {"runs": f"{page}?{urlencode(runs)}", "curves": f"{page}?{urlencode(curves, quote_via=quote)}"}


# The address the server logs once bound: uvicorn (MLflow's default) or gunicorn (--gunicorn-opts).
_BOUND = re.compile(r"(?:Uvicorn running on|Listening at:) (http://127\.0\.0\.1:[1-9]\d*) ")  # whole line only


@contextlib.contextmanager
def local_server(backend_uri: str, workdir: Path, artifacts: Path | None = None,
                 timeout: float = 45.0) -> Iterator[str]:
    """A real `mlflow server` over `backend_uri` on a free 127.0.0.1 port; yields its base URL once /health
    answers, and ends it (its whole process group: the uvicorn worker too) on exit, failure included.
    `artifacts`: the server stores artifacts there and proxies them, as a team's server does with S3.
    The server binds port 0 itself and logs the port it got: a port picked here and bound there could be
    taken in between by a parallel test's server, whose /health would then answer for this one."""
    import urllib.error
    import urllib.request

    store = (["--artifacts-destination", artifacts.as_uri(), "--serve-artifacts"] if artifacts else
             ["--default-artifact-root", (workdir / "mlartifacts").as_uri()])
    cmd = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri, *store,
           "--host", "127.0.0.1", "--port", "0", "--workers", "1"]
    # No background job consumers (GenAI scorers): several extra processes a laptop does not need.
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = workdir / "mlflow-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = None
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise PipelineError(f"mlflow server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            if base is None and (bound := _BOUND.search(log_path.read_text(errors="replace"))):
                base = bound.group(1)
            if base is not None:
                with contextlib.suppress(urllib.error.URLError, OSError):
                    with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                        if resp.read() == b"OK":
                            break
            if time.monotonic() > deadline:
                raise PipelineError(f"mlflow server not healthy in {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
