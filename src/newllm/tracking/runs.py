"""A stage's MLflow run around its body (`stage_run`): opened under its experiment's parent, resumed after a
kill, its DVC files written on success, always ended (FINISHED, FAILED, KILLED); runs left RUNNING by a
dead process are ended. `rank_run` is the no-op run of a DDP rank that is not rank 0."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from newllm.config import Params, params_hash, stage_params, stages
from newllm.errors import Diverged
from newllm.gitinfo import dvc_exp_name
from newllm.records import split_timing, write_metrics, write_plot
from newllm.tracking.naming import (
    END_REASON_TAG,
    HEADLINE,
    HOST_TAG,
    PID_TAG,
    REPORT,
    _final_metrics,
    _log_params,
    _numeric,
    experiment_parent,
    metric_key,
    nested_tags,
)
from newllm.tracking.store import init_store, run_url, tracking_uri
from newllm.tracking.ui import (
    ANSWER_VIEW,
    PARENTS_FILTER,
    SHARED_VIEW_TAG,
    _fill_changed,
    answer_view,
    ui_run_url,
)
from newllm.training.resume import ResumeFile, dep_key


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def end_orphans(client: Any, exp_id: str, stage: str | None = None, keep: str | None = None) -> list[str]:
    """End KILLED the runs left RUNNING by a process of this machine that no longer exists (a kill -9, a
    power cut); `stage`: only that stage's runs of this DVC experiment. A run of another machine, or of a
    live process, is left alone, and so is `keep` (the run a resume continues). Returns the ended run ids."""
    query = "attributes.status = 'RUNNING'"
    if stage is not None:
        query += f" and tags.`dvc.stage` = '{stage}' and tags.`dvc.exp_name` = '{dvc_exp_name()}'"
    ended = []
    host = socket.gethostname()
    for run in client.search_runs([exp_id], filter_string=query, max_results=1000):
        tags = run.data.tags
        pid = tags.get(PID_TAG, "")
        if run.info.run_id == keep or tags.get(HOST_TAG) != host or not pid.isdigit() or _alive(int(pid)):
            continue
        client.set_tag(run.info.run_id, END_REASON_TAG, f"process {pid} on {host} ended without closing the run")
        client.set_terminated(run.info.run_id, "KILLED")
        ended.append(run.info.run_id)
    return ended


class Terminated(BaseException):
    """Raised inside a stage on SIGTERM so its run ends KILLED instead of hanging in RUNNING."""


@dataclass
class StageRun:
    stage: str
    declared: Any  # its dag.Stage: outs, metrics and plots files
    client: Any
    run_id: str
    resume_file: ResumeFile
    changed: str = "baseline"  # what this DVC experiment changed (ablation_label): its parent run's name
    parent_id: str | None = None  # that parent run: the experiment's
    resumed: dict[str, Any] | None = None  # the trainer's state saved by a killed run of this stage, if any
    curve: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, Any] | None = None
    main = True  # the process that writes (under DDP: rank 0; RankRun is the others')

    def save_resume(self, state: dict[str, Any]) -> None:
        """The trainer's whole state, with this run's id and curve so far (training/resume.py)."""
        self.resume_file.save({"trainer": state, "run_id": self.run_id, "curve": self.curve})

    def log_step(self, values: dict[str, Any], step: int) -> None:
        """One point of the stage's curve: to MLflow now, to its plots file (dvc.yaml) at the end."""
        from mlflow.entities import Metric

        self.curve.append({"step": step, **values})
        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(metric_key(self.stage, k), v, ts, step)
                                                    for k, v in _numeric(values).items()])

    def log_live(self, values: dict[str, Any], step: int) -> None:
        """A point within a long epoch, to MLflow only (the record's curves are per epoch): section live/,
        x = optimiser steps, so a multi-hour run's loss can be watched while it trains."""
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(f"live/{k}", v, ts, step)
                                                    for k, v in _numeric(values).items()])

    def log_figure(self, figure: Any, name: str) -> None:
        # at the artifact root: MLflow's Compare page shows only the root files that the runs share
        self.client.log_figure(self.run_id, figure, name)

    def log_params(self, values: dict[str, Any]) -> None:
        """Params known only once the stage runs (a replicate's chosen lr)."""
        _log_params(self.client, self.run_id, values)

    def log_tags(self, values: dict[str, str]) -> None:
        for k, v in values.items():
            self.client.set_tag(self.run_id, k, v)

    def log_dataset(self, cache: Any, source: str) -> None:
        """The token cache this run read, as MLflow datasets (one input per split, the Dataset column of the
        runs table): named by the dataset source and tokenizer, a digest of each split's ids, sizes as profile."""
        import hashlib

        from mlflow.entities import Dataset, DatasetInput, InputTag

        name = f"{source}/{cache.meta.get('kind', 'tokens')}{cache.vocab_size}"  # e.g. template/word258
        # one digest per split: MLflow keeps one input per (name, digest)
        inputs = [DatasetInput(Dataset(name=name, digest=hashlib.sha256(getattr(cache, split).tobytes()).hexdigest()[:16],
                                       source_type="local", source=str(Path(cache.root).resolve() / f"{split}.npy"),
                                       schema='{"token_ids": "int32"}',
                                       profile=json.dumps({"tokens": int(getattr(cache, split).size)})),
                               tags=[InputTag("mlflow.data.context", split)])
                  for split in ("train", "val", "test")]
        self.client.log_inputs(self.run_id, datasets=inputs)

    def answer_on_parent(self, metrics: dict[str, Any], files: list[Path]) -> None:
        """The experiment's answer on its parent run (the report stage's): every top-level number of
        `metrics` as `headline/<key>` (the curves nested in it, such as context use, as `report/<key>`, so
        the headline heads Compare's alphabetical table), `files` at its artifact root (Compare lists the
        root files two runs share), and its end time now, so its duration is the experiment's (it started
        with the experiment's first stage). Then the answer view over every parent (answer_view)."""
        from mlflow.entities import Metric

        if self.parent_id is None:
            return
        ts = int(time.time() * 1000)
        top = {k: v for k, v in metrics.items() if not isinstance(v, dict)}
        nested = {k: v for k, v in metrics.items() if isinstance(v, dict)}
        self.client.log_batch(self.parent_id, metrics=[Metric(f"{HEADLINE}/{k}", v, ts, 0) for k, v in _numeric(top).items()]
                              + [Metric(f"{REPORT}/{k}", v, ts, 0) for k, v in _numeric(nested).items()])
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        self.client.set_terminated(self.parent_id, "FINISHED", end_time=ts)
        exp_id = self.client.get_run(self.parent_id).info.experiment_id
        changed = _fill_changed(self.client, self.client.search_runs([exp_id], filter_string=PARENTS_FILTER,
                                                                     max_results=1000))
        self.client.set_experiment_tag(exp_id, SHARED_VIEW_TAG + ANSWER_VIEW,
                                       json.dumps(answer_view(changed, list(_numeric(top)))))

    def log_artifact(self, path: str | os.PathLike) -> None:
        self.client.log_artifact(self.run_id, str(path))

    def finish(self, metrics: dict[str, Any]) -> None:
        """Final metrics: written to the stage's metrics file (dvc.yaml) and mirrored to MLflow."""
        self.final = metrics


