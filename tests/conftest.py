"""Environment for every test: no hub calls, no telemetry, no user tracking URI (set in helpers)."""

from pathlib import Path

import pytest
from helpers import make_project


@pytest.fixture
def project(tmp_path: Path) -> Path:
    return make_project(tmp_path / "proj")
