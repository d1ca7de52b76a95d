"""The multi-process benchmarks run end to end at tiny sizes (their numbers are not checked: tests
never assert on time), and report what they promise."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT

from diffrec_ext import ops

pytestmark = pytest.mark.skipif(
    not (ops.HAVE_EXTENSION and torch.distributed.is_available() and torch.distributed.is_gloo_available()),
    reason="needs the compiled extension and torch.distributed with Gloo",
)


def run_benchmark(folder, script: str, *arguments) -> dict:
    report = folder / f"{script}.json"
    subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / f"{script}.py"), *map(str, arguments),
                    "--json", str(report)], cwd=REPO_ROOT, check=True, capture_output=True, timeout=300)
    return json.loads(report.read_text())


def test_sharded_scoring_benchmark_runs_and_matches_the_single_process_ids(tmp_path):
    report = run_benchmark(tmp_path, "bench_sharded_scoring", "--num-items", 501, "--batch", 3, "--seeds", 2, "--dim", 8,
                           "-k", 5, "--repeats", 1, "--rounds", 1)
    assert [run["processes"] for run in report["runs"]] == [1, 1, 2, 1]
    assert all(run["same_ids_as_single_process"] for run in report["runs"])


def test_data_parallel_training_benchmark_runs_every_configuration(tmp_path):
    report = run_benchmark(tmp_path, "bench_data_parallel_training", "--samples", 512, "--dim", 16, "--rounds", 1)
    runs = report["runs"]
    assert [(run["processes"], run["threads_per_process"]) for run in runs] == [(1, 1), (1, 2), (2, 1)]
    assert all(run["median_train_s"] > 0 and 0 <= run["valid_ndcg10"][0] <= 1 for run in runs)
