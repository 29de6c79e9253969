"""Where the default pipeline's wall time goes: each stage's own work against its fixed cost (issue 23).

A scratch copy of the project (this working tree, or `--rev REV` as committed: a fresh clone, its own
git, DVC cache and MLflow store) runs what README's loop runs, each timed:

    `make run`'s recipe (as the copy's Makefile says)  the whole default pipeline, from nothing
    `dvc repro` again                                 the no-op: every stage cached
    `dvc exp run -S context_dim=128`                  the documented ablation

Per stage, in a table: `wall` is the stage process as DVC ran it (a `python` shim first on PATH stamps its
start and end); `work` is the time its MLflow run was open (the stage's own loading, training,
evaluation, report building, with its logging); `fixed` = wall - work: interpreter, imports, opening the
store, the harness. `dvc` is what DVC itself spends around the stages (hashing, lock, run-cache):
the command's wall minus its stages' walls. Stages run one after another, so the intervals never overlap.

    .venv/bin/python benchmarks/overhead.py                   # this working tree
    .venv/bin/python benchmarks/overhead.py --rev cb4c12c     # a commit, for the before/after table
    .venv/bin/python benchmarks/overhead.py --skip-exp --json benchmarks/results/overhead.json

Time it on an idle machine: another heavy job on the cores changes every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
SHIM = """#!/bin/sh
# DVC's `python` for the stages: stamps each stage process's start and end (benchmarks/overhead.py)
s=$(date +%s.%N)
"{python}" "$@"
rc=$?
printf '%s %s %s\\n' "$s" "$(date +%s.%N)" "$*" >> "{log}"
exit $rc
"""


def scratch(dest: Path, rev: str | None) -> Path:
    """A fresh clone of `rev`, or of this working tree (tracked and untracked, not ignored, files)."""
    if rev:
        subprocess.run(["git", "clone", "-q", "--no-local", str(REPO), str(dest)], check=True)
        subprocess.run(["git", "checkout", "-q", rev], cwd=dest, check=True)
        return dest
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src, out = REPO / name, dest / name
        if src.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(src.read_bytes())
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "scratch"]):
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True)
    return dest


def environment(proj: Path, log: Path, cold: bool) -> dict[str, str]:
    shim_dir = proj.parent / "shim"
    shim_dir.mkdir(exist_ok=True)
    shim = shim_dir / "python"
    shim.write_text(SHIM.format(python=VENV_BIN / "python", log=log))
    shim.chmod(0o755)
    env = {**os.environ, "PATH": f"{shim_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": str(proj / "src"),  # the scratch copy's code, not this checkout's editable install
           "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
           "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid",
           # a warm server of this scratch copy's own (a new key), started by its first stage like a user's
           "NEWLLM_WARM_IDLE_S": "61"}
    for k in ("DVC_ROOT", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "MLFLOW_TRACKING_URI"):
        env.pop(k, None)
    if cold:
        env["NEWLLM_WARM"] = "0"
    return env


def make_run_recipe(proj: Path) -> list[list[str]]:
    """The commands `make run` runs after its install step, read from `proj`'s own Makefile (so a `--rev`
    is timed as its users ran it), with this interpreter's venv in place of the copy's `.venv`."""
    out = subprocess.run(["make", "-s", "-n", "-o", ".venv/.installed", "run"], cwd=proj, capture_output=True,
                         text=True, check=True).stdout
    recipe = []
    for line in out.splitlines():
        argv = [str(VENV_BIN / a.removeprefix(".venv/bin/")) if a.startswith(".venv/bin/") else a
                for a in shlex.split(line, comments=True)]
        if argv:
            recipe.append(argv)
    return recipe


def timed(cmd: list[str], proj: Path, env: dict[str, str], out: Path) -> tuple[float, float, float]:
    t0 = time.time()
    with out.open("ab") as f:
        f.write(f"\n$ {shlex.join(cmd)}\n".encode())
        f.flush()
        rc = subprocess.run(cmd, cwd=proj, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    t1 = time.time()
    if rc != 0:
        sys.exit(f"{shlex.join(cmd)} exited {rc}; see {out}")
    return t0, t1, t1 - t0


def stage_intervals(log: Path, t0: float, t1: float) -> list[tuple[float, float, str]]:
    rows = []
    for line in log.read_text().splitlines() if log.is_file() else []:
        s, e, argv = line.split(" ", 2)
        if t0 <= float(s) <= t1:
            rows.append((float(s), float(e), argv))
    return rows


def run_times(store: Path) -> list[tuple[float, float, str]]:
    """(start, end, dvc.stage tag) of every stage run in the MLflow store, in seconds."""
    with sqlite3.connect(store) as db:
        q = ("select r.start_time, r.end_time, t.value from runs r join tags t on t.run_uuid = r.run_uuid "
             "where t.key = 'dvc.stage' and r.end_time is not null")
        return [(s / 1000, e / 1000, stage) for s, e, stage in db.execute(q)]


def table(name: str, command_wall: float, stages: list[tuple[float, float, str]],
          runs: list[tuple[float, float, str]]) -> dict:
    rows = []
    for s, e, argv in stages:
        inside = [(rs, re_, tag) for rs, re_, tag in runs if s - 0.5 <= rs and re_ <= e + 0.5]
        work = sum(re_ - rs for rs, re_, _ in inside)
        label = inside[0][2] if inside else argv.removeprefix("stages/").removesuffix(".py")
        rows.append({"stage": label, "argv": argv, "wall_s": round(e - s, 3), "work_s": round(work, 3),
                     "fixed_s": round(e - s - work, 3)})
    walls = sum(r["wall_s"] for r in rows)
    fixed = sum(r["fixed_s"] for r in rows)
    summary = {"command": name, "wall_s": round(command_wall, 2), "stages": len(rows),
               "stage_wall_s": round(walls, 2), "work_s": round(walls - fixed, 2), "fixed_s": round(fixed, 2),
               "dvc_s": round(command_wall - walls, 2),
               "fixed_per_stage_median_s": round(statistics.median([r["fixed_s"] for r in rows]), 3) if rows else None,
               "fixed_share": round((command_wall - (walls - fixed)) / command_wall, 3) if command_wall else None}
    print(f"\n## {name}: {command_wall:.1f} s wall, {len(rows)} stages")
    if rows:
        print(f"{'stage':<40} {'wall s':>8} {'work s':>8} {'fixed s':>8}")
        for r in rows:
            print(f"{r['stage'][:40]:<40} {r['wall_s']:8.2f} {r['work_s']:8.2f} {r['fixed_s']:8.2f}")
    print(f"stages: wall {walls:.1f} s = work {walls - fixed:.1f} s + fixed {fixed:.1f} s "
          f"(median {summary['fixed_per_stage_median_s']} s a stage); DVC around them {summary['dvc_s']:.1f} s; "
          f"everything but the stages' own work: {summary['fixed_share']:.0%} of the wall" if rows else
          f"no stage ran; DVC {command_wall:.2f} s")
    return {**summary, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rev", help="a commit to measure (default: this working tree)")
    ap.add_argument("--cold", action="store_true", help="NEWLLM_WARM=0: every stage in a fresh interpreter")
    ap.add_argument("--skip-exp", action="store_true", help="skip the dvc exp run")
    ap.add_argument("--exp", default="context_dim=128", help="the ablation's -S (default context_dim=128)")
    ap.add_argument("--json", type=Path, help="write the tables here")
    ap.add_argument("--keep", type=Path, help="build the scratch copy here and keep it")
    ap.add_argument("--save-metrics", type=Path, help="copy make run's reports/metrics here (before the ablation)")
    a = ap.parse_args()

    tmp = Path(a.keep or tempfile.mkdtemp(prefix="newllm-overhead-"))
    proj = scratch(tmp / "proj", a.rev)
    log, out = tmp / "stage_times.txt", tmp / "output.log"
    env = environment(proj, log, a.cold)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=proj, capture_output=True, text=True).stdout
    print(f"scratch copy of {a.rev or 'the working tree'} ({commit.strip()}) at {proj}; output in {out}"
          + ("; cold (NEWLLM_WARM=0)" if a.cold else ""), flush=True)
    dvc = [str(VENV_BIN / "dvc")]
    results = []

    spans = [(argv, timed(argv, proj, env, out)) for argv in make_run_recipe(proj)]
    t0, t1 = spans[0][1][0], spans[-1][1][1]
    parts = " + ".join(f"{Path(argv[0]).name} {' '.join(argv[1:])} {s[2]:.1f} s" for argv, s in spans)
    store = proj / "mlflow.db"
    results.append(table(f"make run ({parts})", sum(s[2] for _, s in spans), stage_intervals(log, t0, t1),
                         run_times(store)))
    if a.save_metrics:
        shutil.copytree(proj / "reports" / "metrics", a.save_metrics, dirs_exist_ok=True)
    t0, t1, noop_s = timed([*dvc, "repro"], proj, env, out)
    results.append(table("dvc repro (no-op)", noop_s, stage_intervals(log, t0, t1), run_times(store)))
    if not a.skip_exp:
        t0, t1, exp_s = timed([*dvc, "exp", "run", "-S", a.exp], proj, env, out)
        results.append(table(f"dvc exp run -S {a.exp}", exp_s, stage_intervals(log, t0, t1), run_times(store)))
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps({"rev": a.rev or "working tree", "commit": commit.strip(), "cold": a.cold,
                                      "nproc": os.cpu_count(), "results": results}, indent=1) + "\n")
        print(f"\nwrote {a.json}")


if __name__ == "__main__":
    main()
