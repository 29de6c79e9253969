"""protocol.py: which cell holds a model's run on each seed, and the rule that picks an lr."""

import json
import math
from pathlib import Path

import pytest
from helpers import default_params

from newllm.errors import PipelineError
from newllm.protocol import cell, pick, runs


def test_pick_takes_the_lowest_finite_val_loss_and_breaks_ties_low():
    assert pick({0.001: 2.0, 0.003: 1.9, 0.01: 2.5}) == 0.003
    assert pick({0.001: 2.0, 0.003: math.nan, 0.01: math.inf}) == 0.001  # a non-finite cell is never chosen
    assert pick({0.01: 1.5, 0.001: 1.5}) == 0.001
    with pytest.raises(PipelineError, match="no cell of the lr sweep has a finite val loss"):
        pick({0.001: math.nan})


def test_a_cell_is_named_by_its_command_line(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    p = default_params(seed=3, protocol={"replicates": [4, 5]})
    c = cell(p, "lstm", ["--lr", "0.003"])
    assert (c.record, c.seed, c.lr) == ("sweep/lstm/lr0.003", 3, 0.003)  # a sweep cell runs on `seed`
    with pytest.raises(PipelineError, match="data/lr/lstm.json not found"):
        cell(p, "lstm", ["--seed", "4"])  # a replicate needs the pick first
    (tmp_path / "data/lr").mkdir(parents=True)
    (tmp_path / "data/lr/lstm.json").write_text(json.dumps({"lr": 0.01}))
    c = cell(p, "lstm", ["--seed", "4"])
    assert (c.record, c.seed, c.lr) == ("seeds/lstm/seed4", 4, 0.01)
    for bad in ([], ["--lr"], ["--seed", "x"], ["--epochs", "3"]):
        with pytest.raises(PipelineError, match="expected --lr <lr> or --seed <n>"):
            cell(p, "lstm", bad)


def test_runs_map_every_seed_to_its_cell_and_refuse_a_stale_pick(tmp_path: Path):
    p = default_params(protocol={"lrs": [0.001, 0.01], "replicates": [1, 2]})
    (tmp_path / "data/lr").mkdir(parents=True)
    (tmp_path / "data/lr/cvp.json").write_text(json.dumps({"lr": 0.01}))
    assert runs(p, "cvp", tmp_path) == {0: "sweep/cvp/lr0.01", 1: "seeds/cvp/seed1", 2: "seeds/cvp/seed2"}
    (tmp_path / "data/lr/cvp.json").write_text(json.dumps({"lr": 0.003}))  # picked under another sweep
    with pytest.raises(PipelineError, match="no longer lists: rerun `dvc repro`"):
        runs(p, "cvp", tmp_path)


def test_pick_lr_goes_on_when_no_cell_beat_its_initial_weights(tmp_path: Path, monkeypatch):
    """Every cell of one model at best epoch 0: that model still gets an lr (its lowest val loss), flagged,
    instead of stopping the whole pipeline; a model with an improved cell never picks a non-improved one."""
    import subprocess
    import sys

    from helpers import REPO, env, use_project_dvc_yaml, write_params

    from newllm.config import load_params, stages

    monkeypatch.chdir(tmp_path)
    use_project_dvc_yaml(tmp_path)
    write_params(tmp_path / "params.yaml", protocol={"lrs": [0.001, 0.01], "replicates": [1]},
                 tracking={"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "t"})
    declared = stages(load_params(tmp_path / "params.yaml"), tmp_path)
    for name, st in declared.items():
        if name.startswith("sweep/"):
            lr = float(name.rsplit("lr", 1)[1])
            never = name.startswith("sweep/cvp/")
            m = {"val_loss": 5.0 - lr if never else (2.0 if lr == 0.01 else 1.5), "best_epoch": 0 if never else 3}
            if name.startswith("sweep/lstm/"):  # lstm's lower val loss is in a cell that never improved
                m = {"val_loss": 1.0, "best_epoch": 0} if lr == 0.01 else {"val_loss": 3.0, "best_epoch": 2}
            st.metrics_file.parent.mkdir(parents=True, exist_ok=True)
            st.metrics_file.write_text(json.dumps(m))
    res = subprocess.run([sys.executable, str(REPO / "stages/pick_lr.py")], cwd=tmp_path, env=env(),
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    picked = json.loads((tmp_path / "reports/metrics/pick_lr.json").read_text())
    assert picked["cvp"]["never_improved"] and picked["cvp"]["lr"] == 0.01  # lowest val loss: 4.99
    assert picked["lstm"]["lr"] == 0.001 and not picked["lstm"]["never_improved"]
    assert "NO lr beat the initial weights" in res.stdout
