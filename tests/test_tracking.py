"""newllm.tracking against a real SQLite MLflow store, read back with MlflowClient."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import default_params, env, use_project_dvc_yaml, write_params
from mlflow.tracking import MlflowClient

from newllm import tracking
from newllm.config import Params, params_hash

CELL = "sweep/phase2_train/lr0.001"  # one sweep cell of New-LLM (dvc.yaml)


@pytest.fixture
def store(tmp_path: Path, monkeypatch) -> tuple[Params, str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_ROOT", raising=False)
    use_project_dvc_yaml(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return default_params(tracking={"uri": uri, "experiment": "t"}), uri


def _runs(uri: str, name: str = "t", parents: bool = False):
    """The stage runs of the store (or, with `parents`, the DVC experiments' parent runs)."""
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    runs = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])
    return client, [r for r in runs if ("dvc.stage" in r.data.tags) != parents]


def test_stage_run_logs_params_curves_tags_and_writes_dvc_files(store, monkeypatch):
    params, uri = store
    monkeypatch.setenv("DVC_EXP_NAME", "exp-ctx512")
    with tracking.stage_run("phase1/seed0", params) as run:
        for i in range(3):
            run.log_step({"loss": 1.0 / (i + 1), "er_pct": 10.0 * i}, step=i)
        run.finish({"er_pct": 20.0, "params_total": 123})
    client, (r,) = _runs(uri)
    assert r.info.status == "FINISHED" and r.info.run_name == "baseline | phase1/seed0"  # named by what its experiment changed: nothing here
    assert r.data.params["phase1.lr"] == "0.002" and r.data.params["context_dim"] == "256"
    assert "phase2.streams" not in r.data.params  # only what the stage reads
    assert [m.value for m in client.get_metric_history(r.info.run_id, "phase1/loss")] == [1.0, 0.5, 1 / 3]
    assert r.data.tags["dvc.stage"] == "phase1/seed0" and r.data.tags["dvc.exp_name"] == "exp-ctx512"
    assert r.data.tags["params_hash"] == params_hash(params, "phase1/seed0")
    assert r.data.metrics["summary/params_total"] == 123
    assert {"phase1/loss", "phase1/er_pct", "summary/er_pct"} <= set(r.data.metrics)  # chart-view sections
    assert json.loads(Path("reports/metrics/phase1/seed0.json").read_text()) == {"er_pct": 20.0, "params_total": 123}
    assert Path("reports/plots/phase1/seed0.csv").read_text().splitlines()[0] == "step,loss,er_pct"
    exp = client.get_experiment_by_name("t")
    assert exp.tags[tracking.EXPERIMENT_KIND_TAG] == "custom_model_development"
    assert exp.artifact_location.endswith("/mlartifacts")


def test_an_exception_marks_the_run_failed_and_writes_no_metrics(store):
    params, uri = store
    with pytest.raises(ZeroDivisionError), tracking.stage_run("tokenize", params) as run:
        run.log_step({"x": 1}, step=0)
        1 / 0  # noqa: B018
    _, (r,) = _runs(uri)
    assert r.info.status == "FAILED"
    assert not Path("reports/metrics/tokenize.json").exists()


def test_sigterm_marks_the_run_killed(store, tmp_path: Path):
    params, uri = store
    script = (
        "import sys, time\nfrom newllm import tracking\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\nfrom helpers import default_params\n"
        f"p = default_params(tracking={{'uri': {uri!r}, 'experiment': 't'}})\n"
        f"with tracking.stage_run({CELL!r}, p):\n"
        "    print('started', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env(), stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith(f"{CELL}: MLflow run ")  # each stage says where its run is
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) != 0
    _, (r,) = _runs(uri)
    assert r.info.status == "KILLED"