def _reattach(client: Any, exp_id: str, run_id: str, tags: dict[str, str]) -> bool:
    """Make a killed run of this stage RUNNING again under this process (False: it is not in this store)."""
    try:
        run = client.get_run(run_id)
    except Exception:  # deleted, or another store: the resume starts a new run
        return False
    if run.info.experiment_id != exp_id or run.info.lifecycle_stage != "active":
        return False
    client.update_run(run_id, status="RUNNING")
    with contextlib.suppress(Exception):  # a SIGTERM'd run carries one
        client.delete_tag(run_id, END_REASON_TAG)
    for key in (PID_TAG, HOST_TAG):
        client.set_tag(run_id, key, tags[key])
    return True


def _raise_terminated(signum: int, frame: Any) -> None:
    """SIGTERM handler: unwind the stage as an exception, so its run ends KILLED and its cleanup runs."""
    raise Terminated(signal.Signals(signum).name)


def _resume_file(stage: str, params: Params, declared: Any) -> ResumeFile:
    """Every rank of a stage reads the one file, keyed by the stage's params and deps."""
    return ResumeFile(stage, lambda: dep_key(params_hash(params, stage), declared.deps))


@contextlib.contextmanager
def stage_run(stage: str, params: Params, name_parent: bool = False) -> Iterator[StageRun]:
    """The stage's MLflow run around its body: a resume continues the killed run's (same id, curve
    continued); divergence (`Diverged`) discards the resume file, any other failure keeps it.
    `name_parent`: print the experiment's parent run, name and UI address (the repro's first run does)."""
    declared = stages(params)[stage]
    resume_file = _resume_file(stage, params, declared)
    saved = resume_file.load()
    client, exp_id = init_store(params)
    for run_id in end_orphans(client, exp_id, stage, keep=saved and saved["run_id"]):
        print(f"{stage}: ended MLflow run {run_id} KILLED (its process is gone)", file=sys.stderr)
    parent_id, label = experiment_parent(client, exp_id, params)
    if name_parent:
        print(f"View this experiment's run '{client.get_run(parent_id).info.run_name}' at: "
              f"{ui_run_url(params, exp_id, parent_id)}", flush=True)
    tags = nested_tags(params, stage, parent_id, label)
    if saved and _reattach(client, exp_id, saved["run_id"], tags):
        run_id = saved["run_id"]
    else:
        run_id = client.create_run(exp_id, run_name=tags["mlflow.runName"], tags=tags).info.run_id
    tracked = StageRun(stage, declared, client, run_id, resume_file, changed=label, parent_id=parent_id,
                       resumed=saved and saved["trainer"], curve=list(saved["curve"]) if saved else [])
    print(f"{stage}: MLflow run {run_id} ({run_url(params, exp_id, run_id)})", flush=True)
    if saved:
        print(f"{stage}: resuming from {resume_file.path} ({_position(saved['trainer'])})", flush=True)

    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    status = "FAILED"
    monitor = _system_metrics(run_id, tracking_uri(params))
    try:
        _log_params(client, run_id, stage_params(params, stage))
        yield tracked
        if tracked.curve and declared.plots_file is not None:
            write_plot(declared.plots_file, tracked.curve)
        if tracked.final is not None and declared.metrics_file is not None:
            results, timing = split_timing(tracked.final, declared)
            write_metrics(declared.metrics_file, results)
            if timing:
                write_metrics(declared.timing_file, timing)
            client.log_batch(run_id, metrics=_final_metrics(tracked.final))
        for out in declared.outs:
            if out.endswith(".pt") and Path(out).is_file():
                try:  # a reference for the UI: a store without MLflow 3's logged models must not fail the stage
                    _log_checkpoint(client, exp_id, run_id, stage, Path(out))
                except Exception as e:
                    print(f"{stage}: warning: the checkpoint was not logged as an MLflow model ({type(e).__name__}: "
                          f"{str(e)[:200]})", file=sys.stderr)
        status = "FINISHED"
        resume_file.clear()
    except (KeyboardInterrupt, Terminated):
        status = "KILLED"
        raise
    except BaseException as e:  # the reason, as the one line the harness prints, on the FAILED run
        with contextlib.suppress(Exception):
            client.set_tag(run_id, END_REASON_TAG, f"{type(e).__name__}: {e}"[:5000])
        if isinstance(e, Diverged):
            resume_file.clear()  # resuming would diverge again
        raise
    finally:
        # Ending the run must not be cut short: under torchrun a failing rank's peers get SIGTERM while they
        # unwind, and the default handler (restored too early) killed them with the run still RUNNING.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            client.set_terminated(run_id, status)
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()
        finally:
            signal.signal(signal.SIGTERM, previous)


