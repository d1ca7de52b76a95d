"""What the benchmarks share: starting workers in fresh processes (one process, or P processes
under torchrun, Gloo on a free loopback port, a given number of CPU threads each), a checkpoint of
the demo's model size, the machine facts of a report (CPU model, cores, load average), and
printing / saving a report."""

from __future__ import annotations

import json
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_worker(arguments: list[str], processes: int, threads: int, distributed: bool) -> None:
    """`python <arguments>`, or under torchrun with `processes` processes when `distributed`
    (a world of one process included); raises CalledProcessError when it fails."""
    if distributed:
        command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", f"--nproc_per_node={processes}",
                   "--master_addr=127.0.0.1", f"--master_port={free_loopback_port()}", *arguments]
    else:
        command = [sys.executable, *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)


def demo_checkpoint(directory: Path, dim: int = 64) -> Path:
    """A randomly initialised model of the demo's size (d = 64, 2 layers, T = 20, S = 10,
    N = 1000) on the built-in synthetic dataset's catalog (inference costs the same as for a
    trained one); it records that dataset, so `--data` may be left out."""
    import torch

    from diffrec_ext import checkpoint as ckpt
    from diffrec_ext.synthetic import synthetic_dataset
    from diffrec_ext.config import TrainConfig
    from diffrec_ext.model import build_model

    dataset = synthetic_dataset(seed=0)
    config = TrainConfig(dim=dim, layers=2, heads=2, max_len=20, num_steps=1000, dropout=0.1, num_samples=10)
    torch.manual_seed(0)
    model = build_model(config, dataset.num_items)
    return ckpt.save_model(directory, model, config.to_dict(), [int(i) for i in dataset.item_original_ids[1:]],
                           extra={"data": {"path": "synthetic", "synthetic_seed": 0, "k_core": 5}})


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo; elsewhere what the platform says)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "CPU"


def machine_facts() -> dict:
    import torch

    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
            "load_average_after": os.getloadavg()}


def publish(report: dict, table: str, json_path: Path | None) -> None:
    """Print the table; write the whole report as JSON when a path is given."""
    print(table)
    if json_path:
        json_path.write_text(json.dumps(report, indent=2))
        print(f"wrote {json_path}")