def test_sigterm_in_a_stage_is_one_line_and_exit_143(store, tmp_path: Path):
    params, uri = store
    write_params(tmp_path / "params.yaml", tracking={"uri": uri, "experiment": "t"})
    script = ("import time\nfrom newllm.pipeline import run_stage\n"
              "def body(params, run):\n    print('started', flush=True)\n    time.sleep(60)\n"
              "run_stage('tokenize', body)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().startswith("tokenize: MLflow run ")
    assert proc.stdout.readline().strip() == "started"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 143
    err = proc.stderr.read().strip()
    assert "Traceback" not in err  # (MLflow's own store-creation log lines may come before)
    assert err.splitlines()[-1] == "error: tokenize: stopped by SIGTERM; MLflow run ended KILLED, no output kept"
    _, (r,) = _runs(uri)
    assert r.info.status == "KILLED"


def test_runs_left_running_by_a_dead_process_are_ended_killed(store):
    params, uri = store
    client, exp_id = tracking.init_store(params)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a pid that no longer runs

    def left_running(pid: int, stage: str = "tokenize", host: str = socket.gethostname()) -> str:
        tags = {"dvc.stage": stage, "dvc.exp_name": "workspace", tracking.PID_TAG: str(pid), tracking.HOST_TAG: host}
        return client.create_run(exp_id, tags=tags).info.run_id

    gone, live = left_running(dead.pid), left_running(os.getpid())
    remote, other_stage = left_running(dead.pid, host="another-machine"), left_running(dead.pid, stage="report")
    with tracking.stage_run("tokenize", params) as run:  # a stage ends its own stage's orphans
        run.finish({"vocab_size": 10})
    status = lambda run_id: client.get_run(run_id).info.status  # noqa: E731
    assert status(gone) == "KILLED" and "ended without closing" in client.get_run(gone).data.tags[tracking.END_REASON_TAG]
    assert status(live) == status(remote) == status(other_stage) == "RUNNING"
    tracking.sync(params, ["tokenize"])  # sync, every stage's
    assert status(other_stage) == "KILLED" and status(live) == status(remote) == "RUNNING"


def test_sync_replays_files_once(store):
    params, uri = store
    cell = "seeds/lstm/seed1"
    tracking.write_metrics(Path(f"reports/metrics/{cell}.json"), {"val_ppl": 12.5, "lr": 0.003})
    tracking.write_plot(Path(f"reports/plots/{cell}.csv"), [{"step": 0, "val_loss": 3.0}, {"step": 1, "val_loss": 2.5}])
    assert tracking.sync(params, [cell, "tokenize"]) == [cell]
    assert tracking.sync(params, [cell, "tokenize"]) == []
    client, runs = _runs(uri)
    assert len(runs) == 1 and runs[0].data.tags["newllm.synced"] == "true"
    assert [m.value for m in client.get_metric_history(runs[0].info.run_id, "curves/val_loss")] == [3.0, 2.5]
    assert runs[0].data.metrics["summary/val_ppl"] == 12.5
    assert runs[0].data.params["seed"] == "1"  # the cell's seed, not params.yaml's
    assert runs[0].data.params["lr"] == "0.003"  # the lr it was trained with, as the stage itself logs it


def test_unreachable_server_fails_within_seconds(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{port}")
    t0 = time.time()
    with pytest.raises(tracking.TrackingError, match=f"127.0.0.1:{port}"):
        tracking.init_store(default_params())
    assert time.time() - t0 < 5


def test_store_lives_under_dvc_root(monkeypatch, tmp_path: Path):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path / "user-repo"))
    assert tracking.tracking_uri(default_params()) == f"sqlite:///{tmp_path / 'user-repo' / 'mlflow.db'}"


def test_stage_runs_nest_under_one_parent_per_experiment_named_by_what_it_changed(store, tmp_path: Path):
    params, uri = store
    params_file = write_params(tmp_path / "params.yaml", tracking={"uri": uri, "experiment": "t"})
    for cmd in (["init", "-q"], ["add", "params.yaml"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "p"]):
        subprocess.run(["git", *cmd], cwd=tmp_path, check=True, env=env())
    assert params_file.is_file()
    for p in (params, params, default_params(tracking={"uri": uri, "experiment": "t"}, context_dim=128)):
        with tracking.stage_run("tokenize", p) as run:
            run.finish({"vocab_size": 1})
    client, (a, b, c) = _runs(uri)
    _, parents = _runs(uri, parents=True)
    rev = tracking.git_commit()[:7]
    by_name = {r.info.run_name.removesuffix(f" @ {rev}"): r for r in parents}
    assert set(by_name) == {"baseline", "context_dim=128"}  # a rerun of the same experiment reattaches
    assert all(r.info.run_name.endswith(f" @ {rev}") for r in parents)  # each commit has its own baseline
    assert all(r.info.status == "FINISHED" for r in parents)
    assert by_name["context_dim=128"].data.params == {"context_dim": "128"}  # the changes as columns
    parent_of = lambda r: r.data.tags[tracking.PARENT_ID_TAG]  # noqa: E731
    assert parent_of(a) == parent_of(b) == by_name["baseline"].info.run_id
    assert parent_of(c) == by_name["context_dim=128"].info.run_id
    assert c.data.tags[tracking.CHANGED_TAG] == "context_dim=128"


