"""The MLflow store: which one (MLFLOW_TRACKING_URI, params, else the project's sqlite file), whether it can
be written (checked before any run opens), the client, the experiment, and where a run is seen."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any

from filelock import FileLock

from newllm.config import Params
from newllm.errors import PipelineError
from newllm.gitinfo import project_root

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"  # MLflow 3's UI opens a model-training experiment on its runs


class TrackingError(PipelineError):
    """The tracking store cannot be used (unreachable server, damaged or read-only SQLite file, bad URI)."""


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


def run_page(base: str, exp_id: str, run_id: str) -> str:
    """A run's page in the MLflow UI served at `base`."""
    return f"{base.rstrip('/')}/#/experiments/{exp_id}/runs/{run_id}"


def run_url(params: Params, exp_id: str, run_id: str) -> str:
    """Where to see a run: its page on a tracking server, else the local store (open it with `make ui`)."""
    uri = tracking_uri(params)
    if uri.startswith(("http://", "https://")):
        return run_page(uri, exp_id, run_id)
    return f"{uri}; `make ui` shows it"



def _store_lock(uri: str) -> Any:
    """The sqlite store's file lock (parallel writers corrupt a fresh file; two queue workers must not both
    create a parent); nothing for a server, which serialises itself."""
    return (FileLock(str(uri.removeprefix("sqlite:///")) + ".lock", timeout=120)
            if uri.startswith("sqlite:///") else contextlib.nullcontext())
