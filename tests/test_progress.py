"""progress.py: which stages a repro will run, judged from dvc.lock as DVC judges, and the `[stage N/M]`
lines a sequence of stages prints."""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from newllm import progress
from newllm.dag import Stage

OK = str(progress.PARAMS_OK)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def project(tmp_path: Path, monkeypatch) -> tuple[dict[str, Stage], dict, dict]:
    """validate -> data (reads param x, src/data.py) -> train; and `other` (src/other.py) beside them, with a
    dvc.lock that matches the workspace: nothing to run."""
    monkeypatch.chdir(tmp_path)
    files = {"params.yaml": "x: 1\n", "src/data.py": "a", "src/other.py": "b", OK: "valid\n",
             "data/d.json": "{}", "data/t.pt": "w", "data/o.txt": "o"}
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    st = {"validate": Stage("validate", "validate", "v", (), ("params.yaml",), (OK,), ()),
          "data": Stage("data", "data", "d", ("x",), (OK, "src/data.py"), ("data/d.json",), ()),
          "train": Stage("train", "train", "t", (), ("data/d.json",), ("data/t.pt",), ()),
          "other": Stage("other", "other", "o", (), ("src/other.py",), ("data/o.txt",), ())}
    lock = {s.name: {"cmd": s.cmd, "deps": [{"path": d, "md5": _md5(tmp_path / d)} for d in s.deps],
                     **({"params": {"params.yaml": {"x": 1}}} if s.params else {})} for s in st.values()}
    return st, lock, {"x": 1}


def test_a_matching_lock_plans_nothing(project):
    stages, lock, raw = project
    assert progress.plan(stages, lock, raw, set()) == []


def test_a_changed_param_reruns_its_stage_and_what_is_downstream(project):
    stages, lock, raw = project
    assert progress.plan(stages, lock, {"x": 2}, set()) == ["data", "train"]


def test_an_edited_source_file_or_a_missing_output_reruns_that_stage(project, tmp_path: Path):
    stages, lock, raw = project
    (tmp_path / "src/other.py").write_text("edited")
    assert progress.plan(stages, lock, raw, set()) == ["other"]
    (tmp_path / "data/t.pt").unlink()
    assert progress.plan(stages, lock, raw, set()) == ["train", "other"]
    del lock["other"]  # a stage the lock has never seen
    (tmp_path / "src/other.py").write_text("b")
    assert progress.plan(stages, lock, raw, set()) == ["train", "other"]


def test_validate_reruns_nothing_downstream_and_an_unchanged_output_stops_the_rerun(project, tmp_path: Path):
    stages, lock, raw = project
    (tmp_path / "params.yaml").write_text("x: 1  # a comment\n")
    # validate is running: its marker is gone while it runs, and comes back with the same bytes
    (tmp_path / OK).unlink()
    assert progress.plan(stages, lock, raw, set(), running="validate") == []
    # data is running (x changed): train is planned until data's output is written ...
    assert progress.plan(stages, lock, {"x": 2}, {"validate"}, running="data") == ["train"]
    # ... and reruns only if the output differs from the one dvc.lock records
    assert progress.plan(stages, lock, {"x": 2}, {"validate", "data"}, running=None) == []
    (tmp_path / "data/d.json").write_text('{"new": 1}')
    assert progress.plan(stages, lock, {"x": 2}, {"validate", "data"}, running=None) == ["train"]


def test_stages_of_one_repro_count_up_and_estimate_the_rest(project, monkeypatch, capsys):
    stages, lock, raw = project
    Path("dvc.lock").write_text(json.dumps({"stages": lock}))  # JSON is YAML
    Path("params.yaml").write_text("x: 2\n")  # data and train rerun; validate too (its dep changed)
    monkeypatch.setenv(progress.REPRO_ENV, "123-456")
    lines, claims = [], []
    for name in ("validate", "data", "train"):
        tick = progress.begin(stages, name)
        lines.append(capsys.readouterr().out.strip())
        claims.append(tick.claim_parent())
        tick.finish()
    assert [line.split(":")[0] for line in lines] == ["[stage 1/3] validate", "[stage 2/3] data", "[stage 3/3] train"]
    assert "elapsed" in lines[0] and "left" not in lines[0]  # nothing has finished yet: no estimate
    assert lines[1].endswith(" left") and claims == [True, False, False]  # the parent is named once per repro
    # the next repro estimates from the durations this one recorded
    monkeypatch.setenv(progress.REPRO_ENV, "789-1")
    assert progress.begin(stages, "validate") is not None
    assert capsys.readouterr().out.strip().endswith(" left")


def test_outside_dvc_a_stage_prints_no_progress(project, monkeypatch, capsys):
    stages, _, _ = project
    monkeypatch.delenv(progress.REPRO_ENV, raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    assert progress.begin(stages, "data") is None and capsys.readouterr().out == ""


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc (Linux)")
def test_the_repro_is_the_nearest_dvc_process(tmp_path: Path):
    """A process named `dvc` that starts a stage through a shell, as DVC does: the stage finds that process."""
    fake = tmp_path / "dvc"
    fake.write_text(f'#!/bin/sh\necho "$$"\n/bin/sh -c \'"{sys.executable}" -c "from newllm import progress; '
                    f'print(progress.repro_key())"\'\n')
    fake.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != progress.REPRO_ENV}
    out = subprocess.run([str(fake)], capture_output=True, text=True, env={**env, "DVC_STAGE": "data"}, check=True)
    pid, key = out.stdout.split()
    assert key.split("-")[0] == pid and key.split("-")[1].isdigit()  # <pid>-<its start time in clock ticks>
