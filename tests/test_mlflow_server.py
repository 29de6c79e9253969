"""A real `mlflow server` on loopback serves the runs that newllm.tracking wrote (REST API checked).

`mlflow_server` and `two_run_store` are imported by test_browser.py too.
"""

import json
import math
import subprocess
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from faults import copy_of
from helpers import default_params, env, run, use_project_dvc_yaml, write_params

from newllm import tracking

# DVC experiment name -> context_dim: the workspace at the committed params.yaml (256), two ablations
CONTEXT_DIMS = {"workspace": 256, "exp-ctx16": 16, "exp-ctx32": 32}


def label(exp_name: str) -> str:
    """What a stage run's name ends with: its experiment's change against the commit (tracking.ablation_label)."""
    ctx = CONTEXT_DIMS[exp_name]
    return "baseline" if ctx == 256 else f"context_dim={ctx}"


def val_loss(ctx: int, step: int) -> float:
    return 3.0 - step * ctx / 1000


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


def _curve_figure(values: list[float]):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(3, 2))
    ax.plot(values)
    return fig


def two_run_store(root: Path) -> tuple[str, dict[str, str]]:
    """A SQLite store under `root` holding FINISHED runs of one New-LLM sweep cell written by tracking.stage_run,
    one per experiment of CONTEXT_DIMS (the default run and two ablations), each with a 3-point `val_loss` history and its figure `curves.png`, nested under its experiment's
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
                    run.log_step({"val_loss": val_loss(ctx, step)}, step=step)
                run.log_figure(_curve_figure([val_loss(ctx, step) for step in range(3)]), "curves.png")
                run.finish({"val_loss": val_loss(ctx, 2), "val_ppl": math.exp(val_loss(ctx, 2)), "params_total": 1000 * ctx})
            run_ids[exp] = run.run_id
    return uri, run_ids


def mlflow_server(backend_uri: str, workdir: Path, artifacts: Path | None = None):
    """The product's loopback server (tracking.local_server: free port, stopped by its PID on exit)."""
    return tracking.local_server(backend_uri, workdir, artifacts=artifacts)


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
        assert r["info"]["run_name"] == f"{label(exp_name)} | {CELL}" and r["info"]["status"] == "FINISHED"
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


def test_a_second_server_binds_its_own_port_and_serves_its_own_store(served, tmp_path):
    """The server binds port 0 and local_server reads back the port it got: two at once (parallel test
    workers, two `newllm ui`) never share one, so a URL always answers for its own store."""
    base, _ = served
    with mlflow_server(f"sqlite:///{tmp_path / 'other.db'}", tmp_path) as other:
        assert other != base
        names = {e["name"] for e in api(other, "experiments/search", {"max_results": 10})["experiments"]}
        assert names == {"Default"}  # not the served store's "t"
        assert api(base, "experiments/get-by-name", {"experiment_name": "t"})["experiment"]["name"] == "t"


def test_server_serves_metric_histories(served):
    base, run_ids = served
    for exp_name, run_id in run_ids.items():
        hist = api(base, "metrics/get-history", {"run_id": run_id, "metric_key": "curves/val_loss"})["metrics"]
        ctx = CONTEXT_DIMS[exp_name]
        assert [m["step"] for m in hist] == [0, 1, 2]
        assert [m["value"] for m in hist] == pytest.approx([val_loss(ctx, s) for s in range(3)])


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
        listed = api(base, "artifacts/list", {"run_id": run_id})["files"]
        assert [f["path"] for f in listed] == ["line_lengths.png"]  # the root: where Compare looks
        png = _get(f"{base}/get-artifact?" + urllib.parse.urlencode({"path": "line_lengths.png",
                                                                     "run_uuid": run_id}))
        (stored,) = (server / "artifacts").rglob("line_lengths.png")
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and stored.read_bytes() == png
