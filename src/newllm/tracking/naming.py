"""How runs are named, tagged and nested: one parent run per DVC experiment, named by what it changed,
every stage's run under it; the MLflow names of metrics, in the chart view's section order."""

from __future__ import annotations

import math
import os
import re
import socket
import time
from typing import Any

from newllm.config import Params, flatten, params_hash
from newllm.gitinfo import changed_vs_baseline, dvc_exp_name, git_commit
from newllm.tracking.store import _store_lock, tracking_uri

PID_TAG, HOST_TAG, END_REASON_TAG = "newllm.pid", "newllm.host", "newllm.end_reason"


PARENT_TAG, CHANGED_TAG = "newllm.parent_key", "newllm.changed"  # a DVC experiment's parent run; what it changed


STUDY_TAG = "newllm.study"


HEADLINE = "headline"  # the section of a parent run's metrics: the report's headline (report.json), its answer


REPORT = "report"  # ... and the rest of report.json on the parent: its curves (context use per distance)


PARENT_ID_TAG = "mlflow.parentRunId"  # MLflow's own nesting: the UI folds a stage's run under its parent


# MLflow's chart view puts a metric in the section named by its prefix before "/", sections in alphabetical
# order: "curves/" (train/val loss, PPL, accuracy: the same keys for every model, so one chart overlays
# them) opens the view, then "phase1/", "schedule/" (lr), "summary/" (final values), "time/". DVC's files
# keep the plain names.
STEP_TIMING = ("epoch_time_s", "tokens_per_s", "step_time_s", "time_s")


SUMMARY = "summary/"


def metric_key(stage: str, key: str) -> str:
    """The MLflow name of a per-step value of `stage` (see the section order above)."""
    if key in STEP_TIMING:
        return f"time/{key}"
    if key == "lr":
        return "schedule/lr"
    return f"phase1/{key}" if stage.startswith("phase1/") else f"curves/{key}"


def ablation_label(changed: dict[str, tuple[Any, Any]] | None) -> str:
    """What a run changed, as its parent is named: "context_dim=128 seed=1", or "baseline"."""
    if not changed:
        return "baseline"
    label = " ".join(f"{k}={here}" for k, (here, _) in changed.items())
    return label if len(label) <= 250 else label[:247] + "..."


def experiment_parent(client: Any, exp_id: str, params: Params) -> tuple[str, str]:
    """The parent run of this DVC experiment (the workspace included): found by what it changed against
    its baseline commit, else created (named by it, the changed params logged as its params, FINISHED at
    once: it holds no work of its own). Returns (its run id, its label). Under the store's lock: two queue
    workers of one experiment must not both create it."""
    with _store_lock(tracking_uri(params)):
        return _find_or_create_parent(client, exp_id, params)


def _find_or_create_parent(client: Any, exp_id: str, params: Params) -> tuple[str, str]:
    import hashlib

    rev, changed = changed_vs_baseline(params)
    # a study's cell changes a dozen keys: its experiment's name (`newllm study run` gives one) says it better
    label = dvc_exp_name() if params.tracking.study else ablation_label(changed)
    key = hashlib.sha256(f"{rev}\n{label}".encode()).hexdigest()[:16]
    found = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_TAG}` = '{key}'", max_results=1)
    if found:
        return found[0].info.run_id, label
    tags = {PARENT_TAG: key, CHANGED_TAG: label, "dvc.exp_name": dvc_exp_name(), "dvc.baseline_rev": rev,
            "mlflow.source.git.commit": git_commit(), **study_tag(params),
            "mlflow.note.content": f"DVC experiment `{dvc_exp_name()}`; params against commit `{rev[:7]}`: {label}. "
                                   "Each stage that ran for it is a run nested under this one."}
    # the commit in the name: every commit has its own "baseline", and an ablation means nothing without it
    run_id = client.create_run(exp_id, run_name=_fit(label, f" @ {rev[:7]}" if rev else ""), tags=tags).info.run_id
    _log_params(client, run_id, {k: here for k, (here, _) in (changed or {}).items()})
    client.set_terminated(run_id, "FINISHED")
    return run_id, label


def study_tag(params: Params) -> dict[str, str]:
    """newllm.study, on every run of a study's experiments: the UI's filter `tags.newllm.study = '<name>'`."""
    return {STUDY_TAG: params.tracking.study} if params.tracking.study else {}


def run_tags(params: Params, stage: str) -> dict[str, str]:
    commit = git_commit()
    return {
        **study_tag(params),
        # who runs it: a run left RUNNING by a process that is gone is ended by the next one (end_orphans)
        PID_TAG: str(os.getpid()), HOST_TAG: socket.gethostname(),
        "dvc.stage": stage,
        "dvc.exp_name": dvc_exp_name(),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV") or commit,
        "params_hash": params_hash(params, stage),
        "mlflow.source.git.commit": commit,
    }


def nested_tags(params: Params, stage: str, parent_id: str, label: str) -> dict[str, str]:
    """A stage run's tags under its experiment's parent. Its name starts with what the experiment changed,
    so a chart legend or a narrow Run Name column reads `context_dim=128 | seeds/phase2_train/seed1`, not a
    random DVC experiment name (that is the tag dvc.exp_name)."""
    return {**run_tags(params, stage), PARENT_ID_TAG: parent_id, CHANGED_TAG: label,
            "mlflow.runName": _fit(label, f" | {stage}")}


def _fit(label: str, suffix: str, limit: int = 250) -> str:
    """label + suffix within MLflow's run-name column (250 characters), the label shortened."""
    room = limit - len(suffix)
    return (label if len(label) <= room else label[:room - 3] + "...") + suffix


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of `metrics`, under names MLflow accepts."""
    return {re.sub(r"[^\w\-. :/]", "_", k): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i:i + 100])


def _final_metrics(metrics: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(f"{SUMMARY}{k}", v, ts, 0) for k, v in _numeric(metrics).items()]
