"""Warm stage start-up: a stage runs in a fork of a process that has torch and MLflow imported already.

Why: a stage's own work at the default params is seconds, while a fresh interpreter spends 2 s importing
torch and 3 s importing MLflow before it starts (benchmarks/overhead.py measures it); DVC runs one process
per stage, 39 of them. So the first stage that finds no warm server starts one in the background and runs
cold itself; every later stage (same interpreter, same import-time environment) connects to it over a
Unix socket, hands over its argv, working directory, environment and stdin/stdout/stderr (SCM_RIGHTS),
and the server forks a child that runs the stage file as `__main__` there, exactly as `python stage.py`
would. The client waits, forwards SIGINT/SIGTERM to the child and exits with its code; if the client is
killed, the child sees its socket close and stops as on SIGTERM (its MLflow run ends KILLED).

What keeps it honest:
- the server imports third-party packages only, never `newllm`: every child imports the project's code
  from disk, so an edit is always seen; a child re-seeds `random` and numpy, as a fresh process would;
- one server per interpreter and per import-time environment (PYTHON*, HF_*, OMP_*, ...: the variables a
  package reads when imported), found by a hash of both; other variables travel with each request;
- the server forks from one thread, before any torch op has started a thread pool, and exits after
  `NEWLLM_WARM_IDLE_S` seconds (default 300) without a request; `NEWLLM_WARM=0` turns it all off;
- Linux only (abstract-namespace sockets, peer credentials checked: only our own user may connect);
  elsewhere, and whenever anything in the hand-over fails, the stage simply runs cold in its own process.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import struct
import sys
import time

CHILD_ENV = "NEWLLM_WARM_CHILD"  # set in a child: its own stages never delegate again
# Read by packages when they are imported (so they must match the server's): one server per value.
IMPORT_TIME_ENV = ("PYTHON", "HF_", "HUGGINGFACE", "TRANSFORMERS", "TOKENIZERS", "TORCH", "CUDA", "OMP_", "MKL",
                   "KMP_", "OPENBLAS", "ATEN", "LD_", "MPLBACKEND", "MLFLOW_CONFIGURE_LOGGING", "MLFLOW_LOGGING_LEVEL",
                   "MLFLOW_DISABLE_TELEMETRY", "NEWLLM_WARM")
PRELOAD = ("numpy", "torch", "torch.nn", "torch.optim", "yaml", "filelock", "mlflow", "mlflow.tracking",
           "mlflow.entities", "mlflow.store.tracking.sqlalchemy_store", "alembic.script", "sqlalchemy",
           "matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg", "transformers",
           "transformers.models.gpt2.modeling_gpt2", "tokenizers", "pandas")
_HEADER = struct.Struct("!I")


def enabled() -> bool:
    return sys.platform == "linux" and os.environ.get("NEWLLM_WARM", "1") != "0" and CHILD_ENV not in os.environ


def address(env: dict[str, str] | None = None) -> str:
    """The server's abstract socket name for this interpreter and import-time environment."""
    env = os.environ if env is None else env
    pinned = sorted((k, v) for k, v in env.items() if k.startswith(IMPORT_TIME_ENV))
    key = json.dumps([sys.executable, sys.prefix, sys.version, os.getuid(), pinned])
    return "\0newllm-warm-" + hashlib.sha256(key.encode()).hexdigest()[:20]


# ----------------------------------------------------------------------------------------------- client
def delegate() -> None:
    """Run this process's script (sys.argv) in a warm child and exit with its code; return (having done
    nothing) when no server answers, after starting one in the background for the next stage."""
    sock = _connect()
    if sock is None:
        return
    request = json.dumps({"argv": [os.path.abspath(sys.argv[0]), *sys.argv[1:]], "cwd": os.getcwd(),
                          "env": dict(os.environ)}).encode()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
        socket.send_fds(sock, [_HEADER.pack(len(request))], [0, 1, 2])
        sock.sendall(request)
        pid = _HEADER.unpack(_recv_exactly(sock, _HEADER.size))[0]
    except OSError:
        sock.close()
        return  # the server went away before taking the job: run cold
    forwarded: list[int] = []

    def forward(signum: int, frame: object) -> None:
        forwarded.append(signum)
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass

    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, forward)
    try:
        code = struct.unpack("!i", _recv_exactly(sock, 4))[0]
    except OSError:  # the server died under its child: the stage's outcome is unknown
        print(f"error: the warm server ended while stage process {pid} ran", file=sys.stderr)
        code = 128 + forwarded[-1] if forwarded else 1
    if code < 0:  # killed by a signal: die by the same one, as the stage process would have
        signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    os._exit(code)


