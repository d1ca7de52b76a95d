"""`diffrec score` throughput and memory: users per second, and peak resident memory against the
number of users (the scoring streams its input and output, so the peak should not grow with it).

    python benchmarks/bench_scoring.py --users 10000 100000 --json results/scoring_cpu/scoring.json

Each run is a fresh `python -m diffrec_ext score` process; its peak resident set comes from the
kernel's accounting of that child (wait4's ru_maxrss), its rate from the command's own line
("scored N users in S s"). Runs:

- the built-in synthetic dataset (2,500 users, `--data synthetic`: every user's whole sequence),
  unless --no-dataset-run;
- for each --users N: a JSON-lines history file of N synthetic users (the generator's sequences,
  20 to 60 items, kept to the checkpoint's catalog), `--histories`.

The checkpoint has the demo's model size (d = 64 by default, 2 layers, T = 20, S = 10, N = 1000)
on the synthetic catalog, with random weights (inference costs the same as for a trained one).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, demo_checkpoint, machine_facts, publish

LINE = re.compile(r"scored ([\d,]+) users in ([\d.]+) s \(([\d,]+) users/s")


def write_histories(path: Path, users: int, catalog: set) -> Path:
    import numpy as np

    from diffrec_ext.synthetic import synthetic_interactions

    table = synthetic_interactions(num_users=users, seed=1)
    table = table[table["item"].isin(catalog)]
    user_ids, items = table["user"].to_numpy(), table["item"].to_numpy()
    starts = np.flatnonzero(np.r_[True, user_ids[1:] != user_ids[:-1]])
    with open(path, "w") as handle:
        for user, history in zip(user_ids[starts], np.split(items, starts[1:])):
            handle.write(json.dumps({"user": int(user), "history": history.tolist()}) + "\n")
    return path


def run_score(arguments: list[str], threads: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "diffrec_ext", "score", *arguments, "--threads", str(threads), "--quiet"]
    load_before = os.getloadavg()
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
        _, status, usage = os.wait4(process.pid, 0)
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        output = out.read()
    wall = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"diffrec score failed ({process.returncode}):\n{output[-3000:]}")
    match = LINE.search(output)
    return {"users": int(match.group(1).replace(",", "")), "scoring_s": float(match.group(2)),
            "users_per_s": float(match.group(3).replace(",", "")), "wall_s": wall,
            "peak_rss_mib": usage.ru_maxrss / 1024, "load_average_before": load_before,
            "load_average_after": os.getloadavg()}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", nargs="+", type=int, default=[10_000, 100_000], help="history-file sizes")
    parser.add_argument("--dataset-run", action=argparse.BooleanOptionalAction, default=True,
                        help="also score the built-in synthetic dataset (2,500 users)")
    parser.add_argument("-k", type=int, default=100)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the scoring process")
    parser.add_argument("--chunk-users", type=int, default=8192)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)

    runs = []
    with tempfile.TemporaryDirectory(prefix="diffrec-score-bench-") as scratch:
        folder = Path(scratch)
        checkpoint = demo_checkpoint(folder / "ckpt", args.dim)
        catalog = set(json.loads((checkpoint / "items.json").read_text()))
        common = ["--checkpoint", str(checkpoint), "-k", str(args.k), "--chunk-users", str(args.chunk_users)]
        if args.dataset_run:
            run = run_score([*common, "--data", "synthetic", "--out", str(folder / "data.parquet")], args.threads)
            runs.append({"source": "--data synthetic", **run, "rows": run["users"] * args.k})
        for users in args.users:
            path = write_histories(folder / f"histories-{users}.jsonl", users, catalog)
            run = run_score([*common, "--histories", str(path), "--out", str(folder / f"h{users}.parquet")],
                            args.threads)
            runs.append({"source": "--histories (JSON lines)", **run, "rows": run["users"] * args.k})
            (folder / f"histories-{users}.jsonl").unlink()
    lines = ["| input | users | rows | scoring (s) | users/s | peak RSS (MiB) | load average before / after |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        lines.append(f"| {run['source']} | {run['users']:,} | {run['rows']:,} | {run['scoring_s']:.1f} | "
                     f"{run['users_per_s']:,.0f} | {run['peak_rss_mib']:.0f} | "
                     f"{run['load_average_before'][0]:.2f} / {run['load_average_after'][0]:.2f} |")
    files = [run for run in runs if run["source"].startswith("--histories")]
    if len(files) >= 2:
        lines.append(f"\npeak RSS {files[-1]['users']:,} users / {files[0]['users']:,} users = "
                     f"{files[-1]['peak_rss_mib'] / files[0]['peak_rss_mib']:.3f}x")
    report = {"machine": machine_facts(), "k": args.k, "dim": args.dim, "threads": args.threads,
              "chunk_users": args.chunk_users, "runs": runs}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    publish(report, "\n".join(lines), args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
