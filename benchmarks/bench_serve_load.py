"""Load test of the HTTP endpoint with locust: the FastAPI server (diffrec_ext.serve) against the
earlier hand-written http.server one, at the same concurrency, in one run.

    python benchmarks/bench_serve_load.py --users 8 32 --duration 20 --json results/serve_load/load.json

For each concurrency U and each server: a fresh server process on loopback (port 0, one torch
thread, the same checkpoint), a short warm-up, then `locust --headless` with U users that each
post {"history": [...], "k": 10} one after the other (benchmarks/locustfile_serve.py: random
histories of known items, an answer is a failure unless it is 200 with k items) for --duration
seconds; requests/s, p50/p99/max latency, failures, the server's CPU time (per request, and in
cores over the run: on a machine whose cores are all busy, a server with more runnable threads
gets a larger share of them) and its resident set afterwards. The
servers alternate order between rounds. The load generator runs on the same machine: both servers
share the same conditions, and the load averages are printed with every row.

The old server is the module as it was at --legacy-commit (git show; the default is the last
commit that had it), loaded into the package under another name, so the comparison can be rerun
after its removal. The checkpoint defaults to the demo's model size (d = 64, 2 layers, T = 20,
S = 10, N = 1000) on the synthetic catalog with random weights (inference costs the same).
"""

from __future__ import annotations

import argparse
import csv
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO_ROOT, demo_checkpoint, machine_facts, publish

