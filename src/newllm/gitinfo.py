"""What git and DVC say about this workspace: its root, its commit, the DVC experiment it runs as and the
commit that experiment starts from, a file as committed, and what the params changed against it. No MLflow."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from newllm.config import Params


def project_root() -> Path:
    """DVC_ROOT when DVC runs us (under `dvc exp run --temp` that is the user's repo, not the temp copy)."""
    if os.environ.get("DVC_ROOT"):
        return Path(os.environ["DVC_ROOT"]).resolve()
    here = Path.cwd().resolve()
    for d in (here, *here.parents):
        if (d / "dvc.yaml").is_file() or (d / ".dvc").is_dir():
            return d
    return here



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