def _log_checkpoint(client: Any, exp_id: str, run_id: str, stage: str, path: Path) -> None:
    """A trained checkpoint as an MLflow logged model (the runs table's Models column) that points at the
    DVC-tracked file, by path and md5, instead of copying it into the artifact store: `dvc pull` or
    `dvc exp apply` restores it and `newllm generate` loads it."""
    import hashlib

    from mlflow.entities import LoggedModelOutput

    md5 = hashlib.md5()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            md5.update(block)
    model = client.create_logged_model(exp_id, name=re.sub(r"[/:.%\"']", "-", stage), source_run_id=run_id,
                                       model_type="pytorch checkpoint (DVC-tracked)",
                                       tags={"dvc.path": str(path), "dvc.md5": md5.hexdigest(), "dvc.stage": stage})
    client.finalize_logged_model(model.model_id, "READY")
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])


@dataclass
class RankRun:
    """What a DDP rank other than 0 gets for a run: StageRun's calls, logging and writing nothing. It
    resumes from the same file as rank 0, so every rank starts at the same epoch."""

    stage: str
    declared: Any
    resumed: dict[str, Any] | None = None
    changed: str = "baseline"
    main = False

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        return None

    save_resume = log_step = log_live = log_figure = log_params = log_tags = log_dataset = log_artifact = \
        answer_on_parent = finish = _nothing


@contextlib.contextmanager
def rank_run(stage: str, params: Params) -> Iterator[RankRun]:
    declared = stages(params)[stage]
    saved = _resume_file(stage, params, declared).load()
    previous = signal.signal(signal.SIGTERM, _raise_terminated)  # torchrun's stop: the stage's cleanup runs
    try:
        yield RankRun(stage, declared, resumed=saved and saved["trainer"])
    finally:
        signal.signal(signal.SIGTERM, previous)


def _system_metrics(run_id: str, uri: str) -> Any:
    """MLflow's own system-metrics monitor (CPU, memory, GPU when present; a sample every 10 s), or None
    when it cannot start: a missing psutil must never fail a stage."""
    try:
        import logging

        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop lines per stage
        monitor = SystemMetricsMonitor(run_id, sampling_interval=10, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception:
        return None


def _position(trainer_state: dict[str, Any]) -> str:
    """Where a resume picks up, in words: "5 epochs and 12 steps done", "iteration 3 done"."""
    if "iteration" in trainer_state:
        return f"iteration {trainer_state['iteration']} done"
    return f"{trainer_state.get('epoch', 0)} epochs and {trainer_state.get('step', 0)} steps done"