def test_speed_figures_go_to_the_timing_file_not_the_metrics_file(store):
    params, uri = store
    with tracking.stage_run(CELL, params) as run:
        run.finish({"val_loss": 1.5, "tokens_per_s": 1234.5, "train_wall_time_s": 2.0})
    assert json.loads(Path(f"reports/metrics/{CELL}.json").read_text()) == {"val_loss": 1.5}
    assert json.loads(Path(f"reports/timing/{CELL}.json").read_text()) == {"tokens_per_s": 1234.5,
                                                                          "train_wall_time_s": 2.0}
    _, (r,) = _runs(uri)
    assert r.data.metrics["summary/tokens_per_s"] == 1234.5  # MLflow keeps both


def test_a_run_logs_its_token_cache_as_mlflow_datasets(store, tmp_path: Path):
    import numpy as np

    from newllm.data.token_cache import TokenCache

    params, uri = store
    ids = {s: np.arange(n, dtype=np.int32) for s, n in (("train", 50), ("val", 20), ("test", 10))}
    cache = TokenCache(tmp_path, {"kind": "word", "vocab_size": 60}, **ids)
    with tracking.stage_run(CELL, params) as run:
        run.log_dataset(cache, "template")
        run.finish({"val_loss": 1.0})
    client, (r,) = _runs(uri)
    inputs = client.get_run(r.info.run_id).inputs.dataset_inputs
    by_split = {next(t.value for t in i.tags if t.key == "mlflow.data.context"): i.dataset for i in inputs}
    assert set(by_split) == {"train", "val", "test"}
    assert {d.name for d in by_split.values()} == {"template/word60"}
    assert json.loads(by_split["val"].profile) == {"tokens": 20}


def test_a_trained_checkpoint_is_a_logged_model_pointing_at_the_dvc_tracked_file(store):
    import hashlib

    params, uri = store
    with tracking.stage_run(CELL, params) as run:
        ckpt = Path(run.declared.outs[0])  # data/checkpoints/sweep/phase2_train/lr0.001.pt
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"the weights")
        run.finish({"val_loss": 1.5})
    client, (r,) = _runs(uri)
    (m,) = client.search_logged_models(experiment_ids=[r.info.experiment_id])
    assert m.source_run_id == r.info.run_id and m.status.to_int() == m.status.READY.to_int()
    assert m.tags["dvc.path"] == str(ckpt) and m.tags["dvc.md5"] == hashlib.md5(b"the weights").hexdigest()
    assert [o.model_id for o in client.get_run(r.info.run_id).outputs.model_outputs] == [m.model_id]  # Models column
    with tracking.stage_run("tokenize", params):  # no checkpoint among its outs: no model
        pass
    assert len(client.search_logged_models(experiment_ids=[r.info.experiment_id])) == 1


def test_a_store_without_logged_models_does_not_fail_a_finished_stage(store, monkeypatch, capsys):
    params, uri = store

    def no_models(*args):
        raise RuntimeError("this server has no logged-models API")

    monkeypatch.setattr(tracking.runs, "_log_checkpoint", no_models)
    with tracking.stage_run(CELL, params) as run:
        ckpt = Path(run.declared.outs[0])
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        ckpt.write_bytes(b"the weights")
        run.finish({"val_loss": 1.5})
    _, (r,) = _runs(uri)
    assert r.info.status == "FINISHED" and json.loads(Path(f"reports/metrics/{CELL}.json").read_text()) == {"val_loss": 1.5}
    assert "was not logged as an MLflow model (RuntimeError: this server has no logged-models API)" in capsys.readouterr().err
