"""Catalog-sharded seed top-k on CPU processes (torch.distributed, Gloo) against one process.

    python benchmarks/bench_sharded_scoring.py --json sharded_scoring.json

runs, each in fresh processes, at B=64, S=10, d=256, V=200,000, k=20:

- `ops.seed_topk` in 1 process with 1 thread, and with 2 threads;
- `distributed.sharded_seed_topk` in 2 processes x 1 thread (launched with torchrun, Gloo on
  loopback), each holding half of the catalog;
- the same sharded code path in 1 process x 1 thread (world size 1), which separates the cost of
  the sharded algorithm (local lse pass + top-k pass with the given lse + collectives) from the
  gain of splitting the catalog.

Each run is launched --rounds times (interleaved with the other runs, against bursts of load from
other jobs), each launch times --repeats calls after one warm-up; the table gives the median of
all calls, and the fastest call (on a machine shared with other jobs, the closest to the
uncontended time). For the sharded runs one call's time is that of its slowest rank (barrier
before, max-reduce after). The driver checks that every run
returned the same item ids as the single-process op, prints a table and writes everything to the
JSON path. Options: --repeats, --rounds, --num-items, --batch, --seeds, --dim, -k.

The sharded worker can also be launched by hand, e.g.
    OMP_NUM_THREADS=1 torchrun --nproc_per_node=2 benchmarks/bench_sharded_scoring.py \
        --worker sharded --threads 1 --result /tmp/sharded.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import machine_facts, publish, start_worker

SHAPE = dict(batch=64, seeds=10, dim=256, num_items=200_000, k=20)


def make_inputs(batch, seeds, dim, num_items, seed=0):
    import torch

    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(batch, seeds, dim, generator=gen)
    weight = torch.randn(num_items, dim, generator=gen) / dim**0.5
    bias = torch.randn(num_items, generator=gen) * 0.1
    return hidden, weight, bias


# ----------------------------------------------------------------------------- workers


def run_worker(kind: str, threads: int, repeats: int, shape: dict, result_path: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    hidden, weight, bias = make_inputs(shape["batch"], shape["seeds"], shape["dim"], shape["num_items"])
    k = shape["k"]
    record = {"kind": kind, "threads_per_process": threads}
    if kind == "single":
        from diffrec_ext import ops

        def call():
            return ops.seed_topk(hidden, weight, bias, k)

        def timed():
            start = time.perf_counter()
            out = call()
            return time.perf_counter() - start, out

        record["processes"] = 1
    else:
        import torch.distributed as dist

        from diffrec_ext import distributed as dd

        context = dd.init_process_group_from_env()
        shard = dd.shard_catalog(weight, bias)
        shard_weight, shard_bias = shard.weight.clone(), shard.bias.clone()  # own copies, as in real use
        del weight, bias

        def call():
            return dd.sharded_seed_topk(hidden, shard_weight, shard_bias, k, shard.start)

        def timed():
            dist.barrier()
            start = time.perf_counter()
            out = call()
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the call lasts as long as its slowest rank
            return elapsed.item(), out

        record["processes"] = context.world_size
        record["backend"] = context.backend
    timed()  # warm-up: thread pool, BLAS, page faults, Gloo connections
    times, out = [], None
    for _ in range(repeats):
        seconds, out = timed()
        times.append(seconds)
    record.update(median_s=statistics.median(times), times_s=times)
    if kind == "single" or context.rank == 0:
        record["values"] = out[0].tolist()
        record["ids"] = out[1].tolist()
        result_path.write_text(json.dumps(record))
    if kind != "single":
        dist.destroy_process_group()


# ----------------------------------------------------------------------------- driver


def launch(kind: str, processes: int, threads: int, repeats: int, shape: dict, folder: Path) -> dict:
    result = folder / f"{kind}_{processes}p_{threads}t.json"
    start_worker([str(Path(__file__).resolve()), "--worker", kind, "--threads", str(threads), "--repeats", str(repeats),
                "--result", str(result), *shape_args(shape)], processes, threads, distributed=kind != "single")
    return json.loads(result.read_text())


def shape_args(shape: dict) -> list[str]:
    return ["--batch", str(shape["batch"]), "--seeds", str(shape["seeds"]), "--dim", str(shape["dim"]),
            "--num-items", str(shape["num_items"]), "-k", str(shape["k"])]


RUNS = [  # (label, kind, processes, threads per process)
    ("1 process x 1 thread, ops.seed_topk", "single", 1, 1),
    ("1 process x 2 threads, ops.seed_topk", "single", 1, 2),
    ("2 processes x 1 thread, sharded_seed_topk (Gloo)", "sharded", 2, 1),
    ("1 process x 1 thread, sharded_seed_topk (world size 1)", "sharded", 1, 1),
]


def compare(repeats: int, rounds: int, shape: dict) -> dict:
    """Every run `rounds` times, interleaved (round 1 of all runs, then round 2, ...), so that a
    burst of load from other jobs on a shared machine does not land on one run only."""
    records = {label: [] for label, *_ in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(rounds):
            for label, kind, processes, threads in RUNS:
                load_before = os.getloadavg()[0]
                record = launch(kind, processes, threads, repeats, shape, Path(tmp))
                record["load_average_1min_before"] = load_before
                records[label].append(record)
    runs = []
    for label, attempts in records.items():
        times = [t for attempt in attempts for t in attempt["times_s"]]
        runs.append(dict(label=label, processes=attempts[0]["processes"],
                         threads_per_process=attempts[0]["threads_per_process"],
                         median_s=statistics.median(times), min_s=min(times), times_s=times,
                         load_average_1min_before=[a["load_average_1min_before"] for a in attempts],
                         values=attempts[-1]["values"], ids=[a["ids"] for a in attempts]))
    baseline = runs[0]
    for run in runs:
        run["speedup_vs_1x1"] = baseline["median_s"] / run["median_s"]
        run["min_speedup_vs_1x1"] = baseline["min_s"] / run["min_s"]
        run["same_ids_as_single_process"] = all(ids == baseline["ids"][0] for ids in run["ids"])
        run["max_rel_value_diff"] = max(abs(a - b) / abs(b) for ra, rb in zip(run["values"], baseline["values"])
                                        for a, b in zip(ra, rb))
    return {
        "shape": shape, "repeats": repeats, "rounds": rounds,
        "runs": [{k: v for k, v in r.items() if k not in ("values", "ids")} for r in runs],
        "machine": machine_facts(),
        "command": "python benchmarks/bench_sharded_scoring.py " + " ".join(sys.argv[1:]),
    }


def format_table(report: dict) -> str:
    s = report["shape"]
    machine = report["machine"]
    title = (f"seed-averaged top-k, CPU, B={s['batch']} S={s['seeds']} d={s['dim']} V={s['num_items']:,} "
             f"k={s['k']}, median of {report['rounds']} x {report['repeats']} calls "
             f"({machine['cpus']} cores, torch {machine['torch']})")
    lines = [
        title,
        "| run | median (s) | speed-up vs 1 x 1, medians | fastest call (s) | speed-up, fastest calls "
        "| same ids as ops.seed_topk |",
        "|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lines.append(f"| {run['label']} | {run['median_s']:.3f} | {run['speedup_vs_1x1']:.2f}x | "
                     f"{run['min_s']:.3f} | {run['min_speedup_vs_1x1']:.2f}x | "
                     f"{'yes' if run['same_ids_as_single_process'] else 'NO'} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per launch")
    parser.add_argument("--rounds", type=int, default=2, help="launches per run, interleaved")
    parser.add_argument("--batch", type=int, default=SHAPE["batch"])
    parser.add_argument("--seeds", type=int, default=SHAPE["seeds"])
    parser.add_argument("--dim", type=int, default=SHAPE["dim"])
    parser.add_argument("--num-items", type=int, default=SHAPE["num_items"])
    parser.add_argument("-k", type=int, default=SHAPE["k"])
    parser.add_argument("--worker", choices=["single", "sharded"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    shape = dict(batch=args.batch, seeds=args.seeds, dim=args.dim, num_items=args.num_items, k=args.k)
    if args.worker:
        run_worker(args.worker, args.threads, args.repeats, shape, args.result)
        return
    report = compare(args.repeats, args.rounds, shape)
    publish(report, format_table(report), args.json)


if __name__ == "__main__":
    main()
