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


def shared_file(relative: str) -> Path:
    """A file of the shared datasets, or a skip with the reason when it is absent."""
    folder = shared_data_dir()
    if folder is None or not (folder / relative).is_file():
        pytest.skip(f"needs shared data file {relative}: set DIFFREC_DATA to the folder holding "
                    "beauty/ and ml-1m/, or place it at ../shared/data")
    return folder / relative
