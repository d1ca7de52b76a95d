"""Data-parallel training on CPU processes (torchrun, Gloo) against one process.

    python benchmarks/bench_data_parallel_training.py --json data_parallel.json

trains the same config, each run in fresh processes:

- 1 process x 1 thread and 1 process x 2 threads (no process group);
- 2 processes x 1 thread under torchrun: DistributedDataParallel, the combined batch split in two.

The config is the demo's DiffRec on the built-in synthetic data (d = 64, 2 layers, T = 20, batch
256, prefix sequences) with --samples sequences per epoch and 2 epochs; the timed quantity is
the second epoch's training time (the first warms up threads, allocator and Gloo), reported as
sequences per second, and the sharded validation pass after it. Every run is launched --rounds
times, interleaved with the others (against bursts of load from other jobs on a shared machine);
the table gives the median and the best round. The validation NDCG@10 of each run is reported
beside it: the same combined batches in every run, but dropout masks are drawn per process, so
the 2-process run is close to, not equal to, the 1-process one.
Options: --samples, --rounds, --dim, --data (a dataset file instead of the synthetic data).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

from common import machine_facts, publish, start_worker

CONFIG = dict(dim=64, layers=2, heads=2, max_len=20, dropout=0.1, attn_dropout=0.0, mode="prefix", batch_size=256,
              num_steps=1000, num_samples=10, epochs=2, device="cpu")


def worker(args) -> None:
    import torch

    from diffrec_ext import distributed as dd
    from diffrec_ext.data import load_dataset
    from diffrec_ext.synthetic import synthetic_dataset
    from diffrec_ext.train import TrainConfig, train

    torch.set_num_threads(args.threads)
    context = dd.init_process_group_from_env() if "RANK" in os.environ else None
    dataset = load_dataset(args.data) if args.data else synthetic_dataset()
    config = TrainConfig(**{**CONFIG, "dim": args.dim, "samples_per_epoch": args.samples})
    epochs = []
    train(config, dataset, progress=False, log=None, callback=epochs.append)
    if context is None or context.rank == 0:
        args.result.write_text(json.dumps({
            "processes": 1 if context is None else context.world_size, "threads_per_process": args.threads,
            "train_seconds": [e["train_seconds"] for e in epochs],
            "valid_seconds": [round(e["seconds"] - e["train_seconds"], 3) for e in epochs],
            "valid_ndcg10": epochs[-1]["valid"]["NDCG@10"], "loss": epochs[-1]["loss"],
        }))
    if context is not None:
        dd.exit_without_teardown(0)


RUNS = [  # (label, processes, threads per process, under torchrun)
    ("1 process x 1 thread", 1, 1, False),
    ("1 process x 2 threads", 1, 2, False),
    ("2 processes x 1 thread, DDP (Gloo)", 2, 1, True),
]


def compare(args) -> dict:
    records = {label: [] for label, *_ in RUNS}
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            for label, processes, threads, distributed in RUNS:
                result = Path(tmp) / f"{processes}p_{threads}t_{round_index}.json"
                load_before = os.getloadavg()[0]
                start_worker([str(Path(__file__).resolve()), "--worker", "--threads", str(threads), "--result",
                            str(result), "--samples", str(args.samples), "--dim", str(args.dim),
                            *(["--data", str(args.data)] if args.data else [])], processes, threads, distributed)
                record = json.loads(result.read_text())
                record["load_average_1min_before"] = load_before
                records[label].append(record)
    runs = []
    for label, attempts in records.items():
        seconds = [a["train_seconds"][-1] for a in attempts]
        runs.append(dict(label=label, processes=attempts[0]["processes"],
                         threads_per_process=attempts[0]["threads_per_process"],
                         median_train_s=statistics.median(seconds), min_train_s=min(seconds),
                         sequences_per_s=args.samples / statistics.median(seconds),
                         best_sequences_per_s=args.samples / min(seconds),
                         median_valid_s=statistics.median(a["valid_seconds"][-1] for a in attempts),
                         valid_ndcg10=[a["valid_ndcg10"] for a in attempts], train_seconds=seconds,
                         load_average_1min_before=[a["load_average_1min_before"] for a in attempts]))
    baseline = runs[0]
    for run in runs:
        run["speedup_vs_1x1"] = baseline["median_train_s"] / run["median_train_s"]
        run["best_speedup_vs_1x1"] = baseline["min_train_s"] / run["min_train_s"]
    return {
        "config": {**CONFIG, "dim": args.dim, "samples_per_epoch": args.samples}, "data": args.data or "synthetic",
        "rounds": args.rounds, "runs": runs,
        "machine": machine_facts(),
        "command": "python benchmarks/bench_data_parallel_training.py " + " ".join(sys.argv[1:]),
    }


def format_table(report: dict) -> str:
    config, machine = report["config"], report["machine"]
    lines = [
        f"DiffRec training, CPU, d={config['dim']} T={config['max_len']} batch {config['batch_size']}, "
        f"{config['samples_per_epoch']:,} sequences per epoch ({report['data']}), epoch 2, "
        f"median of {report['rounds']} rounds ({machine['cpus']} cores, torch {machine['torch']})",
        "| run | train epoch (s) | sequences/s | speed-up vs 1 x 1 | best round speed-up | validation (s) "
        "| valid NDCG@10 |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        lines.append(f"| {run['label']} | {run['median_train_s']:.2f} | {run['sequences_per_s']:.0f} | "
                     f"{run['speedup_vs_1x1']:.2f}x | {run['best_speedup_vs_1x1']:.2f}x | "
                     f"{run['median_valid_s']:.2f} | {run['valid_ndcg10'][-1]:.4f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, help="write the report here")
    parser.add_argument("--rounds", type=int, default=2, help="launches per run, interleaved")
    parser.add_argument("--samples", type=int, default=20480, help="training sequences per epoch")
    parser.add_argument("--dim", type=int, default=CONFIG["dim"])
    parser.add_argument("--data", type=Path, help="a dataset file (default: the built-in synthetic data)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return
    report = compare(args)
    publish(report, format_table(report), args.json)


if __name__ == "__main__":
    main()
