import os
from pathlib import Path

# Compiled kernels fill their outputs with NaN (integers with INT64_MIN) before writing them, so
# an element a kernel forgets to write fails the comparison. Read once, at the first allocation.
os.environ.setdefault("DIFFREC_EXT_POISON_OUTPUTS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and batches: with several intra-op threads on a busy machine each small op waits
    for a descheduled thread (one thread is up to ~50x faster there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dataset(users=50, items=20, seed=0):
    """A small dataset with a strong next-item structure (each item is mostly followed by the next)."""
    import numpy as np
    import pandas as pd

    from diffrec_ext.data import preprocess

    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        item = int(rng.integers(1, items + 1))
        for t in range(int(rng.integers(4, 10))):
            rows.append((user, item, t))
            item = item % items + 1 if rng.random() < 0.8 else int(rng.integers(1, items + 1))
    return preprocess(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), "tiny", k_core=1)
