"""The fault suite: every fault a user meets, tried for real on a scratch copy of the pipeline (tiny params,
its own git + DVC repo and MLflow store), each giving one row of the table `benchmarks/faults.py` prints:
what happened, seconds to fail or recover, outputs left for DVC to cache (0 for a failure), MLflow runs left
RUNNING (0), and, for a resume, whether metrics and checkpoint bytes equal the uninterrupted run's.

`base_project(dir)` builds and runs the scratch pipeline once; each fault works on its own copy of it.
tests/test_faults.py asserts every row."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import yaml
from helpers import env, make_project, merge, run

# Phase 2, the Phase 1 controls and one baseline, one lr, two seeds; the LSTM trains long enough to kill.
BASE = {"baselines": ["lstm"], "lstm": {"epochs": 60, "patience": 0}}
KILL_STAGE, KILL_RECORD = "baseline_sweep@lstm-0.01", "sweep/lstm/lr0.01"
TIMING = re.compile(r"time|_s$|per_s|tokens_per")


@dataclass
class Row:
    fault: str
    happened: str  # the one line the user sees, or what was checked
    seconds: float  # to fail (a refusal) or to recover (a resume)
    cached: int  # outputs of the failed stage left on disk or recorded in dvc.lock
    running: int  # MLflow runs left RUNNING
    identical: str = "-"  # resume: metrics and checkpoint md5 equal the uninterrupted run's
    ok: bool = True  # the behaviour the fault must give (tests assert it)


# ----------------------------------------------------------------------------------------------- scratch
def base_project(root: Path) -> Path:
    """The scratch pipeline, reproduced and committed (so `dvc exp run --queue` has a baseline)."""
    proj = make_project(root / "base", BASE)
    run(["dvc", "repro"], proj, timeout=1200)
    run(["git", "add", "-A"], proj)
    run(["git", "commit", "-qm", "reproduced"], proj)
    return proj


def copy_of(base: Path, root: Path, name: str) -> Path:
    """A copy of the reproduced project whose MLflow store writes artifacts into the copy, not the base
    (the experiment's artifact_location is an absolute path): tests on other workers copy the base meanwhile."""
    dest = root / name
    shutil.copytree(base, dest, symlinks=True)
    if (dest / "mlflow.db").is_file():
        with sqlite3.connect(dest / "mlflow.db") as con:
            con.execute("update experiments set artifact_location = replace(artifact_location, ?, ?)",
                        (str(base.resolve()), str(dest.resolve())))
    return dest


def set_params(proj: Path, overrides: dict) -> None:
    path = proj / "params.yaml"
    path.write_text(yaml.safe_dump(merge(yaml.safe_load(path.read_text()), overrides), sort_keys=False))


def runs(proj: Path) -> list[tuple[str, str, str]]:
    """(run id, status, name) of every run in the scratch store (read straight from its sqlite file)."""
    db = proj / "mlflow.db"
    if not db.is_file():
        return []
    try:
        with sqlite3.connect(db) as con:
            return con.execute("select run_uuid, status, name from runs").fetchall()
    except sqlite3.DatabaseError:  # the fault that overwrites the store: nothing can have been logged in it
        return []


def tag(proj: Path, run_id: str, key: str) -> str | None:
    with sqlite3.connect(proj / "mlflow.db") as con:
        row = con.execute("select value from tags where run_uuid = ? and key = ?", (run_id, key)).fetchone()
    return row[0] if row else None


def running(proj: Path) -> int:
    return sum(status == "RUNNING" for _, status, _ in runs(proj))


def lock_entry(proj: Path, stage: str) -> dict | None:
    lock = proj / "dvc.lock"
    return (yaml.safe_load(lock.read_text()) or {}).get("stages", {}).get(stage) if lock.is_file() else None


def outs_of(proj: Path, stage: str) -> list[Path]:
    """The stage's declared outputs, read from dvc.yaml as DVC resolves it (params not validated)."""
    from newllm import dag

    try:
        stages = dag.load_stages(yaml.safe_load((proj / "params.yaml").read_text()), proj)
    except Exception:
        return []
    found = [s for s in stages.values() if s.name == stage]
    return [proj / p for p in found[0].outs] if found else []


def left_cached(proj: Path, stage: str | None, lock_before: dict | None) -> int:
    """What a failure of `stage` left for DVC: its outputs on disk, plus a changed dvc.lock entry."""
    if stage is None:
        return 0
    return sum(p.exists() for p in outs_of(proj, stage)) + int(lock_entry(proj, stage) != lock_before)


def dvc(proj: Path, *args: str, extra_env: dict | None = None, timeout: int = 600) -> tuple[int, str, float]:
    """Run dvc in the scratch project -> (exit code, stdout + stderr, seconds)."""
    t0 = time.perf_counter()
    res = run(["dvc", *args], proj, check=False, timeout=timeout, extra_env=extra_env)
    return res.returncode, res.stdout + res.stderr, time.perf_counter() - t0


def error_line(output: str) -> str:
    lines = [ln for ln in output.splitlines() if ln.startswith("error: ")]
    return lines[0] if lines else next((ln for ln in output.splitlines() if "ERROR" in ln), "(no error line)")


def failed_stage(output: str) -> str | None:
    m = re.search(r"failed to reproduce '([^']+)'", output)
    return m.group(1) if m else None


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def no_timing(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not TIMING.search(k)}


# ----------------------------------------------------------------------------------------------- refusals
def refusal(name: str, proj: Path, expect: str, args: tuple[str, ...] = ("repro",),
            extra_env: dict | None = None, may_open_run: bool = False) -> Row:
    """A bad input: `dvc <args>` must fail with one line matching `expect`, leaving nothing cached and no
    run RUNNING; unless `may_open_run`, before any MLflow run is created."""
    before_runs = {r[0] for r in runs(proj)}
    locks = {stage: lock_entry(proj, stage) for stage in (yaml.safe_load((proj / "dvc.lock").read_text())
                                                           or {}).get("stages", {})}
    rc, out, seconds = dvc(proj, *args, extra_env=extra_env)
    stage = failed_stage(out)
    line = error_line(out)
    cached = left_cached(proj, stage, locks.get(stage or ""))
    new = [r for r in runs(proj) if r[0] not in before_runs]
    ok = (rc != 0 and re.search(expect, line) is not None and cached == 0 and running(proj) == 0
          and (may_open_run or not new))
    return Row(name, f"exit {rc}: {line[:150]}" + (f" [{len(new)} run(s) opened]" if new else ""), seconds, cached,
               running(proj), ok=ok)


def bad_param(name: str, overrides: dict, expect: str) -> Callable[[Path, Path], Row]:
    def fault(base: Path, root: Path) -> Row:
        proj = copy_of(base, root, re.sub(r"\W+", "_", name))
        set_params(proj, overrides(proj) if callable(overrides) else overrides)
        return refusal(f"bad param: {name}", proj, expect)
    return fault


def bad_file(name: str, data: bytes, expect: str) -> Callable[[Path, Path], Row]:
    def fault(base: Path, root: Path) -> Row:
        proj = copy_of(base, root, re.sub(r"\W+", "_", name))
        corpus = root / f"{proj.name}.txt"
        corpus.write_bytes(data)
        set_params(proj, {"dataset": {"source": "text", "path": str(corpus)}})
        return refusal(f"bad file: {name}", proj, expect)  # refused by generate_dataset's precheck
    return fault


def wikitext_without_valid(proj: Path) -> dict:
    folder = proj.parent / "wikitext-no-valid"
    folder.mkdir(exist_ok=True)
    for split in ("train", "test"):
        (folder / f"{split}.txt").write_text("a line of text\n" * 50)
    return {"dataset": {"source": "wikitext2", "wikitext_dir": str(folder)}}


def long_line(base: Path, root: Path) -> Row:
    """A 5 MB single line: accepted, split at whitespace while streaming, never held whole."""
    proj = copy_of(base, root, "long_line")
    corpus = root / "long_line.txt"
    corpus.write_text(" ".join(f"word{i % 997}" for i in range(600_000)) + "\n" + "a short line\n" * 20)
    set_params(proj, {"dataset": {"source": "text", "path": str(corpus)}})
    rc, out, seconds = dvc(proj, "repro", "generate_dataset")
    notice = next((ln for ln in out.splitlines() if "split at whitespace" in ln), "(no notice)")
    lines = sum(1 for _ in (proj / "data/dataset/train.txt").open()) if rc == 0 else 0
    return Row("bad file: 5 MB single line", f"exit {rc}: {notice.strip()[:110]}; {lines} train lines", seconds,
               0, running(proj), ok=rc == 0 and "split at whitespace" in notice and lines > 40)


# ----------------------------------------------------------------------------------------------- faults
def nan(base: Path, root: Path) -> Row:
    proj = copy_of(base, root, "nan")
    set_params(proj, {"train": {"optimizer": "sgd", "grad_clip": 0.0}, "protocol": {"lrs": [1e38]}})
    row = refusal("NaN/inf loss (sgd, lr 1e38)", proj, r"loss became (nan|inf) at epoch \d+ step \d+",
                  may_open_run=True)
    failed = [r for r in runs(proj) if r[1] == "FAILED"]
    reason = tag(proj, failed[-1][0], "newllm.end_reason") if failed else None
    row.ok = row.ok and len(failed) == 1 and reason is not None and "loss became" in reason
    row.happened += f"; run FAILED, tag newllm.end_reason set: {reason is not None}"
    return row


def _python_pid(proj: Path, since: set[str], timeout: float = 120) -> tuple[str, int]:
    """The run id and pid of the training process a dvc command just started (its run's newllm.pid tag)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:  # the new stage run (a new parent run of the experiment carries no pid)
            for run_id, _, _ in [r for r in runs(proj) if r[0] not in since]:
                if pid := tag(proj, run_id, "newllm.pid"):
                    return run_id, int(pid)
        except sqlite3.OperationalError:  # the stage is writing: ask again
            pass
        time.sleep(0.05)
    raise TimeoutError("the training stage never opened its MLflow run")


def _stop_mid_training(proj: Path, sig: signal.Signals) -> tuple[str, int, str]:
    """`dvc repro -f -s` the LSTM cell, send `sig` to its python process once it has saved a resume
    checkpoint a few epochs in -> (run id, dvc's exit code, its output)."""
    resume = proj / f"data/resume/{KILL_RECORD}.pt"
    before = {r[0] for r in runs(proj)}
    proc = subprocess.Popen(["dvc", "repro", "-f", "-s", KILL_STAGE], cwd=proj, env={**env(), "NEWLLM_RESUME_EVERY_S": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_id, pid = _python_pid(proj, before)
    end = time.monotonic() + 120
    while time.monotonic() < end and not _saved_epoch(proj, run_id) >= 5:
        time.sleep(0.02)
    os.kill(pid, sig)
    out, _ = proc.communicate(timeout=120)
    assert resume.is_file(), "no resume checkpoint was saved before the kill"
    return run_id, proc.returncode, out


def _saved_epoch(proj: Path, run_id: str) -> int:
    try:
        with sqlite3.connect(proj / "mlflow.db", timeout=5) as con:
            row = con.execute("select max(step) from metrics where run_uuid = ? and key = 'curves/val_loss'",
                              (run_id,)).fetchone()
    except sqlite3.OperationalError:  # the stage is writing: ask again
        return 0
    return row[0] or 0


def kill9_resume(base: Path, root: Path) -> Row:
    """kill -9 mid-training, then the same command again: it resumes the same MLflow run and ends with the
    uninterrupted run's metrics and checkpoint bytes (the base project's own run of this cell)."""
    proj = copy_of(base, root, "kill9")
    metrics, ckpt = proj / f"reports/metrics/{KILL_RECORD}.json", proj / f"data/checkpoints/{KILL_RECORD}.pt"
    want_metrics, want_md5 = no_timing(json.loads(metrics.read_text())), md5(ckpt)
    run_id, _, _ = _stop_mid_training(proj, signal.SIGKILL)
    killed_at = _saved_epoch(proj, run_id)
    rc, out, seconds = dvc(proj, "repro", "-f", "-s", KILL_STAGE)
    resumed = next((ln for ln in out.splitlines() if "resuming from" in ln), "(did not resume)")
    same = rc == 0 and no_timing(json.loads(metrics.read_text())) == want_metrics and md5(ckpt) == want_md5
    status = {r[0]: r[1] for r in runs(proj)}.get(run_id)
    with sqlite3.connect(proj / "mlflow.db") as con:
        steps = sorted({s for (s,) in con.execute(
            "select step from metrics where run_uuid = ? and key = 'curves/val_loss'", (run_id,))})
    epochs = json.loads(metrics.read_text())["epochs_run"] if rc == 0 else -1
    continuous = steps == list(range(1, epochs + 1))
    happened = (f"killed at epoch {killed_at}; {resumed.split(': ', 1)[-1][:80]}; run {status}, "
                f"val_loss curve steps 1..{steps[-1] if steps else 0} continuous: {continuous}; checkpoint md5 "
                f"{md5(ckpt)[:12] if ckpt.is_file() else '-'} (uninterrupted {want_md5[:12]}); metrics diff "
                f"{'empty' if rc == 0 and no_timing(json.loads(metrics.read_text())) == want_metrics else 'NOT empty'}")
    return Row("kill -9 mid-training, then rerun", happened, seconds, 0, running(proj), "yes" if same else "no",
               ok=same and status == "FINISHED" and continuous and "resuming from" in resumed)


def sigterm(base: Path, root: Path) -> Row:
    proj = copy_of(base, root, "sigterm")
    t0 = time.perf_counter()
    run_id, rc, out = _stop_mid_training(proj, signal.SIGTERM)
    line = error_line(out)
    status = {r[0]: r[1] for r in runs(proj)}.get(run_id)
    outs = sum(p.exists() for p in outs_of(proj, KILL_STAGE))
    ok = "stopped by SIGTERM" in line and "resumes from" in line and status == "KILLED" and outs == 0
    return Row("SIGTERM mid-training", f"{line[:150]}; run {status}", time.perf_counter() - t0, outs,
               running(proj), ok=ok)


def mlflow_down(base: Path, root: Path) -> Row:
    proj = copy_of(base, root, "mlflow_down")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    return refusal("MLflow server down", proj, r"unreachable", args=("repro", "-f", "-s", "tokenize"),
                   extra_env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{port}"})


def corrupt_checkpoint(base: Path, root: Path) -> Row:
    proj = copy_of(base, root, "corrupt")
    (proj / "data/checkpoints/phase1/seed0.pt").write_bytes(b"not a checkpoint" * 100)
    return refusal("corrupt Phase 1 checkpoint", proj, r"damaged checkpoint data/checkpoints/phase1/seed0.pt",
                   args=("repro", "-f", "-s", "phase2_sweep@0.01"), may_open_run=True)


def taken_port(base: Path, root: Path) -> Row:
    proj = copy_of(base, root, "ui_port")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        t0 = time.perf_counter()
        res = run(["newllm", "ui", "--port", str(port)], proj, check=False, timeout=60)
    line = (res.stderr.strip().splitlines() or ["(nothing)"])[-1]
    return Row("`newllm ui` on a taken port", f"exit {res.returncode}: {line[:150]}", time.perf_counter() - t0, 0,
               running(proj), ok=res.returncode == 1 and f"port {port}" in line and "\n" not in res.stderr.strip())


def queue_two_workers(base: Path, root: Path) -> Row:
    """Two queued experiments run by two workers at once: both land in the one store, none left RUNNING."""
    proj = copy_of(base, root, "queue")
    t0 = time.perf_counter()
    for n in (6, 7):
        run(["dvc", "exp", "run", "--queue", "-n", f"tokens{n}", "-S", f"report.max_new_tokens={n}"], proj)
    run(["dvc", "queue", "start", "-j", "2"], proj)
    end = time.monotonic() + 600
    status = ""
    while time.monotonic() < end:
        status = run(["dvc", "queue", "status"], proj, check=False).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(2)
    seconds = time.perf_counter() - t0
    landed = {tag(proj, rid, "dvc.exp_name") for rid, st, _ in runs(proj)
              if st == "FINISHED" and tag(proj, rid, "dvc.stage") == "report"}
    ok = status.count("Success") == 2 and {"tokens6", "tokens7"} <= landed and running(proj) == 0
    return Row("`dvc queue start -j 2` (2 experiments)", f"{status.count('Success')} of 2 succeeded; report runs "
               f"FINISHED in the one store: {sorted(landed & {'tokens6', 'tokens7'})}", seconds, 0, running(proj),
               ok=ok)


class Unavailable(Exception):
    """This machine cannot stage the fault (no way to make a file read-only as root, a GPU present)."""


def _read_only(path: Path) -> Callable[[], None]:
    """Make `path` unwritable -> the undo. Root ignores permission bits, so as root: chattr +i (immutable)."""
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(mode & ~0o222)
        return lambda: path.chmod(mode)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        raise Unavailable(f"chattr +i {path} failed: no way to make it read-only as root here")
    return lambda: subprocess.run(["chattr", "-i", str(path)], check=True)


def store_not_a_database(base: Path, root: Path) -> Row:
    proj = copy_of(base, root, "store_garbage")
    db = proj / "mlflow.db"
    db.write_bytes(random.Random(0).randbytes(db.stat().st_size))  # overwritten, as a bad copy or disk would
    return refusal("MLflow store overwritten with random bytes", proj, r"mlflow.db is not an SQLite database.*"
                   r"newllm init-store", args=("repro", "-f", "-s", "tokenize"))


def store_read_only(base: Path, root: Path) -> Row:
    proj = copy_of(base, root, "store_read_only")
    undo = _read_only(proj / "mlflow.db")
    try:
        return refusal("MLflow store read-only (chattr +i)", proj, r"mlflow.db is read-only",
                       args=("repro", "-f", "-s", "tokenize"))
    finally:
        undo()


def store_folder_read_only(base: Path, root: Path) -> Row:
    """MLFLOW_TRACKING_URI names a new store in a folder nobody may write: SQLite could not create it."""
    proj = copy_of(base, root, "store_folder")
    folder = root / "read-only-folder"
    folder.mkdir()
    undo = _read_only(folder)
    try:
        return refusal("MLflow store in a read-only folder", proj, r"its folder .*read-only-folder is not writable",
                       args=("repro", "-f", "-s", "tokenize"),
                       extra_env={"MLFLOW_TRACKING_URI": f"sqlite:///{folder / 'mlflow.db'}"})
    finally:
        undo()


def byte_order_mark(base: Path, root: Path) -> Row:
    """A Windows editor's corpus (UTF-8 BOM, CRLF lines): accepted, the mark dropped with a notice; no
    line and no token of the vocabulary starts with U+FEFF."""
    proj = copy_of(base, root, "bom")
    corpus = root / "bom.txt"
    corpus.write_bytes(b"\xef\xbb\xbf" + "".join(f"the word{i % 50} is here\r\n" for i in range(60)).encode())
    set_params(proj, {"dataset": {"source": "text", "path": str(corpus)}})
    rc, out, seconds = dvc(proj, "repro", "tokenize")
    notice = next((ln.strip() for ln in out.splitlines() if "byte-order mark" in ln), "(no notice)")
    train = (proj / "data/dataset/train.txt").read_text(encoding="utf-8") if rc == 0 else "\ufeff"
    vocab = json.loads((proj / "data/tokens/tokenizer.json").read_text())["model"]["vocab"] if rc == 0 else {}
    marked = [t for t in vocab if "\ufeff" in t]
    return Row("bad file: UTF-8 BOM + CRLF lines", f"exit {rc}: {notice[:110]}; {len(marked)} BOM token(s), "
               f"train.txt starts {train[:8]!r}", seconds, 0, running(proj),
               ok=rc == 0 and "dropped" in notice and not marked and "the" in vocab and train.startswith("the"))


def cuda_without_gpu(base: Path, root: Path) -> Row:
    import torch

    if torch.cuda.is_available():
        raise Unavailable("this machine has a CUDA device")
    return bad_param("device: cuda without a GPU", {"device": "cuda"},
                     r"device is cuda, but torch sees no CUDA device.*set device: auto")(base, root)


def bit_rot(base: Path, root: Path) -> Row:
    """Up to 4,000 bytes flipped in the middle of a sweep checkpoint's largest tensor (where torch reads them
    without complaint), size and mtime kept: `dvc status` stays clean (DVC trusts both), the load refuses it
    in one line naming the rerun, and that rerun restores the checkpoint's bytes."""
    import torch

    proj = copy_of(base, root, "bit_rot")
    ckpt = proj / f"data/checkpoints/{KILL_RECORD}.pt"
    run(["dvc", "status"], proj)  # DVC records this copy's files (inode, size, mtime) as it would have them
    want = md5(ckpt)
    raw, stat = bytearray(ckpt.read_bytes()), ckpt.stat()
    tensors = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"].values()
    data = max(tensors, key=lambda t: t.nbytes).numpy().tobytes()
    n = min(4000, len(data) // 2)
    mid = raw.find(data) + (len(data) - n) // 2  # torch stores tensors uncompressed
    raw[mid:mid + n] = bytes(b ^ 0xFF for b in raw[mid:mid + n])
    ckpt.write_bytes(bytes(raw))
    os.utime(ckpt, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    clean = not yaml.safe_load(run(["dvc", "status", "--json"], proj).stdout)
    t0 = time.perf_counter()
    gen = run(["newllm", "generate", "--model", "lstm", "--max-new-tokens", "3"], proj, check=False)
    seconds = time.perf_counter() - t0
    errors = [ln for ln in gen.stderr.splitlines() if ln.startswith("error: ")]  # (after generate's info line)
    line = errors[0] if errors else "(no error line)"
    advice = re.search(r"`(dvc repro -f -s \S+)`", line)
    repaired = advice is not None and run(advice.group(1).split(), proj, check=False).returncode == 0 and md5(ckpt) == want
    ok = (gen.returncode != 0 and len(errors) == 1 and "Traceback" not in gen.stderr and repaired and clean
          and f"data/checkpoints/{KILL_RECORD}.pt is corrupted" in line)
    return Row("checkpoint bytes flipped in place (bit rot)", f"dvc status clean: {clean}; generate exit "
               f"{gen.returncode}: {line[:105]} … {advice.group(0) if advice else '(no advice)'}; that rerun "
               f"restores the bytes: {repaired}", seconds, 0,
               running(proj), ok=ok)


FAULTS: dict[str, Callable[[Path, Path], Row]] = {
    "nan": nan,
    "kill9": kill9_resume,
    "sigterm": sigterm,
    "unknown-key": bad_param("unknown key foo: 1", {"foo": 1}, r"params.yaml: unknown key 'foo'"),
    "nested-unknown-key": bad_param("unknown key phase1.foo", {"phase1": {"foo": 1}}, r"phase1.*foo"),
    "unregistered-model": bad_param("baselines: [lstm, gru]", {"baselines": ["lstm", "gru"]},
                                    r"baselines\[1\] must be one of"),
    "bad-value": bad_param("context_dim: -5", {"context_dim": -5}, r"context_dim"),
    "missing-split": bad_param("wikitext2 folder without valid.txt", wikitext_without_valid, r"has no valid.txt"),
    "empty-prompts": bad_param("report.prompts: []", {"report": {"prompts": []}}, r"report.prompts is empty"),
    "eval-batch": bad_param("eval_batch_size: 100000", {"eval_batch_size": 100000},
                            r"eval_batch_size \(100000\) is too large"),
    "lrs-string": bad_param("protocol.lrs: fast (DVC's own error)", {"protocol": {"lrs": "fast"}}, r"ERROR"),
    "invalid-utf8": bad_file("invalid UTF-8", b"good line\n" * 30 + b"caf\xe9\n" + b"more\n" * 10,
                             r"invalid UTF-8 at byte 303"),
    "binary": bad_file("a copy of /bin/ls", Path("/bin/ls").read_bytes() if Path("/bin/ls").is_file() else b"\0",
                       r"binary content"),
    "empty-file": bad_file("empty file", b"", r"no non-empty lines"),
    "too-few-lines": bad_file("2-line file", b"one\ntwo\n", r"only 2 non-empty lines"),
    "long-line": long_line,
    "mlflow-down": mlflow_down,
    "corrupt-checkpoint": corrupt_checkpoint,
    "bit-rot": bit_rot,
    "store-garbage": store_not_a_database,
    "store-read-only": store_read_only,
    "store-folder-read-only": store_folder_read_only,
    "bom": byte_order_mark,
    "cuda-without-gpu": cuda_without_gpu,
    "taken-port": taken_port,
    "queue": queue_two_workers,
}
