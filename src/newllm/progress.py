"""`[stage N/M]` lines across one `dvc repro` (or `dvc exp run`): DVC runs each stage as its own process and
prints no overall progress, so every stage reads and updates one small file per DVC process.

- the repro: the nearest ancestor process whose command is `dvc`, as `<pid>-<start ticks>` (a reused pid
  never matches); found before a stage hands itself to a warm process, and passed on in REPRO_ENV;
- M, the stages this repro runs: those started so far, and those still to run as planned again by each
  stage from dvc.lock, as DVC decides: a stage reruns when it has no lock entry, its command or a param
  it reads changed, a source file it depends on changed (md5, as dvc.lock records it), an output is
  missing, or an output it depends on changes. DVC may instead restore a planned stage from its run-cache
  without starting it, so M can only fall as the repro goes;
- the estimate for the rest: each remaining planned stage's share of the wall time the last time it ran
  here (from its start to the next stage's: DVC's own work between stages included; kept in DURATIONS),
  else the mean share of this repro's stages so far.

Linux only (/proc); elsewhere, and outside DVC, a stage prints nothing of this. Torch- and MLflow-free.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

import yaml

from newllm import dag
from newllm.records import atomic_write

PROGRESS_DIR = Path("data/tmp/progress")  # git- and DVC-ignored (data/*), per working copy
DURATIONS = PROGRESS_DIR / "durations.json"  # stage name -> seconds its last run here took
REPRO_ENV = "NEWLLM_REPRO"
PARAMS_OK = Path("data/params_ok")  # stages/validate.py's output: the same bytes whenever params.yaml is valid
KEEP = 20  # progress files of finished repros kept (each is a few KB)


def repro_key() -> str | None:
    """This stage's `dvc` process as `<pid>-<start ticks>`, or None when DVC did not start it (or no /proc)."""
    if os.environ.get(REPRO_ENV):
        return os.environ[REPRO_ENV]
    if "DVC_STAGE" not in os.environ:  # DVC sets it for every stage command
        return None
    pid = os.getppid()
    with contextlib.suppress(OSError, ValueError, IndexError):
        while pid > 1:
            stat = Path(f"/proc/{pid}/stat").read_text()
            fields = stat[stat.rindex(")") + 2:].split()  # after `pid (comm)`: state, ppid, ...
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[:3]
            if any(Path(a.decode(errors="replace")).name == "dvc" for a in argv):  # `dvc …`, `python …/dvc …`, `-m dvc`
                return f"{pid}-{fields[19]}"  # field 22 of stat: start time in clock ticks
            pid = int(fields[1])
    return None


