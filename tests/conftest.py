"""Environment for every test: no hub calls, no telemetry, no user tracking URI (set in helpers)."""

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import make_project


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """The fault suite's scratch pipeline (tests/faults.py: tiny, New-LLM + the LSTM), reproduced once per
    session and committed; a test that needs trained outputs works on its own copy (faults.copy_of).

    Under `make test`'s pytest-xdist workers, the first worker to ask builds it in the base folder they
    share, under a file lock, and the others wait for it (pytest-xdist's documented pattern for a
    session fixture that must run once)."""
    from faults import base_project

    if not os.environ.get("PYTEST_XDIST_WORKER"):  # plain pytest, no workers
        return base_project(tmp_path_factory.mktemp("reproduced"))
    shared = tmp_path_factory.getbasetemp().parent / "reproduced"
    with FileLock(str(shared) + ".lock"):
        if not (shared / "done").is_file():  # written last: a build that died is redone
            shutil.rmtree(shared, ignore_errors=True)
            base_project(shared)
            (shared / "done").touch()
    return shared / "base"
