"""A real `mlflow server` on loopback serves the runs that tracking.py wrote (REST API checked).

`mlflow_server` and `two_run_store` are imported by test_browser.py too.
"""

import contextlib
import json
import math
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import copy_of
from helpers import VENV_BIN, default_params, env, run, use_project_dvc_yaml, write_params

from newllm import tracking

CONTEXT_DIMS = {"exp-ctx16": 16, "exp-ctx32": 32}  # DVC experiment name -> context_dim


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 10.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return resp.read()


def api(base: str, endpoint: str, query: dict | None = None, body: dict | None = None) -> dict:
    """GET (query) or POST (JSON body) to MLflow's REST API 2.0."""
    url = f"{base}/api/2.0/mlflow/{endpoint}"
    if query:
        url += "?" + urllib.parse.urlencode(query)
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


CELL = "sweep/phase2_train/lr0.001"  # one sweep cell of New-LLM (dvc.yaml)


def two_run_store(root: Path) -> tuple[str, dict[str, str]]:
    """A SQLite store under `root` holding two FINISHED runs of one New-LLM sweep cell written by tracking.stage_run,
    one per experiment of CONTEXT_DIMS, each with a 3-point `val_loss` history and nested under its experiment's
    parent run (named `context_dim=<n>` against the default params.yaml, committed in `root`); returns (uri,
    exp -> run id)."""
    uri = f"sqlite:///{root / 'mlflow.db'}"
    write_params(root / "params.yaml", tracking={"uri": uri, "experiment": "t"})
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "p"]):
        subprocess.run(["git", *cmd], cwd=root, check=True, env=env(), capture_output=True)
    run_ids = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        mp.delenv("DVC_ROOT", raising=False)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        use_project_dvc_yaml(root)
        for exp, ctx in CONTEXT_DIMS.items():
            mp.setenv("DVC_EXP_NAME", exp)
            params = default_params(context_dim=ctx, tracking={"uri": uri, "experiment": "t"})
            with tracking.stage_run(CELL, params) as run:
                for step in range(3):
                    run.log_step({"val_loss": 3.0 - step * ctx / 100}, step=step)
                run.finish({"val_ppl": math.exp(3.0 - 2 * ctx / 100), "params_total": 1000 * ctx})
            run_ids[exp] = run.run_id
    return uri, run_ids


