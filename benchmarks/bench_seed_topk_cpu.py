"""Seed-averaged top-k on the CPU: the fused two-pass kernel against eager PyTorch
(einsum, softmax, mean over seeds, topk), time and peak memory, measured in one run.

    python -m pytest benchmarks/bench_seed_topk_cpu.py --benchmark-only -s
    python benchmarks/bench_seed_topk_cpu.py [--threads N]   # prints the ratios as a table

Memory is the growth of the resident set (Linux VmHWM after resetting it through
/proc/self/clear_refs), so it counts every allocation, the BLAS workspace included.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import pytest
import torch

from diffrec_ext import ops

SHAPE = dict(batch=64, seeds=10, dim=256, num_items=200_000, k=20)


def make_inputs(batch, seeds, dim, num_items, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seeds, dim, generator=gen)
    weight = torch.randn(num_items, dim, generator=gen) / dim**0.5
    bias = torch.randn(num_items, generator=gen) * 0.1
    return hidden, weight, bias, k


def eager_topk(hidden, weight, bias, k):
    probs = torch.softmax(torch.einsum("bsd,vd->bsv", hidden, weight) + bias, dim=-1).mean(dim=1)
    return torch.topk(probs, k, dim=-1)


def fused_topk(hidden, weight, bias, k):
    return ops.seed_topk(hidden, weight, bias, k)


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_extra_bytes(fn, *args) -> int:
    """Peak resident-set growth while fn runs (Linux only)."""
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    before = _kib("VmRSS")
    fn(*args)
    return (_kib("VmHWM") - before) * 1024


def median_seconds(fn, args, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def compare(repeats: int = 5, **shape) -> dict:
    args = make_inputs(**{**SHAPE, **shape})
    fused_topk(*args), eager_topk(*args)  # warm-up: thread pools, BLAS, page faults
    fused_values, fused_ids = fused_topk(*args)
    eager_values, _ = eager_topk(*args)
    torch.testing.assert_close(fused_values, eager_values, rtol=1e-4, atol=0)
    result = {
        "fused_s": median_seconds(fused_topk, args, repeats),
        "eager_s": median_seconds(eager_topk, args, repeats),
        "fused_peak_bytes": peak_extra_bytes(fused_topk, *args),
        "eager_peak_bytes": peak_extra_bytes(eager_topk, *args),
        "threads": torch.get_num_threads(),
    }
    result["time_ratio"] = result["fused_s"] / result["eager_s"]
    result["memory_ratio"] = result["fused_peak_bytes"] / max(result["eager_peak_bytes"], 1)
    return result


@pytest.fixture(scope="module")
def inputs():
    return make_inputs(**SHAPE)


@pytest.mark.benchmark(group="seed_topk_cpu")
def test_fused(benchmark, inputs):
    benchmark.pedantic(fused_topk, args=inputs, rounds=5, warmup_rounds=1)


@pytest.mark.benchmark(group="seed_topk_cpu")
def test_eager(benchmark, inputs):
    benchmark.pedantic(eager_topk, args=inputs, rounds=5, warmup_rounds=1)


def test_ratio_report():
    """Both versions in one run; prints the ratios the README quotes (never asserts on time)."""
    result = compare()
    print("\n" + format_table(result))


def format_table(result: dict) -> str:
    mib = 1 << 20
    return "\n".join([
        f"seed-averaged top-k, CPU, {SHAPE}, {result['threads']} threads",
        "| version | median time (s) | peak extra memory (MiB) |",
        "|---|---|---|",
        f"| eager PyTorch | {result['eager_s']:.3f} | {result['eager_peak_bytes'] / mib:.1f} |",
        f"| fused two-pass | {result['fused_s']:.3f} | {result['fused_peak_bytes'] / mib:.1f} |",
        f"| ratio fused/eager | {result['time_ratio']:.2f}x | {result['memory_ratio']:.4f} |",
    ])


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    if (threads := parser.parse_args().threads) is not None:
        torch.set_num_threads(threads)
    print(format_table(compare()))
