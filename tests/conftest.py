import os
from pathlib import Path

# Compiled kernels fill their outputs with NaN (integers with INT64_MIN) before writing them, so
# an element a kernel forgets to write fails the comparison. Read once, at the first allocation.
os.environ.setdefault("DIFFREC_EXT_POISON_OUTPUTS", "1")

import pytest  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parent.parent


def shared_data_dir() -> Path | None:
    """The shared datasets: $DIFFREC_DATA, else ../shared/data beside the repository."""
    candidates = [os.environ.get("DIFFREC_DATA"), REPO_ROOT.parent / "shared" / "data"]
    for candidate in candidates:
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


@pytest.fixture
def shared_data() -> Path:
    path = shared_data_dir()
    if path is None:
        pytest.skip("shared datasets not found (set DIFFREC_DATA or place them at ../shared/data)")
    return path
