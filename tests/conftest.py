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


@pytest.fixture(autouse=True)
def restore_torch_threads():
    """The CLI's --threads 0 sets torch's thread count for the whole process; in-process CLI tests
    must not change it for the tests after them (a float reduction's order depends on it, so a
    resumed run would no longer equal a straight one)."""
    before = torch.get_num_threads()
    yield
    if torch.get_num_threads() != before:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models and batches: with several intra-op threads on a busy machine each small op waits
    for a descheduled thread (one thread is up to ~50x faster there)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_dataset(users=50, items=20, seed=0, longest=9):
    """A small dataset with a strong next-item structure (each item is mostly followed by the next);
    users have 4 to `longest` interactions."""
    import numpy as np
    import pandas as pd

    from diffrec_ext.data import preprocess

    rng = np.random.default_rng(seed)
    rows = []
    for user in range(users):
        item = int(rng.integers(1, items + 1))
        for t in range(int(rng.integers(4, longest + 1))):
            rows.append((user, item, t))
            item = item % items + 1 if rng.random() < 0.8 else int(rng.integers(1, items + 1))
    return preprocess(pd.DataFrame(rows, columns=["user", "item", "timestamp"]), "tiny", k_core=1)


def free_loopback_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_torchrun(arguments: list, processes: int = 2, timeout: int = 300):
    """Run `arguments` (a script and its options, or "-m", module, ...) in `processes` processes
    with torchrun (Gloo on a free loopback port, one CPU thread each); returns the completed
    process, or fails the test with the workers' output when the launch fails."""
    import subprocess
    import sys

    command = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
        "--master_addr=127.0.0.1", f"--master_port={free_loopback_port()}", *map(str, arguments),
    ]
    python_path = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=timeout,
                         check=False)
    assert run.returncode == 0, f"torchrun failed ({run.returncode}):\n{run.stdout[-4000:]}\n{run.stderr[-8000:]}"
    return run


def capture_error(fn) -> tuple[str, str]:
    """(exception type name, message) of what `fn()` raises, or ("no error", "") (for torchrun
    workers, which save it for the test process to assert on)."""
    try:
        fn()
        return ("no error", "")
    except Exception as error:  # noqa: BLE001
        return (type(error).__name__, str(error))
