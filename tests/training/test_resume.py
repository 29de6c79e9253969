"""Resume files: what a key mismatch, a damaged file and a dependency edit do."""

from pathlib import Path

import torch

from newllm.training.resume import ResumeFile, dep_key


def test_a_file_is_loaded_only_under_its_own_key(tmp_path: Path, capsys):
    ResumeFile("sweep/lstm/lr0.01", lambda: "aaaa", tmp_path).save({"epoch": 3, "w": torch.ones(2)})
    state = ResumeFile("sweep/lstm/lr0.01", lambda: "aaaa", tmp_path).load()
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.ones(2))
    assert ResumeFile("sweep/lstm/lr0.01", lambda: "bbbb", tmp_path).load() is None
    err = capsys.readouterr().err.strip()
    assert err.startswith("resume: ignoring ") and "made under other params or inputs" in err and "\n" not in err


def test_a_damaged_file_is_ignored_with_a_notice(tmp_path: Path, capsys):
    f = ResumeFile("phase1/seed0", lambda: "k", tmp_path)
    f.path.parent.mkdir(parents=True)
    f.path.write_bytes(b"cut short")
    assert f.load() is None and "ignoring damaged" in capsys.readouterr().err
    f.save({"iteration": 1})
    assert f.load() == {"iteration": 1, "key": "k"} and not list(f.path.parent.glob(".*.tmp"))
    f.clear()
    assert not f.path.exists()


def test_the_key_covers_params_and_the_bytes_of_every_dep(tmp_path: Path):
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.npy").write_bytes(b"123")
    deps = (str(tmp_path / "code.py"), str(tmp_path / "data"))
    key = dep_key("hash1", deps)
    assert dep_key("hash1", deps) == key and dep_key("hash2", deps) != key
    (tmp_path / "data" / "a.npy").write_bytes(b"124")
    assert dep_key("hash1", deps) != key
