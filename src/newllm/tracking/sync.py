"""Replays DVC's record into MLflow (`newllm sync`: a run per stage the store lacks) and logs `newllm
compare`'s table and figure."""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path
from typing import Any

from newllm.config import Params, params_hash, stage_params, stages
from newllm.gitinfo import git_commit
from newllm.records import _read_plot
from newllm.tracking.naming import _final_metrics, _log_params, experiment_parent, metric_key, nested_tags
from newllm.tracking.runs import end_orphans
from newllm.tracking.store import init_store


def log_compare(params: Params, table: Any, markdown: Path, figure: Path) -> str:
    """`newllm compare`'s table (MLflow's log_table, so the UI's evaluation view can read it) and figure, in
    a top-level run of their own named `compare @ <commit>`: it reads every experiment, so it is nested under
    none. Returns its id."""
    client, exp_id = init_store(params)
    commit = git_commit()
    run_id = client.create_run(exp_id, run_name=f"compare @ {commit[:7]}" if commit else "compare", tags={
        "dvc.stage": "compare", "mlflow.source.git.commit": commit,
        "mlflow.note.content": "`newllm compare`: every experiment's result cells, ranked by test PPL per model."
        }).info.run_id
    status = "FAILED"
    try:
        client.log_table(run_id, data=table, artifact_file="ablations.json")
        client.log_artifact(run_id, str(figure), "figures")  # where the logged markdown links it
        client.log_artifact(run_id, str(markdown))
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)
    return run_id


def sync(params: Params, records: list[str] | None = None) -> list[str]:
    """Replay the DVC metrics/plots files into MLflow as runs, one per (stage, params_hash) that the
    store lacks, so an MLflow outage or a DVC run-cache restore never hides a result; first end every run
    left RUNNING by a dead process of this machine (end_orphans). Idempotent.
    `records`: the stages to replay (default: every stage of dvc.yaml)."""
    from mlflow.entities import Metric

    declared = stages(params)
    client, exp_id = init_store(params)
    end_orphans(client, exp_id)  # store-wide
    parent_id, label = experiment_parent(client, exp_id, params)
    created = []
    for stage in records or list(declared):
        metrics_file, plot = declared[stage].metrics_file, declared[stage].plots_file
        if metrics_file is None or not metrics_file.is_file():
            continue
        phash = params_hash(params, stage)
        found = client.search_runs([exp_id], filter_string=(
            f"tags.`dvc.stage` = '{stage}' and tags.params_hash = '{phash}' and attributes.status = 'FINISHED'"),
            max_results=1)
        if found:
            continue
        tags = {**nested_tags(params, stage, parent_id, label), "newllm.synced": "true"}
        run_id = client.create_run(exp_id, run_name=tags["mlflow.runName"], tags=tags).info.run_id
        try:
            final = json.loads(metrics_file.read_text())
            timing = declared[stage].timing_file
            if timing is not None and timing.is_file():
                final.update(json.loads(timing.read_text()))
            logged = stage_params(params, stage)
            if "lr" in final and "lr" not in logged:  # a replicate's lr was chosen at run time (run.log_params)
                logged["lr"] = final["lr"]
            _log_params(client, run_id, logged)
            ts = int(time.time() * 1000)
            if plot is not None and plot.is_file():
                batch = []
                for row in _read_plot(plot):
                    step = int(float(row.pop("step", 0) or 0))
                    for k, v in row.items():
                        with contextlib.suppress(TypeError, ValueError):
                            batch.append(Metric(metric_key(stage, k), float(v), ts, step))
                for i in range(0, len(batch), 1000):
                    client.log_batch(run_id, metrics=batch[i:i + 1000])
            client.log_batch(run_id, metrics=_final_metrics(final))
            client.set_terminated(run_id, "FINISHED")
        except BaseException:
            client.set_terminated(run_id, "FAILED")
            raise
        created.append(stage)
    return created
