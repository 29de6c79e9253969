"""The one module that talks to MLflow and writes DVC's metrics/plots files.

DVC's files are the record (`reports/metrics/<stage>.json`, `reports/plots/<stage>*.csv`, tracked by git);
MLflow mirrors them. A stage runs inside `stage_run(...)`, which opens one MLflow run named
`<what its experiment changed> | <stage>`, logs params flat, per-step metrics and figures, writes the DVC files on
success, and always ends the run: FINISHED, FAILED on an exception, KILLED on SIGINT/SIGTERM.
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from filelock import FileLock

from newllm.config import Params, flatten, params_hash, stage_params, stages
from newllm.errors import Diverged, PipelineError
from newllm.training.resume import ResumeFile, dep_key

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI opens a model-training experiment on its runs
PID_TAG, HOST_TAG, END_REASON_TAG = "newllm.pid", "newllm.host", "newllm.end_reason"
PARENT_TAG, CHANGED_TAG = "newllm.parent_key", "newllm.changed"  # a DVC experiment's parent run; what it changed
STUDY_TAG = "newllm.study"
HEADLINE = "headline"  # the section of a parent run's metrics: the report's headline (report.json), its answer
REPORT = "report"  # ... and the rest of report.json on the parent: its curves (context use per distance)
PARENT_ID_TAG = "mlflow.parentRunId"  # MLflow's own nesting: the UI folds a stage's run under its parent
# The UI's "Share" view: an experiment tag holding a runs-table state, opened by `?viewStateShareKey=<key>`.
SHARED_VIEW_TAG, ANSWER_VIEW = "mlflow.sharedViewState.", "answer"
# Final values that are measurements of speed, not results: written to the stage's timing file (dvc.yaml)
# instead of its metrics file, so `dvc exp show --only-changed` and `dvc metrics diff` show results only.
TIMING_KEYS = ("tokens_per_s", "train_wall_time_s", "context_cache_s", "wall_time_s", "peak_gpu_bytes")
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


class TrackingError(PipelineError):
    """The tracking store cannot be used (unreachable server, damaged or read-only SQLite file, bad URI)."""


# ----------------------------------------------------------------------------------------------- store
def project_root() -> Path:
    """DVC_ROOT when DVC runs us (under `dvc exp run --temp` that is the user's repo, not the temp copy)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() or (d / ".dvc").is_dir():
            return d
    return here


def tracking_uri(params: Params | None = None) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if params is not None and params.tracking.uri:
        return params.tracking.uri
    return f"sqlite:///{project_root() / 'mlflow.db'}"


def check_store(uri: str, timeout: float = 3.0) -> None:
    """Fail in one line, before any run opens, on a store MLflow could not write: a dead server (MLflow's own
    retries take minutes per call), or a SQLite file that is not a database, is read-only, or sits in a
    folder that cannot be written (SQLite writes its journal beside the file)."""
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout)
    elif uri.startswith("sqlite:///"):
        _check_sqlite(Path(uri.removeprefix("sqlite:///").split("?")[0]))


def _check_server(uri: str, timeout: float) -> None:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            if resp.status >= 500:
                raise TrackingError(f"MLflow tracking server {uri} answered HTTP {resp.status}")
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({e}); start it, or unset "
                            "MLFLOW_TRACKING_URI / tracking.uri to use the local sqlite store") from None


SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file


def _check_sqlite(path: Path) -> None:
    elsewhere = "or point MLFLOW_TRACKING_URI at another store"
    folder = path.parent
    if not folder.is_dir():
        raise TrackingError(f"MLflow store {path}: its folder {folder} does not exist; create it, {elsewhere}")
    if path.exists():
        try:
            with path.open("rb") as f:
                head = f.read(len(SQLITE_HEADER))
        except OSError as e:
            raise TrackingError(f"MLflow store {path} cannot be read ({e.strerror}); fix its permissions, "
                                f"{elsewhere}") from None
        if head and head != SQLITE_HEADER:
            raise TrackingError(f"MLflow store {path} is not an SQLite database (overwritten or damaged); move it "
                                f"aside and run `newllm init-store` to start a new one, {elsewhere}")
        if not os.access(path, os.W_OK):
            raise TrackingError(f"MLflow store {path} is read-only; make it writable (chmod u+w, or chattr -i if "
                                f"it is immutable), {elsewhere}")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise TrackingError(f"MLflow store {path}: its folder {folder} is not writable (SQLite writes its journal "
                            f"beside the file); fix its permissions, {elsewhere}")


