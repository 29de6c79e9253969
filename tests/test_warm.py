"""The warm stage start-up (newllm/warm.py): a script handed to the warm server behaves as `python script`
would (argv, cwd, environment, stdout/stderr, exit code, signals), runs in a fork that has torch
imported but none of the project's modules, and stops when its client is killed."""

import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from newllm import warm

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the warm server is Linux-only")

SCRIPT = """
import os, sys, time
from newllm import warm
warm.delegate()
print("argv", sys.argv[1:], "cwd", os.getcwd(), "var", os.environ.get("PROBE"), flush=True)
print("warm", os.environ.get("NEWLLM_WARM_CHILD") == "1", "torch", "torch" in sys.modules,
      "project", sorted(m for m in sys.modules if m.startswith("newllm.") and m != "newllm.warm"), flush=True)
print("to stderr", file=sys.stderr)
if sys.argv[1:] == ["sleep"]:
    import signal
    def stop(signum, frame):
        open("stopped", "w").write(str(signum))
        sys.exit(143)
    signal.signal(signal.SIGTERM, stop)
    open("started", "w").write(str(os.getpid()))
    time.sleep(60)
sys.exit(int(sys.argv[2]) if sys.argv[1:2] == ["exit"] else 0)
"""


@pytest.fixture
def server_env(tmp_path):
    """An environment whose import-time key is this test's alone, and a server started for it."""
    env = {**os.environ, "NEWLLM_WARM_IDLE_S": f"20.{os.getpid()}{time.monotonic_ns() % 10**6}", "PROBE": "x"}
    env.pop(warm.CHILD_ENV, None)
    env.pop("NEWLLM_WARM", None)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    first = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "warm False" in first.stdout  # nobody was listening: it ran cold and started a server
    deadline = time.monotonic() + 90
    while True:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(warm.address(env))
            break
        except OSError:
            assert time.monotonic() < deadline, "the warm server did not come up"
            time.sleep(0.3)
        finally:
            probe.close()
    return env, script


def test_a_script_runs_warm_as_it_runs_cold(server_env, tmp_path):
    env, script = server_env
    cold = subprocess.run([sys.executable, str(script), "a b", "c"], cwd=tmp_path, capture_output=True, text=True,
                          env={**env, "NEWLLM_WARM": "0"})
    hot = subprocess.run([sys.executable, str(script), "a b", "c"], cwd=tmp_path, capture_output=True, text=True,
                         env={**env, "PROBE": "changed per request"})
    assert "warm True torch True project []" in hot.stdout  # torch preloaded, the project's code read fresh
    assert "warm False" in cold.stdout
    line = lambda out: out.splitlines()[0]  # noqa: E731
    assert line(cold.stdout) == line(hot.stdout).replace("changed per request", "x")
    assert "var changed per request" in hot.stdout  # a variable outside the key travels with the request
    assert hot.stderr == cold.stderr == "to stderr\n"
    assert subprocess.run([sys.executable, str(script), "exit", "7"], cwd=tmp_path, env=env).returncode == 7


def test_signals_reach_the_stage_and_a_killed_client_stops_it(server_env, tmp_path):
    env, script = server_env
    for how, expected in (("SIGTERM", 143), ("SIGKILL", -9)):
        for f in ("started", "stopped"):
            (tmp_path / f).unlink(missing_ok=True)
        proc = subprocess.Popen([sys.executable, str(script), "sleep"], cwd=tmp_path, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not (tmp_path / "started").is_file():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        child = int((tmp_path / "started").read_text())
        assert child != proc.pid  # the work runs in the server's fork, not in the client
        proc.send_signal(getattr(signal, how))
        assert proc.wait(timeout=30) == expected
        deadline = time.monotonic() + 30
        while not (tmp_path / "stopped").is_file():  # SIGKILL'd client: the child sees its socket close
            assert time.monotonic() < deadline, f"{how}: the stage did not stop"
            time.sleep(0.1)
        assert (tmp_path / "stopped").read_text() == str(signal.SIGTERM.value)


def test_the_server_key_follows_import_time_variables_only():
    key = warm.address({"HF_HUB_OFFLINE": "1"})
    assert key != warm.address({"HF_HUB_OFFLINE": "0"})  # read when transformers is imported: its own server
    assert key == warm.address({"HF_HUB_OFFLINE": "1", "DVC_STAGE": "x", "MLFLOW_TRACKING_URI": "y"})


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to connect as another user")
def test_another_user_is_refused(server_env):
    env, _ = server_env
    read, write = os.pipe()
    ours = warm.address(env)  # (the key holds the uid: nobody's own key would find no server at all)
    pid = os.fork()
    if pid == 0:  # a client running as nobody: the server must close the connection without forking
        try:
            os.setuid(65534)
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.connect(ours)
            sock.settimeout(120)  # the server may still be preloading (it listens first): it refuses after
            os.write(write, b"refused" if sock.recv(4) == b"" else b"served")
        except BaseException as e:
            os.write(write, repr(e).encode()[:200])
        finally:
            os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    assert os.read(read, 200) == b"refused"


def test_make_runs_start_gives_the_first_stage_a_warm_process(tmp_path):
    """`python -m newllm.warm start` (make run's first step) returns at once with a server coming up; a
    stage that arrives while the server still imports torch waits for it instead of running cold."""
    env = {**os.environ, "NEWLLM_WARM_IDLE_S": f"15.{os.getpid()}{time.monotonic_ns() % 10**6}"}
    env.pop(warm.CHILD_ENV, None)
    env.pop("NEWLLM_WARM", None)
    script = tmp_path / "script.py"
    script.write_text(SCRIPT)
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "newllm.warm", "start"], env=env, check=True, timeout=60)
    started = time.monotonic() - t0
    first = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert "warm True" in first.stdout, (started, first.stdout, first.stderr)
