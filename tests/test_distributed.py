"""torch DDP under torchrun (distributed.py): 2 CPU processes (gloo) train a stage (a next-token cell,
Phase 1) to the single-process numbers, with one MLflow run and one set of outputs; a rank that dies
takes the job down."""

import json
import os
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

import pytest
from faults import copy_of, set_params
from helpers import env, ran_stages, run

pytestmark = pytest.mark.slow

CELLS = {"baseline_sweep@lstm-0.01": "sweep/lstm/lr0.01", "phase2_sweep@0.01": "sweep/phase2_train/lr0.01"}


def _metrics(project: Path, record: str) -> dict:
    return json.loads((project / f"reports/metrics/{record}.json").read_text())


def _runs(project: Path, record: str) -> list[tuple[str, str]]:
    with sqlite3.connect(project / "mlflow.db") as con:
        return con.execute("select r.run_uuid, r.status from runs r join tags t on t.run_uuid = r.run_uuid "
                           "where t.key = 'dvc.stage' and t.value = ? order by r.start_time", (record,)).fetchall()


def test_two_processes_train_to_the_single_process_numbers(reproduced: Path, tmp_path: Path):
    project = copy_of(reproduced, tmp_path, "p")  # reproduced: conftest.py (New-LLM has no dropout)
    # no dropout: two processes then differ from one only in the order of float sums
    set_params(project, {"lstm": {"dropout": 0.0, "epochs": 3}})
    one = run(["dvc", "repro", "baseline_sweep@lstm-0.01"], project)
    assert "torch.distributed.run" not in one.stdout + one.stderr
    single = {r: _metrics(project, r) for r in CELLS.values()}
    phase1_single = _metrics(project, "phase1/seed0")
    set_params(project, {"distributed": {"nproc": 2}})
    stale = {s.split("@")[0] for s in json.loads(run(["dvc", "status", "--json"], project).stdout)}
    assert {"phase1_cvfp", "phase1_seeds", "phase2_sweep", "baseline_sweep"} <= stale, stale  # every training stage
    assert not stale & {"generate_dataset", "tokenize", "param_budget"}, stale  # the data stages never
    # -s: Phase 1 (nproc is its param too) is not retrained yet, so Phase 2 reads the same checkpoint
    two = run(["dvc", "repro", "-s", *CELLS], project)
    ran = ran_stages(two.stdout)
    assert ran == set(CELLS), ran
    for record in CELLS.values():
        a, b = single[record], _metrics(project, record)
        assert (b["train_tokens"], b["val_tokens"], b["epochs_run"]) == (a["train_tokens"], a["val_tokens"], a["epochs_run"])
        for key in ("val_loss", "test_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), (record, key)  # float sums only
        runs = _runs(project, record)
        assert runs[-1][1] == "FINISHED" and len(runs) == (3 if "lstm" in record else 2), runs  # rank 1 logs nothing
    log = two.stdout + two.stderr
    assert log.count("sweep/lstm/lr0.01: best val loss") == 1  # rank 1 prints nothing but errors

    # Phase 1 over 2 processes, each a block of the positions: one process's run up to float sums, which
    # Adam amplifies (tests/training/test_phase1.py checks the same with the weights held still)
    p1 = run(["dvc", "repro", "-s", "phase1_cvfp"], project, extra_env={"OMP_NUM_THREADS": None})
    assert ran_stages(p1.stdout) == {"phase1_cvfp"}
    assert "OMP_NUM_THREADS" in p1.stderr  # torchrun's banner (printed when the variable is unset): it started them
    got = _metrics(project, "phase1/seed0")
    assert (got["iterations_run"], got["train_tokens"]) == (phase1_single["iterations_run"], phase1_single["train_tokens"])
    for key in ("train_er_pct", "val_er_pct", "convergence_rate", "sequential_cosine"):
        assert got[key] == pytest.approx(phase1_single[key], rel=1e-2), key
    runs = _runs(project, "phase1/seed0")
    assert runs[-1][1] == "FINISHED" and len(runs) == 2, runs  # the reproduced run and rank 0's
    assert (project / "data/checkpoints/phase1/seed0.pt").is_file() and not (project / "data/tmp/phase1_seed0").exists()


def _worker_pids(rank: int, project: Path) -> list[int]:
    """PIDs of the torchrun workers of the given rank (their environment says RANK=<rank>) running a stage of
    `project` (their working folder): never another test's, which may run DDP at the same time (xdist)."""
    found = []
    for d in Path("/proc").iterdir():
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
            cmd = (d / "cmdline").read_bytes()
            cwd = (d / "cwd").resolve()
        except (OSError, ValueError):
            continue
        if (f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b" ".join(environ) and b"stages/" in cmd
                and cwd == project.resolve()):
            found.append(int(d.name))
    return found


def test_a_rank_that_dies_takes_the_job_down_and_leaves_no_output(reproduced: Path, tmp_path: Path):
    project = copy_of(reproduced, tmp_path, "p")
    set_params(project, {"distributed": {"nproc": 2}, "lstm": {"epochs": 200}})  # long enough to be killed
    record = CELLS["baseline_sweep@lstm-0.01"]
    before = len(_runs(project, record))
    proc = subprocess.Popen(["dvc", "repro", "baseline_sweep@lstm-0.01"], cwd=project, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 120
    while not (pids := _worker_pids(1, project)) or len(_runs(project, record)) == before:
        assert proc.poll() is None and time.monotonic() < deadline, "the 2-process stage did not start"
        time.sleep(0.5)
    time.sleep(2)  # into training
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, out[-2000:]
    assert "ChildFailedError" in out or "failed" in out.lower(), out[-2000:]
    assert not (project / "data/checkpoints/sweep/lstm/lr0.01.pt").exists()  # no half-written output
    assert not (project / f"reports/metrics/{record}.json").exists()
    runs = _runs(project, record)
    assert len(runs) == before + 1 and runs[-1][1] in ("KILLED", "FAILED"), runs  # never left RUNNING
