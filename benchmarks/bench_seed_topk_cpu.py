"""Seed-averaged top-k on the CPU: the fused kernel (one pass with a certificate, a second pass for
the users it cannot certify) at float32, bfloat16 and float16 inputs against eager PyTorch float32
(einsum, softmax, mean over seeds, topk): time, peak memory and the certified fraction, all
measured in one run.

    python benchmarks/bench_seed_topk_cpu.py [--threads N] [--data correlated|independent|both] [--json F]
    python -m pytest benchmarks/bench_seed_topk_cpu.py --benchmark-only -s

Data. "correlated": each user's S seeds are drawn around one vector (seed spread 0.5, logit
standard deviation about 1), as Alg. 3's seeds are S noise draws for one history; the certificate
is made for this. "independent": every (user, seed) vector drawn independently (the inputs this
benchmark used before): with nearly flat, unrelated softmaxes the bound (1/S) sum_s exp(tau_s -
lse_s) stays above the k-th score, nothing certifies, and the kernel makes its two passes: the
worst case.

Memory is the growth of the resident set (Linux VmHWM after resetting it through
/proc/self/clear_refs), so it counts every allocation, the BLAS workspace included. The load
average is printed with the table: the machine may be shared, and a busy core slows both sides.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout: use its diffrec_ext, not another installed copy
    sys.path.insert(0, str(REPO))

from diffrec_ext import ops  # noqa: E402

SHAPE = dict(batch=64, seeds=10, dim=256, num_items=200_000, k=20)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SEED_SPREAD = 0.5


def make_inputs(batch, seeds, dim, num_items, k, data="correlated", seed=0):
    gen = torch.Generator().manual_seed(seed)
    if data == "correlated":
        centre = torch.randn(batch, 1, dim, generator=gen)
        noise = torch.randn(batch, seeds, dim, generator=gen)
        hidden = centre * math.sqrt(1 - SEED_SPREAD**2) + SEED_SPREAD * noise
    elif data == "independent":
        hidden = torch.randn(batch, seeds, dim, generator=gen)
    else:
        raise ValueError(f"data must be correlated or independent, got {data!r}")
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


def certified_fraction(args) -> float:
    fused_topk(*args)
    counts = ops._C.seed_topk_counts()
    return counts["certified"] / counts["users"]


def compare(repeats: int = 5, data: str = "correlated", dtypes=tuple(DTYPES), **shape) -> dict:
    """Eager float32 and the kernel at each input dtype, in one run: times, memory, certified
    fraction. The kernel's values are checked against eager's on the same (rounded) inputs."""
    hidden, weight, bias, k = make_inputs(**{**SHAPE, **shape}, data=data)
    eager_args = (hidden, weight, bias, k)
    eager_topk(*eager_args)  # warm-up: thread pools, BLAS, page faults
    result = {
        "shape": {**SHAPE, **shape}, "data": data, "threads": torch.get_num_threads(),
        "extension": ops._C.__file__,
        "load_average_before": os.getloadavg(),
        "eager_s": median_seconds(eager_topk, eager_args, repeats),
        "eager_peak_bytes": peak_extra_bytes(eager_topk, *eager_args),
        "fused": {},
    }
    for name in dtypes:
        dtype = DTYPES[name]
        args = (hidden.to(dtype), weight.to(dtype), bias.to(dtype), k)
        values, _ = fused_topk(*args)  # warm-up
        want, _ = eager_topk(*(t.float() for t in args[:3]), k)
        torch.testing.assert_close(values, want, rtol=1e-4, atol=0)
        seconds = median_seconds(fused_topk, args, repeats)
        result["fused"][name] = {
            "seconds": seconds, "ratio_to_eager_fp32": seconds / result["eager_s"],
            "peak_bytes": peak_extra_bytes(fused_topk, *args),
            "certified_fraction": certified_fraction(args),
        }
    # The non-finite check every seed op makes (one min/max pass over each input), alone.
    checks = (hidden, weight, bias)
    result["finite_check_s"] = median_seconds(lambda *ts: [torch.aminmax(t) for t in ts], checks, repeats)
    result["load_average_after"] = os.getloadavg()
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
    """Both versions in one run; prints the table the README quotes (never asserts on time)."""
    print("\n" + format_table(compare()))


def format_table(result: dict) -> str:
    mib = 1 << 20
    load = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    lines = [
        f"seed-averaged top-k, CPU, {result['shape']}, {result['data']} seeds, {result['threads']} threads, "
        f"load average {load(result['load_average_before'])} before, {load(result['load_average_after'])} after, "
        f"extension {result['extension']}",
        "| version | median time (s) | time / eager fp32 | peak extra memory (MiB) | users certified |",
        "|---|---|---|---|---|",
        f"| eager PyTorch fp32 | {result['eager_s']:.3f} | 1.00x | {result['eager_peak_bytes'] / mib:.1f} | - |",
    ]
    for name, run in result["fused"].items():
        lines.append(f"| seed_topk {name} | {run['seconds']:.3f} | {run['ratio_to_eager_fp32']:.2f}x | "
                     f"{run['peak_bytes'] / mib:.1f} | {run['certified_fraction']:.0%} |")
    lines.append(f"non-finite input check alone (aminmax of hidden, weight, bias): {result['finite_check_s']:.3f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--data", choices=["correlated", "independent", "both"], default="both")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    options = parser.parse_args()
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    results = []
    for data in (["correlated", "independent"] if options.data == "both" else [options.data]):
        results.append(compare(options.repeats, data, tuple(options.dtypes)))
        print(format_table(results[-1]), flush=True)
    if options.json is not None:
        options.json.write_text(json.dumps(results, indent=2))
