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
    assert pick({0.001: 2.0, 0.003: math.nan, 0.01: math.inf}) == 0.001  # a never-improved cell (inf) is never chosen
    assert pick({0.01: 1.5, 0.001: 1.5}) == 0.001
    with pytest.raises(PipelineError, match="no cell of the lr sweep beat its initial weights"):
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