LEGACY_COMMIT = "d9e8aaf681288f3e500df403cf224c6123ec17cb"  # the last commit with the http.server endpoint
LOCUSTFILE = Path(__file__).resolve().parent / "locustfile_serve.py"
SERVERS = ("legacy", "fastapi")
LEGACY_LAUNCHER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("diffrec_ext._legacy_serve", sys.argv[1])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
sys.exit(module.main(sys.argv[2:]))
"""


def load_spec(checkpoint: Path, path: Path, k: int, seed: int) -> Path:
    """The locust users' request spec: the checkpoint's item ids and window."""
    from diffrec_ext.checkpoint import read_meta

    _, meta, items = read_meta(checkpoint)
    path.write_text(json.dumps({"items": items, "max_history": meta["config"]["max_len"] - 1, "k": k, "seed": seed}))
    return path


def environment() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1"}


def start_server(kind: str, checkpoint: Path, legacy_source: Path | None, threads: int, log: Path):
    """(process, url) of a server on a free loopback port; its log goes to `log` (a file: a pipe
    nobody reads could fill up and stop the server)."""
    options = ["--checkpoint", str(checkpoint), "--port", "0", "--device", "cpu", "--threads", str(threads), "--quiet"]
    if kind == "legacy":
        command = [sys.executable, "-c", LEGACY_LAUNCHER, str(legacy_source), *options]
    else:
        command = [sys.executable, "-m", "diffrec_ext.serve", *options]
    with open(log, "w") as stderr:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env=environment(), stdout=subprocess.PIPE, stderr=stderr,
                                   text=True)
    line = process.stdout.readline()  # the server prints its address, then nothing more on stdout
    if " on http://" not in line:
        process.kill()
        raise RuntimeError(f"the {kind} server did not start: {line!r} {log.read_text()[-2000:]}")
    return process, line.split(" on ", 1)[1].split()[0]


def stop_server(process) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def resident_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def warm_up(url: str, spec: dict, count: int = 20) -> None:
    host, port = url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=60)
    for index in range(count):
        body = json.dumps({"history": spec["items"][index:index + 3], "k": spec["k"]})
        connection.request("POST", "/recommend", body=body, headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"warm-up request answered {response.status}")
    connection.close()


def run_locust(url: str, spec_path: Path, users: int, seconds: int, prefix: Path) -> dict:
    """Headless locust against `url`; the aggregated row of its statistics (times in ms)."""
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--users", str(users),
               "--spawn-rate", str(users), "--run-time", f"{seconds}s", "--host", url, "--csv", str(prefix),
               "--only-summary", "--stop-timeout", "5", "--exit-code-on-error", "0", "--loglevel", "WARNING"]
    subprocess.run(command, cwd=REPO_ROOT, env={**environment(), "DIFFREC_LOAD_SPEC": str(spec_path)},
                   capture_output=True, text=True, timeout=seconds + 120, check=True)
    with open(f"{prefix}_stats.csv", newline="") as handle:
        row = next(r for r in csv.DictReader(handle) if r["Name"] == "Aggregated")
    with open(f"{prefix}_failures.csv", newline="") as handle:
        failures = [{"error": r["Error"], "occurrences": int(r["Occurrences"])} for r in csv.DictReader(handle)]
    return {"requests": int(row["Request Count"]), "failures": int(row["Failure Count"]),
            "requests_per_s": float(row["Requests/s"]), "p50_ms": float(row["50%"]), "p99_ms": float(row["99%"]),
            "mean_ms": float(row["Average Response Time"]), "max_ms": float(row["Max Response Time"]),
            "failure_kinds": failures[:5]}


def measure(kind: str, users: int, args, checkpoint: Path, legacy_source: Path | None, spec_path: Path,
            folder: Path) -> dict:
    load_before = os.getloadavg()
    process, url = start_server(kind, checkpoint, legacy_source, args.threads, folder / f"{kind}-u{users}.log")
    try:
        warm_up(url, json.loads(spec_path.read_text()))
        cpu_before = cpu_seconds(process.pid)
        stats = run_locust(url, spec_path, users, args.duration, folder / f"{kind}-u{users}-{time.monotonic_ns()}")
        cpu = cpu_seconds(process.pid) - cpu_before
        rss = resident_mib(process.pid)
    finally:
        stop_server(process)
    return {"server": kind, "users": users, "seconds": args.duration, **stats, "server_rss_mib": rss,
            "server_cpu_ms_per_request": 1000 * cpu / max(stats["requests"], 1),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def table(runs: list[dict]) -> str:
    lines = ["| server | users | requests | failures | requests/s | p50 (ms) | p99 (ms) | max (ms) | server CPU "
             "per request (ms) | server CPU used (cores) | server RSS (MiB) | load average before / after |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        load = f"{run['load_average_before'][0]:.2f} / {run['load_average_after'][0]:.2f}"
        rss = f"{run['server_rss_mib']:.0f}" if run["server_rss_mib"] is not None else "-"
        lines.append(f"| {run['server']} | {run['users']} | {run['requests']:,} | {run['failures']} | "
                     f"{run['requests_per_s']:.1f} | {run['p50_ms']:.0f} | {run['p99_ms']:.0f} | {run['max_ms']:.0f} | "
                     f"{run['server_cpu_ms_per_request']:.2f} | "
                     f"{run['server_cpu_ms_per_request'] * run['requests'] / 1000 / run['seconds']:.2f} | {rss} | {load} |")
    return "\n".join(lines)


def ratios(runs: list[dict]) -> str:
    """FastAPI against the old server per concurrency (medians over rounds)."""
    import statistics

    lines = []
    for users in sorted({run["users"] for run in runs}):
        pick = {kind: [run for run in runs if run["server"] == kind and run["users"] == users] for kind in SERVERS}
        if not all(pick.values()):
            continue
        rps = {kind: statistics.median(run["requests_per_s"] for run in pick[kind]) for kind in SERVERS}
        p99 = {kind: statistics.median(run["p99_ms"] for run in pick[kind]) for kind in SERVERS}
        lines.append(f"users {users}: requests/s fastapi / legacy = {rps['fastapi'] / rps['legacy']:.2f}x; "
                     f"p99 fastapi / legacy = {p99['fastapi'] / p99['legacy']:.2f}x (lower is better)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", nargs="+", choices=SERVERS, default=list(SERVERS))
    parser.add_argument("--users", nargs="+", type=int, default=[8, 32], help="locust users (concurrency)")
    parser.add_argument("--duration", type=int, default=20, help="seconds of load per run")
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run, alternating the server order")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of each server")
    parser.add_argument("--checkpoint", type=Path, default=None, help="default: the demo-sized random model")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--legacy-commit", default=LEGACY_COMMIT, help="where to take the old server from (git)")
    parser.add_argument("--json", type=Path, default=None, help="write the report here")
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="diffrec-load-") as scratch:
        folder = Path(scratch)
        checkpoint = args.checkpoint or demo_checkpoint(folder / "checkpoint")
        spec_path = load_spec(checkpoint, folder / "spec.json", args.k, seed=0)
        legacy_source = None
        if "legacy" in args.servers:
            legacy_source = folder / "legacy_serve.py"
            source = subprocess.run(["git", "show", f"{args.legacy_commit}:diffrec_ext/serve.py"], cwd=REPO_ROOT,
                                    capture_output=True, text=True)
            if source.returncode != 0:
                raise SystemExit(f"cannot read the old server at {args.legacy_commit} (needs the git history): "
                                 f"{source.stderr.strip()}; run with --servers fastapi")
            legacy_source.write_text(source.stdout)
        runs = []
        for round_index in range(args.rounds):
            order = args.servers if round_index % 2 == 0 else list(reversed(args.servers))
            for users in args.users:
                for kind in order:
                    run = measure(kind, users, args, checkpoint, legacy_source, spec_path, folder)
                    print(f"round {round_index + 1}, {kind}, {users} users: {run['requests']:,} requests, "
                          f"{run['failures']} failures, {run['requests_per_s']:.1f}/s, p50 {run['p50_ms']:.0f} ms, "
                          f"p99 {run['p99_ms']:.0f} ms, server CPU {run['server_cpu_ms_per_request']:.2f} ms/request (load average {run['load_average_before'][0]:.2f})", flush=True)
                    runs.append(run)
    report = {"machine": machine_facts(), "legacy_commit": args.legacy_commit, "duration_s": args.duration,
              "threads": args.threads, "k": args.k, "checkpoint": str(args.checkpoint or "demo-sized random model"),
              "runs": runs}
    text = table(runs) + "\n\n" + ratios(runs)
    if args.markdown:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(text + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
    publish(report, text, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
