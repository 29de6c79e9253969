"""Environment for every test: no hub calls, no telemetry, no user tracking URI (set in helpers)."""

from pathlib import Path

import pytest
from helpers import make_project


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")


@pytest.fixture(scope="session")
def reproduced(tmp_path_factory) -> Path:
    """The fault suite's scratch pipeline (tests/faults.py: tiny, New-LLM + the LSTM), reproduced once per
    session and committed; a test that needs trained outputs works on its own copy (faults.copy_of)."""
    from faults import base_project

    return base_project(tmp_path_factory.mktemp("reproduced"))


def pytest_collection_modifyitems(config, items) -> None:
    """Under `make test` (pytest-xdist, --dist loadgroup) the tests on the session's reproduced pipeline share
    one worker, so it is reproduced once, not once per worker."""
    for item in items:
        if "reproduced" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.xdist_group("reproduced"))
