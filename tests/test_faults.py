"""One test per fault of the fault suite (tests/faults.py), each on its own copy of one reproduced scratch
pipeline: a refusal fails with one line and leaves nothing cached and no run RUNNING; kill -9 resumes to
identical metrics and checkpoint bytes. `benchmarks/faults.py` prints the same rows as a table. (A
non-list `protocol.lrs` is refused by DVC itself, with its own error, while it expands the matrix.)"""

from pathlib import Path

import pytest
from faults import FAULTS, Unavailable


@pytest.mark.slow
@pytest.mark.parametrize("fault", list(FAULTS))
def test_fault(fault: str, reproduced: Path, tmp_path: Path):  # reproduced: conftest.py
    try:
        row = FAULTS[fault](reproduced, tmp_path)
    except Unavailable as e:
        pytest.skip(str(e))
    assert row.ok, row
    assert row.cached == 0 and row.running == 0, row
