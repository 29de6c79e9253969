"""Environment for every test: no hub calls, no telemetry, no user tracking URI (set in helpers)."""

import os
import shutil
from pathlib import Path

import pytest
from filelock import FileLock
from helpers import make_project

# The longest tests, first: pytest-xdist deals the first items to its workers in turn, so the longest ones
# start at once instead of ending the run alone; then the other slow ones (the fault suite, whose shared
# `reproduced` pipeline the first of them builds while these run), then the rest (CONTRIBUTING: Test time).
LONGEST = ("test_repro_then_ablations_rerun_only_what_they_change", "test_a_study_runs_each_cell_as_a_cached_experiment",
           "test_two_processes_train_to_the_single_process_numbers")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        if item.originalname in LONGEST:
            return LONGEST.index(item.originalname)
        return len(LONGEST) + (item.get_closest_marker("slow") is None)

    items.sort(key=rank)  # stable: collection order within a rank


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