def _client(uri: str):
    # Keep MLflow's HTTP client from retrying for minutes once we know the server is up.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def init_store(params: Params | None = None) -> tuple[Any, str]:
    """Create the store and the experiment once, under a file lock: parallel first writers
    (`dvc queue start -j 2`) on a fresh SQLite file were measured to corrupt it."""
    uri = tracking_uri(params)
    check_store(uri)
    name = params.tracking.experiment if params else "newllm"
    with _store_lock(uri):
        client = _client(uri)
        exp = client.get_experiment_by_name(name)
        if exp is None:
            artifacts = (project_root() / "mlartifacts").as_uri() if not uri.startswith("http") else None
            exp_id = client.create_experiment(name, artifact_location=artifacts,
                                              tags={EXPERIMENT_KIND_TAG: "custom_model_development"})
        else:
            exp_id = exp.experiment_id
    return client, exp_id


def run_url(params: Params, exp_id: str, run_id: str) -> str:
    """Where to see a run: its page on a tracking server, else the local store (open it with `make ui`)."""
    uri = tracking_uri(params)
    if uri.startswith(("http://", "https://")):
        return f"{uri.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"
    return f"{uri}; `make ui` shows it"


def ui_run_url(params: Params, exp_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI, in its model-training view: on the tracking server, else on the one
    `make ui` serves over the local store (its default port)."""
    uri = tracking_uri(params)
    base, later = (uri.rstrip("/"), "") if uri.startswith(("http://", "https://")) else (
        "http://127.0.0.1:5000", " (once `make ui` serves this store)")
    from urllib.parse import urlencode

    return f"{base}/#/experiments/{exp_id}/runs/{run_id}?{urlencode(ML_MODE)}{later}"


# ----------------------------------------------------------------------------------------------- tags
def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=project_root())
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def dvc_exp_name() -> str:
    return os.environ.get("DVC_EXP_NAME") or "workspace"


def baseline_rev() -> str:
    """The commit an experiment starts from (DVC sets it under `dvc exp run`), else HEAD."""
    return os.environ.get("DVC_EXP_BASELINE_REV") or git_commit()


def file_at(rev: str, path: str) -> str | None:
    """`path` as committed at `rev` (None outside git or when it is not there)."""
    try:
        out = subprocess.run(["git", "show", f"{rev}:{path}"], capture_output=True, text=True, timeout=5,
                             cwd=project_root())
        return out.stdout if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def changed_vs_baseline(params: Params) -> tuple[str, dict[str, tuple[Any, Any]] | None]:
    """(the commit an experiment starts from, every flat param that differs from params.yaml there as
    key -> (here, there)); None when there is nothing to compare with (no commit, or it does not validate)."""
    import yaml

    from newllm.config import ConfigError, changed_params, parse_params

    rev = baseline_rev()
    text = file_at(rev, "params.yaml") if rev else None
    if text is None:
        return rev, None
    try:
        return rev, changed_params(params, parse_params(yaml.safe_load(text)))
    except (ConfigError, yaml.YAMLError):
        return rev, None


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


def _store_lock(uri: str) -> Any:
    """The sqlite store's file lock (parallel writers corrupt a fresh file; two queue workers must not both
    create a parent); nothing for a server, which serialises itself."""
    return (FileLock(str(uri.removeprefix("sqlite:///")) + ".lock", timeout=120)
            if uri.startswith("sqlite:///") else contextlib.nullcontext())


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


# ----------------------------------------------------------------------------------------------- DVC files
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def write_metrics(path: Path, metrics: dict[str, Any]) -> Path:
    _atomic_write(path, json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    return path


def write_plot(path: Path, rows: list[dict[str, Any]]) -> Path:
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def _numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of `metrics`, under names MLflow accepts."""
    return {re.sub(r"[^\w\-. :/]", "_", k): float(v) for k, v in flatten(metrics).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# ----------------------------------------------------------------------------------------------- stage run
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


def _log_params(client: Any, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i:i + 100])


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


def _final_metrics(metrics: dict[str, Any]) -> list[Any]:
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(f"{SUMMARY}{k}", v, ts, 0) for k, v in _numeric(metrics).items()]


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


# ----------------------------------------------------------------------------------------------- sync
def split_timing(final: dict[str, Any], declared: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(results for the metrics file, speed measurements for the timing file when the stage has one)."""
    if declared.timing_file is None:
        return final, {}
    return ({k: v for k, v in final.items() if k not in TIMING_KEYS},
            {k: v for k, v in final.items() if k in TIMING_KEYS})


def _read_plot(path: Path) -> list[dict[str, Any]]:
    with path.open() as f:
        return list(csv.DictReader(f))


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


# ----------------------------------------------------------------------------------------------- UI
ML_MODE = {"workflowType": "machine_learning"}  # MLflow 3's "Model training" pages, not its GenAI home
PARENTS_FILTER = f"tags.`{PARENT_TAG}` LIKE '%'"  # the experiments' parent runs only: one row per experiment
ANSWER_SORT = "newllm_test_ppl"  # the report's headline: the runs table ranks the experiments by it


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
