"""`newllm` commands that are not covered with what they drive (generate: test_generation.py)."""

import socket

from helpers import write_params

from newllm import cli


def test_ui_on_a_taken_port_is_one_line_and_nonzero(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tracking={"uri": f"sqlite:///{tmp_path / 'm.db'}", "experiment": "t"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["ui", "--port", str(port)]) == 1
    err = capsys.readouterr().err.strip()
    assert err == (f"error: port {port} on 127.0.0.1 is already in use (another MLflow UI?): choose another, "
                   f"`newllm ui --port {port + 1}` or `make ui PORT={port + 1}`")
    assert not (tmp_path / "m.db").exists()  # refused before the store is touched