@contextlib.contextmanager
def mlflow_server(backend_uri: str, workdir: Path, timeout: float = 45.0,
                  artifacts: Path | None = None) -> Iterator[str]:
    """`mlflow server` on a free loopback port over `backend_uri`; yields its base URL once /health answers.
    `artifacts`: the server stores artifacts there and proxies them (clients never see the path), as a
    team's server does with S3. The server runs in its own session and is ended with all its children
    (uvicorn worker) on exit."""
    port = _free_port()
    store = (["--artifacts-destination", artifacts.as_uri(), "--serve-artifacts"] if artifacts else
             ["--default-artifact-root", (workdir / "mlartifacts").as_uri()])
    cmd = [str(VENV_BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, *store,
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # No background job consumers (GenAI scorers): they are several extra processes on a 2-core machine.
    server_env = {**env(), "MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    log_path = workdir / "mlflow-server.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(cmd, cwd=workdir, env=server_env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"mlflow server exited {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            with contextlib.suppress(urllib.error.URLError, OSError):
                if _get(f"{base}/health", timeout=2) == b"OK":
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"mlflow server not healthy in {timeout:.0f} s:\n{log_path.read_text()[-3000:]}")
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


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[str, dict[str, str]]]:
    root = tmp_path_factory.mktemp("mlflow-server")
    uri, run_ids = two_run_store(root)
    with mlflow_server(uri, root) as base:
        yield base, run_ids


def test_server_serves_both_runs_params_and_experiment_tag(served):
    base, run_ids = served
    exp = api(base, "experiments/get-by-name", {"experiment_name": "t"})["experiment"]
    assert {t["key"]: t["value"] for t in exp["tags"]}[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    found = api(base, "runs/search", body={"experiment_ids": [exp["experiment_id"]],
                                            "filter": f"tags.`dvc.stage` = '{CELL}'", "max_results": 10})
    runs = {r["info"]["run_id"]: r for r in found["runs"]}
    assert set(runs) == set(run_ids.values())
    for exp_name, run_id in run_ids.items():
        r = runs[run_id]
        params = {p["key"]: p["value"] for p in r["data"]["params"]}
        tags = {t["key"]: t["value"] for t in r["data"]["tags"]}
        assert r["info"]["run_name"] == f"{CELL}:{exp_name}" and r["info"]["status"] == "FINISHED"
        assert params["context_dim"] == str(CONTEXT_DIMS[exp_name]) and params["lr"] == "0.001"
        assert tags["dvc.exp_name"] == exp_name and tags["dvc.stage"] == CELL
        assert {m["key"] for m in r["data"]["metrics"]} >= {"curves/val_loss", "summary/val_ppl", "summary/params_total"}
    # The same search the UI makes when filtering on a param.
    only_32 = api(base, "runs/search", body={"experiment_ids": [exp["experiment_id"]],
                                             "filter": "params.context_dim = '32'"})
    found = {r["info"]["run_id"]: r for r in only_32["runs"]}
    assert run_ids["exp-ctx32"] in found and len(found) == 2  # the run, and its experiment's parent
    (parent,) = [r for rid, r in found.items() if rid != run_ids["exp-ctx32"]]
    assert parent["info"]["run_name"].startswith("context_dim=32 @ ")  # named by, and logging, what it changed


def test_server_serves_metric_histories(served):
    base, run_ids = served
    for exp_name, run_id in run_ids.items():
        hist = api(base, "metrics/get-history", {"run_id": run_id, "metric_key": "curves/val_loss"})["metrics"]
        ctx = CONTEXT_DIMS[exp_name]
        assert [m["step"] for m in hist] == [0, 1, 2]
        assert [m["value"] for m in hist] == pytest.approx([3.0 - s * ctx / 100 for s in range(3)])


def _runs(base: str, exp_id: str, where: str) -> list[dict]:
    return api(base, "runs/search", body={"experiment_ids": [exp_id], "filter": where})["runs"]


@pytest.mark.slow
def test_a_team_server_holds_a_clones_runs_curves_and_artifacts(reproduced, tmp_path):
    """README's team setup, on loopback: an `mlflow server` with a SQL backend and proxied artifacts. A clone
    replays its DVC records into it (`newllm sync`) and runs a stage against it; params, curves and the
    stage's figure come back through the REST API, and the figure lives in the server's store."""
    clone = copy_of(reproduced, tmp_path, "clone")  # reproduced (conftest.py) into its own sqlite file
    server = tmp_path / "server"
    server.mkdir()
    with mlflow_server(f"sqlite:///{server / 'mlflow.db'}", server, artifacts=server / "artifacts") as base:
        at_server = {"MLFLOW_TRACKING_URI": base}
        out = run(["newllm", "sync"], clone, extra_env=at_server).stdout
        assert "phase1/seed0" in out and "tokenize" in out, out
        assert "none missing" in run(["newllm", "sync"], clone, extra_env=at_server).stdout  # idempotent
        exp_id = api(base, "experiments/get-by-name", {"experiment_name": "newllm"})["experiment"]["experiment_id"]
        (p1,) = _runs(base, exp_id, "tags.`dvc.stage` = 'phase1/seed0'")
        assert {p["key"]: p["value"] for p in p1["data"]["params"]}["context_dim"] == "16"
        curve = api(base, "metrics/get-history", {"run_id": p1["info"]["run_id"], "metric_key": "phase1/er_pct"})
        csv_rows = (clone / "reports/plots/phase1/seed0.csv").read_text().splitlines()[1:]
        assert len(curve["metrics"]) == len(csv_rows) >= 3

        run(["dvc", "repro", "-f", "generate_dataset"], clone, extra_env=at_server)  # live, not synced
        (live,) = [r for r in _runs(base, exp_id, "tags.`dvc.stage` = 'generate_dataset'")
                   if "newllm.synced" not in {t["key"] for t in r["data"]["tags"]}]
        run_id = live["info"]["run_id"]
        assert live["info"]["artifact_uri"].startswith("mlflow-artifacts:/")  # proxied: no client-side path
        listed = api(base, "artifacts/list", {"run_id": run_id, "path": "figures"})["files"]
        assert [f["path"] for f in listed] == ["figures/line_lengths.png"]
        png = _get(f"{base}/get-artifact?" + urllib.parse.urlencode({"path": "figures/line_lengths.png",
                                                                     "run_uuid": run_id}))
        (stored,) = (server / "artifacts").rglob("line_lengths.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and stored.read_bytes() == png
