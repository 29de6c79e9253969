"""Test helpers: the project's params (with overrides), tiny params, and a throw-away copy of the project
in its own git + DVC repo."""

import dataclasses
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DVC_NO_ANALYTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One torch thread per process: `make test` runs 4 workers, each starting stages, on 2 cores; a thread
# pool per process only oversubscribes them (measured: tests/training + test_tracking.py, 4 workers,
# 214.7 s at 2 threads, 102.7 s at 1).
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.pop("MLFLOW_TRACKING_URI", None)

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
VENV_BIN = Path(sys.executable).parent

# Tiny settings: every stage of the pipeline runs in seconds on 2 cores.
TINY_PARAMS = {
    "dataset": {"num_sentences": 60},
    "context_dim": 16, "embed_dim": 16, "context_layers": 2, "token_layers": 2,
    "phase1": {"iterations": 3},
    "train": {"epochs": 2, "batch_size": 4, "seq_len": 8},
    "transformer": {"n_layer": 1, "n_head": 2},
    "lstm": {"embed_dim": 16, "hidden_dim": 16, "num_layers": 1},
    "cvp": {"embed_dim": 16, "context_dim": 16, "hidden_dim": 16},
    "report": {"memory_lengths": [64, 128], "max_new_tokens": 5, "context_window": 16},
    "protocol": {"lrs": [0.01], "replicates": [1]},  # one lr, two seeds: each cell kind once
}


def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def default_params(**overrides):
    """The project's params.yaml (the one place defaults live) with nested overrides, validated."""
    from newllm.config import parse_params

    return parse_params(merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides))


def write_params(path: Path, **overrides) -> Path:
    """The project's params.yaml with nested overrides, written to `path` (a complete, valid params file)."""
    path.write_text(yaml.safe_dump(merge(yaml.safe_load((REPO / "params.yaml").read_text()), overrides)))
    return path


def section(name: str, **overrides):
    """One section of the default params with some keys changed, e.g. section("lstm", hidden_dim=8)."""
    return dataclasses.replace(getattr(default_params(), name), **overrides)


def use_project_dvc_yaml(cwd: Path) -> None:
    """Stages read their params and outs from ./dvc.yaml: tests that run them in a temp dir need it there."""
    shutil.copy(REPO / "dvc.yaml", cwd / "dvc.yaml")


def env() -> dict:
    e = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "MLFLOW_TRACKING_URI"):
        e.pop(k, None)
    return e


def run(cmd: list[str], cwd: Path, check: bool = True, timeout: int = 600,
        extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """`cmd` in `cwd` with the tests' environment; a None in `extra_env` unsets that variable."""
    e = {k: v for k, v in {**env(), **(extra_env or {})}.items() if v is not None}
    res = subprocess.run(cmd, cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
    if check and res.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
    return res


def ran_stages(output: str) -> set[str]:
    """The stages a `dvc repro` / `dvc exp run` output says it ran ("Running stage 'name':")."""
    return set(re.findall(r"^Running stage '([^']+)'", output, flags=re.M))


def make_project(dest: Path, overrides: dict | None = None) -> Path:
    """A copy of this project in its own git repo (with DVC initialised), params merged with overrides."""
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", "stages", "src", ".dvcignore", ".gitignore"):
        src = REPO / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        else:
            shutil.copy2(src, dest / name)
    (dest / "reports" / "metrics").mkdir(parents=True)
    (dest / "reports" / "plots").mkdir(parents=True)
    params = merge(yaml.safe_load((REPO / "params.yaml").read_text()), merge(TINY_PARAMS, overrides or {}))
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "test@example.invalid"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run(["dvc", "init", "-q"], dest)
    shutil.copy2(REPO / ".dvc" / "config", dest / ".dvc" / "config")  # the project's DVC settings (plots template)
    run(["git", "add", "-A"], dest)
    run(["git", "commit", "-qm", "init"], dest)
    return dest