def _md5(path: Path) -> str | None:
    try:
        return hashlib.md5(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _value(raw: dict[str, Any], key: str) -> Any:
    node: Any = raw
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def plan(stages: dict[str, dag.Stage], lock: dict[str, Any], raw_params: dict[str, Any], ran: set[str],
         running: str | None = None, root: Path = Path(".")) -> list[str]:
    """The DVC names of the stages still to run after `running` (module docstring), judged against `lock`
    (dvc.lock's `stages`) and `raw_params` (params.yaml as written); `ran`: the stages this repro has run
    before it. A rerun
    stage's file output that still has the bytes dvc.lock records reruns nothing downstream, as in DVC;
    one still to run is taken to change, except PARAMS_OK, which stages/validate.py writes identically."""
    produced = {p: s.name for s in stages.values() for p in s.outs + s.records}
    hashes: dict[Path, str | None] = {}  # a source file is a dep of many stages: hash it once

    def md5(path: Path) -> str | None:
        if path not in hashes:
            hashes[path] = _md5(path)
        return hashes[path]

    own: set[str] = set()  # stale for a reason of their own
    for s in stages.values():
        entry = lock.get(s.name)
        locked = ((entry or {}).get("params") or {}).get("params.yaml", {})
        if (entry is None or entry.get("cmd") != s.cmd or any(not (root / o).exists() for o in s.outs)
                or any(_value(raw_params, k) != v for k, v in locked.items())
                or any(d["path"] not in produced and (root / d["path"]).is_file() and md5(root / d["path"]) != d.get("md5")
                       for d in entry.get("deps") or [])):
            own.add(s.name)
    stale = (own - ran) | ({running} if running else set())
    locked_deps = {s.name: {d["path"]: d.get("md5") for d in (lock.get(s.name) or {}).get("deps") or []}
                   for s in stages.values()}

    def changes(producer: str, stage: dag.Stage, dep: str) -> bool:
        if producer in ran:  # its output is written: compare what the lock recorded (a folder: assume changed)
            path = root / dep
            return not path.is_file() or md5(path) != locked_deps[stage.name].get(dep)
        return producer in stale and dep != str(PARAMS_OK)

    grew = True
    while grew:  # downstream of a stage whose output changes
        grew = False
        for s in stages.values():
            if s.name in stale or s.name in ran:
                continue
            if any(changes(producer, s, dep) for out, producer in produced.items() for dep in s.deps
                   if producer != s.name and dag.produces(out, dep)):
                stale.add(s.name)
                grew = True
    return [s.name for s in stages.values() if s.name in stale and s.name != running]


def _read(path: Path) -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        return json.loads(path.read_text())
    return {}


def _write(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, json.dumps(data))


def _clock(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def _prune() -> None:
    files = sorted((p for p in PROGRESS_DIR.glob("repro-*.json")), key=lambda p: p.stat().st_mtime)
    for old in files[:-KEEP]:
        old.unlink(missing_ok=True)


class Progress:
    """One stage's place in its repro: `start` prints its `[stage N/M]` line, `finish` records its time."""

    def __init__(self, key: str, name: str):
        self.key, self.name = key, name
        self.path = PROGRESS_DIR / f"repro-{key}.json"
        self.t0 = time.time()
        self.first = False  # the first stage of its repro that opened an MLflow run: it names the parent

    def start(self, stages: dict[str, dag.Stage], raw_params: dict[str, Any]) -> str:
        state = _read(self.path)
        if not state:
            state = {"t0": self.t0, "started": [], "starts": {}, "took": {}}
            _prune()
        history = _read(DURATIONS)
        if self.name not in state["started"]:
            if state["started"]:  # the previous stage's share of the wall time: its own work and DVC's after it
                previous = state["started"][-1]
                state["took"][previous] = history[previous] = round(self.t0 - state["starts"][previous], 2)
                _write(DURATIONS, history)
            state["started"].append(self.name)
            state["starts"][self.name] = self.t0
        lock = (dag.read_yaml(Path("dvc.lock")) or {}).get("stages", {}) if Path("dvc.lock").is_file() else {}
        rest = plan(stages, lock, raw_params, set(state["started"]) - {self.name}, self.name)
        n = state["started"].index(self.name) + 1
        m = len(state["started"]) + len(rest)
        took = state["took"]
        mean = sum(took.values()) / len(took) if took else None
        guesses = [history.get(s, mean) for s in rest]
        left = "" if not rest or None in guesses else f", about {_clock(sum(guesses))} left"
        _write(self.path, state)
        return f"[stage {n}/{m}] {self.name}: {_clock(self.t0 - state['t0'])} elapsed{left}"

    def claim_parent(self) -> bool:
        """True once per repro: for the first stage that opens an MLflow run (it prints the parent's URL)."""
        state = _read(self.path)
        if not state or state.get("parent_shown"):
            return False
        state["parent_shown"] = True
        _write(self.path, state)
        return True

    def finish(self) -> None:
        """Its own duration, until the next stage of the repro replaces it by its whole share (begin)."""
        history = _read(DURATIONS)
        history[self.name] = round(time.time() - self.t0, 2)
        _write(DURATIONS, history)


def begin(stages: dict[str, dag.Stage], record: str, params_path: Path = Path("params.yaml")) -> Progress | None:
    """Print this stage's `[stage N/M]` line and return its Progress (None outside a DVC repro). Never
    fails a stage: progress is a courtesy, so any error here only drops the line."""
    key = repro_key()
    if key is None or record not in stages:
        return None
    try:
        progress = Progress(key, stages[record].name)
        raw = yaml.load(params_path.read_text(), Loader=dag._LOADER) or {}
        print(progress.start(stages, raw), flush=True)
        return progress
    except Exception:  # noqa: BLE001 (see the docstring)
        return None