def _connect() -> socket.socket | None:
    """A connection to this interpreter and environment's server; None (after starting one in the
    background) when none answers, or when warm start-up is off."""
    if not enabled():
        return None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(address())
        return sock
    except OSError:
        sock.close()
        _spawn_server()
        return None


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("closed")
        data += chunk
    return data


def _spawn_server() -> None:
    import subprocess

    try:
        subprocess.Popen([sys.executable, "-m", "newllm.warm"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True,
                         env={**os.environ, "NEWLLM_WARM_SERVER": "1"})
    except OSError:
        pass


# ----------------------------------------------------------------------------------------------- server
def serve(idle_s: float) -> None:
    """Preload, then fork a child per request until `idle_s` seconds pass with no request and no child.
    Each child's exit status goes back to its client as the server sees it (waitpid): a code, or the
    signal that killed it."""
    import importlib
    import selectors

    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(address())  # the name is ours: a second server for the same key leaves here
    except OSError:
        return
    # Listening before the preload: a stage that comes meanwhile waits in the backlog for what is left of
    # it, which is never longer than importing the same packages cold beside it on the same cores.
    server.listen(64)
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception:  # an optional package missing: its importer pays for it, cold
            pass
    events = selectors.DefaultSelector()
    events.register(server, selectors.EVENT_READ)
    children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, the client's connection)
    last = time.monotonic()
    while children or time.monotonic() - last < idle_s:
        for key, _ in events.select(timeout=1.0):
            if key.fileobj is server:
                conn, _ = server.accept()
                last = time.monotonic()
                creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                if struct.unpack("3i", creds)[1] != os.getuid():  # (pid, uid, gid): only our own user
                    conn.close()
                    continue
                pid = os.fork()
                if pid == 0:
                    events.close()
                    server.close()
                    for _, other in children.values():
                        other.close()
                    _child(conn)  # never returns
                try:
                    conn.sendall(_HEADER.pack(pid))
                except OSError:
                    pass
                fd = os.pidfd_open(pid)
                events.register(fd, selectors.EVENT_READ)
                children[fd] = (pid, conn)
            else:
                pid, conn = children.pop(key.fd)
                events.unregister(key.fd)
                os.close(key.fd)
                code = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
                try:
                    conn.sendall(struct.pack("!i", code))
                except OSError:  # the client is gone
                    pass
                conn.close()
                last = time.monotonic()


def _child(conn: socket.socket) -> None:
    code = 1
    try:
        conn.settimeout(10)
        header, fds, _, _ = socket.recv_fds(conn, _HEADER.size, 3)
        request = json.loads(_recv_exactly(conn, _HEADER.unpack(header)[0]))
        conn.settimeout(None)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        os.setpgid(0, 0)  # the server's process group is not this stage's
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ[CHILD_ENV] = "1"
        os.chdir(request["cwd"])
        code = _run(request["argv"], conn)
    finally:
        os._exit(code)


def _run(argv: list[str], conn: socket.socket) -> int:
    """`python argv[0] argv[1:]` in this process: the script as __main__, exit code as Python gives it."""
    import atexit
    import io
    import random
    import runpy
    import threading
    import traceback

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    sys.stdin = io.TextIOWrapper(io.FileIO(0, "r", closefd=False))
    sys.stdout = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), line_buffering=unbuffered or os.isatty(1),
                                  write_through=unbuffered)
    sys.stderr = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), line_buffering=True, errors="backslashreplace")
    random.seed()  # a fresh process's entropy, not the server's state
    if "numpy" in sys.modules:
        sys.modules["numpy"].random.seed()
    sys.argv = list(argv)
    sys.path[0] = os.path.dirname(os.path.realpath(argv[0]))

    def watch() -> None:  # the client is gone (killed): stop as a SIGTERM'd stage would
        try:
            conn.recv(1)
        except OSError:
            pass
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, daemon=True).start()
    code = 0
    try:
        runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        if e.code is None:
            code = 0
        elif isinstance(e.code, int):
            code = e.code
        else:
            print(e.code, file=sys.stderr)
            code = 1
    except KeyboardInterrupt:
        traceback.print_exc()
        code = 130
    except BaseException:
        traceback.print_exc()
        code = 1
    try:
        atexit._run_exitfuncs()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
    return code


def start() -> None:
    """Start a server for this interpreter and environment in the background unless one answers: `make
    run` calls it first, so that the store's creation and DVC's start overlap the server's preload."""
    sock = _connect()
    if sock is not None:
        sock.close()


if __name__ == "__main__":
    if os.environ.get("NEWLLM_WARM_SERVER") == "1":
        os.environ.pop("NEWLLM_WARM_SERVER")
        serve(float(os.environ.get("NEWLLM_WARM_IDLE_S", "300")))
    elif sys.argv[1:] == ["start"]:
        start()
    else:
        sys.exit("usage: python -m newllm.warm start   (start a warm stage server in the background)")
