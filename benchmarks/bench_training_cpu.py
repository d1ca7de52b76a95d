"""Training benchmark on the CPU: RecBole 1.2.1's SASRec (CE) against this project's SASRec and DiffRec
(issue 12, item 4), on the same Beauty data, the same machine and the same torch threads, one system
after another in one run.

    # the full run (about 5 x --minutes plus start-up; writes results/train_bench_cpu/)
    python benchmarks/bench_training_cpu.py --minutes 6 --threads 1

    # a check that everything starts and reports (1 minute per system, written to a temp dir)
    python benchmarks/bench_training_cpu.py --quick

    # only some systems; bf16 off only
    python benchmarks/bench_training_cpu.py --systems recbole-sasrec,sasrec-fp32,diffrec-fp32

Every system gets the same wall-clock budget (--minutes, counted from its process start, so data
loading counts), validates on the full catalog after every epoch, and is stopped (SIGINT) when the
budget runs out; the table reports its LAST epoch that finished (training and validation) inside the
budget. Measured per system: seconds per epoch (training only, and with validation), training
targets per epoch (supervised next-item predictions), targets per second of training, epochs done,
validation HR@10 / NDCG@10 at the budget, and the load average at its start and end.

Systems:
- recbole-sasrec: RecBole 1.2.1 SASRec, loss_type CE, MAX_ITEM_LIST_LENGTH 50, hidden_size 64,
  inner_size 256, 2 layers, 2 heads, dropout 0.3 (hidden and attention), lr 2e-3, train_batch_size
  256, leave-one-out `eval_args: {split: {LS: valid_and_test}, order: TO, mode: full}`. It trains
  on every prefix of each user's training items (one target per prefix), so its targets per epoch =
  training interactions - users. RecBole does not remove seen items when it ranks for a sequential
  model. It runs in its own venv (numpy<2, pandas<2.3, setuptools<80 conflict with ours), created
  by this script on first use at --venv (default ~/.cache/diffrec_ext/recbole-venv) with
  `pip install torch==2.13.0 recbole==1.2.1 "numpy<2" "pandas<2.3" "scipy<1.14" "setuptools<80"`;
  the driver it runs is written by this script into the work dir (RECBOLE_DRIVER below).
- sasrec-{fp32,bf16} / diffrec-{fp32,bf16}: `python -m diffrec_ext train` in window mode (the
  default), --bf16 off / on (on, not auto: auto autocasts on CUDA only, so on the CPU it would
  repeat the fp32 run; the report says what auto picks and whether the CPU has native bf16), with the recommended settings (best on the validation split in the earlier ML-1M
  exploration): SASRec `--kind sasrec --dim 64 --lr 2e-3 --dropout 0.3`, DiffRec `--kind diffrec
  --dim 64 --tie-output --input-scale 0.2 --lr 2e-3 --dropout 0.3`; --max-len 50, --batch-size 256,
  --k-core 1 = no filter (Beauty.txt is already 5-core: both sides see the same users, items and
  interactions, checked and printed), and --no-eval-exclude-seen so that validation ranks the seen
  items too, as RecBole does. Targets per epoch and per second come from log.jsonl (`coverage` x
  training targets, `targets_per_s`).

A system that finishes no epoch inside the budget still gets a training rate, marked ~ in the
table: the rate inside its unfinished first epoch (RecBole's driver prints its batches; ours draws
its tqdm bar on a pseudo-terminal that this script reads).

Outputs in --out (default results/train_bench_cpu): table.md, table.csv and run.json (machine,
commit, command, per-system epochs and load averages). The converted .inter file, RecBole's files
and our run directories go to --work (default ~/.cache/diffrec_ext/bench_train), never the repo.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import fcntl
import json
import os
import platform
import pty
import re
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import termios
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path("/work/shared/data/beauty/Beauty.txt")
RECBOLE_PACKAGES = ["torch==2.13.0", "recbole==1.2.1", "numpy<2", "pandas<2.3", "scipy<1.14", "setuptools<80"]
OURS_COMMON = ["--dim", "64", "--lr", "2e-3", "--dropout", "0.3", "--max-len", "50", "--batch-size", "256",
               "--mode", "window", "--k-core", "1", "--no-eval-exclude-seen", "--seed", "42"]
SYSTEMS = {
    "recbole-sasrec": None,
    "sasrec-fp32": ["--kind", "sasrec", "--bf16", "off"],
    "sasrec-bf16": ["--kind", "sasrec", "--bf16", "on"],
    "diffrec-fp32": ["--kind", "diffrec", "--tie-output", "--input-scale", "0.2", "--bf16", "off"],
    "diffrec-bf16": ["--kind", "diffrec", "--tie-output", "--input-scale", "0.2", "--bf16", "on"],
}

RECBOLE_DRIVER = r'''
"""RecBole 1.2.1 SASRec (CE) driver of benchmarks/bench_training_cpu.py: one JSON line per epoch on stdout
(train/valid seconds, targets, valid metrics), progress lines within the epoch, until it is stopped."""
import json, sys, time
args = json.loads(sys.argv[1])
started = time.perf_counter()
import torch
torch.set_num_threads(args["threads"])
from recbole.config import Config
from recbole.data import create_dataset, data_preparation
from recbole.model.sequential_recommender import SASRec
from recbole.trainer import Trainer
from recbole.utils import init_seed

def emit(record):
    record["t"] = round(time.perf_counter() - started, 3)
    print(json.dumps(record), flush=True)

config = Config(model="SASRec", dataset=args["dataset"], config_dict={
    "data_path": args["data_path"], "checkpoint_dir": args["checkpoint_dir"],
    "USER_ID_FIELD": "user_id", "ITEM_ID_FIELD": "item_id", "TIME_FIELD": "timestamp",
    "load_col": {"inter": ["user_id", "item_id", "timestamp"]},
    "user_inter_num_interval": "[0,inf)", "item_inter_num_interval": "[0,inf)",
    "MAX_ITEM_LIST_LENGTH": 50, "hidden_size": 64, "inner_size": 256, "n_layers": 2, "n_heads": 2,
    "hidden_dropout_prob": args["dropout"], "attn_dropout_prob": args["dropout"],
    "loss_type": "CE", "train_neg_sample_args": None, "learning_rate": args["lr"],
    "train_batch_size": 256, "eval_batch_size": 4096, "epochs": 100000, "stopping_step": 100000,
    "eval_args": {"split": {"LS": "valid_and_test"}, "order": "TO", "mode": "full", "group_by": "user"},
    "metrics": ["Hit", "NDCG"], "topk": [10], "valid_metric": "NDCG@10",
    "use_gpu": False, "seed": 42, "reproducibility": True, "show_progress": False, "worker": 0,
    "save_dataset": False, "save_dataloaders": False, "log_wandb": False,
})
torch.set_num_threads(args["threads"])
init_seed(config["seed"], config["reproducibility"])
dataset = create_dataset(config)
counts = {"users": dataset.user_num - 1, "items": dataset.item_num - 1, "interactions": dataset.inter_num}
train_data, valid_data, test_data = data_preparation(config, dataset)  # augments `dataset` in place
model = SASRec(config, train_data.dataset).to(config["device"])
trainer = Trainer(config, model)
targets = len(train_data.dataset)
emit({"event": "ready", **counts, "train_targets": targets,
      "valid_users": len(valid_data.dataset), "threads": torch.get_num_threads(),
      "torch": torch.__version__, "device": str(config["device"]),
      "parameters": sum(p.numel() for p in model.parameters())})

progress = {"batches": 0, "targets": 0, "epoch_start": None}
calculate_loss = model.calculate_loss
def counted_loss(interaction):  # called at the start of each batch: the batches counted so far are done
    if progress["batches"] and progress["batches"] % 2 == 0:
        emit({"event": "progress", "batches": progress["batches"], "of_batches": len(train_data),
              "targets": progress["targets"],
              "train_seconds": round(time.perf_counter() - progress["epoch_start"], 3)})
    progress["batches"] += 1
    progress["targets"] += len(interaction)
    return calculate_loss(interaction)
model.calculate_loss = counted_loss

for epoch in range(100000):
    progress.update(batches=0, targets=0, epoch_start=time.perf_counter())
    loss = trainer._train_epoch(train_data, epoch, show_progress=False)
    train_seconds = time.perf_counter() - progress["epoch_start"]
    t = time.perf_counter()
    score, result = trainer._valid_epoch(valid_data, show_progress=False)
    valid_seconds = time.perf_counter() - t
    loss = float(sum(loss)) if isinstance(loss, tuple) else float(loss)
    emit({"event": "epoch", "epoch": epoch + 1, "loss": loss / max(1, progress["batches"]),
          "train_seconds": round(train_seconds, 3), "valid_seconds": round(valid_seconds, 3),
          "seconds": round(train_seconds + valid_seconds, 3), "targets": progress["targets"],
          "targets_per_s": round(progress["targets"] / train_seconds, 1),
          "valid": {"HR@10": float(result["hit@10"]), "NDCG@10": float(result["ndcg@10"])}})
'''


def log(message: str) -> None:
    print(f"[{datetime.datetime.now(datetime.timezone.utc):%H:%M:%S}] {message}", flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ---------------------------------------------------------------- data


def convert_to_inter(data: Path, work: Path) -> tuple[Path, str, dict]:
    """Beauty.txt (`user item item ...`) -> <work>/recbole_data/beauty/beauty.inter with the position in
    the sequence as timestamp. Returns the data_path, the dataset name and the counts it holds."""
    name = "beauty"
    folder = work / "recbole_data" / name
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"{name}.inter"
    users, items, interactions, targets = set(), set(), 0, 0
    tmp = target.with_suffix(".inter.tmp")
    with open(data, encoding="utf-8") as src, open(tmp, "w", encoding="utf-8") as out:
        out.write("user_id:token\titem_id:token\ttimestamp:float\n")
        for line in src:
            fields = line.split()
            if not fields:
                continue
            user, seq = fields[0], fields[1:]
            users.add(user)
            items.update(seq)
            interactions += len(seq)
            targets += max(0, len(seq) - 2 - 1)  # leave-one-out: training part minus its first item
            for position, item in enumerate(seq):
                out.write(f"{user}\t{item}\t{position}\n")
    os.replace(tmp, target)
    counts = {"users": len(users), "items": len(items), "interactions": interactions, "train_targets": targets}
    return folder.parent, name, counts


def our_counts(data: Path) -> dict:
    from diffrec_ext.data import load_dataset, training_target_count

    dataset = load_dataset(data, "sequence", k_core=1)
    return {"users": dataset.num_users, "items": dataset.num_items, "interactions": dataset.num_actions,
            "train_targets": training_target_count(dataset)}


# ---------------------------------------------------------------- RecBole venv


def venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def recbole_ready(venv: Path) -> str | None:
    python = venv_python(venv)
    if not python.exists():
        return None
    probe = subprocess.run([str(python), "-c", "import recbole, torch, numpy; print(recbole.__version__, "
                            "torch.__version__, numpy.__version__)"], capture_output=True, text=True)
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_recbole_venv(venv: Path) -> str:
    versions = recbole_ready(venv)
    if versions:
        return versions
    log(f"creating RecBole's venv at {venv} (pip install {' '.join(RECBOLE_PACKAGES)}); a few minutes")
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
    subprocess.run([str(venv_python(venv)), "-m", "pip", "install", "--quiet", *RECBOLE_PACKAGES], check=True)
    versions = recbole_ready(venv)
    if not versions:
        raise SystemExit(f"RecBole's venv at {venv} does not import recbole after the install")
    return versions


# ---------------------------------------------------------------- running one system under a budget


def _default_sigint() -> None:
    """In the child: SIGINT back to its default, so Python turns it into KeyboardInterrupt even when this
    script runs in the background of a shell (which starts background jobs with SIGINT ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_budgeted(command: list[str], budget_s: float, env: dict, cwd: Path, stdout_log: Path,
                 tty_stderr: bool = False) -> dict:
    """Start `command`, timestamp its output lines, SIGINT it when `budget_s` has passed since its start
    (then SIGTERM / SIGKILL if it does not stop). Returns the lines with their times. tty_stderr: the
    child's stderr is a pseudo-terminal (so `diffrec train` draws its tqdm bar, whose updates, split at
    carriage returns, are the lines too: the progress inside an epoch)."""
    lines: list[tuple[float, str]] = []
    lock = threading.Lock()
    cpu_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load_start = load()
    started = time.perf_counter()
    master = slave = None
    if tty_stderr:
        master, slave = pty.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # 0 columns: tqdm draws nothing
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=slave if tty_stderr else subprocess.STDOUT,
                               text=True, env=env, cwd=cwd, start_new_session=True, preexec_fn=_default_sigint)
    if slave is not None:
        os.close(slave)
    handle = open(stdout_log, "w", encoding="utf-8")

    def add(text: str) -> None:
        with lock:
            lines.append((time.perf_counter() - started, text))
            handle.write(f"{lines[-1][0]:9.2f} {text}\n")
            handle.flush()

    def reader():
        for line in process.stdout:
            add(line.rstrip("\n"))

    def tty_reader():
        pending = ""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            pending += chunk.decode("utf-8", "replace")
            *done, pending = re.split(r"[\r\n]", pending)
            for fragment in done:
                if fragment.strip():
                    add(fragment.strip())

    threads = [threading.Thread(target=reader, daemon=True)]
    if tty_stderr:
        threads.append(threading.Thread(target=tty_reader, daemon=True))
    for thread in threads:
        thread.start()
    try:
        process.wait(timeout=budget_s)
        stopped = False
    except subprocess.TimeoutExpired:
        stopped = True
        load_end = load()
        for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 15), (signal.SIGKILL, 15)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                break
            try:
                process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
    if not stopped:
        load_end = load()
    for thread in threads:
        thread.join(timeout=10)
    if master is not None:
        os.close(master)
    handle.close()
    cpu_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = (cpu_after.ru_utime - cpu_before.ru_utime) + (cpu_after.ru_stime - cpu_before.ru_stime)
    return {"lines": lines, "cpu_s": round(cpu_s, 1), "returncode": process.returncode, "stopped_by_budget": stopped,
            "wall_s": round(time.perf_counter() - started, 1), "load_start": load_start, "load_end": load_end}


def json_lines(lines):
    for t, line in lines:
        if line.startswith("{"):
            try:
                yield t, json.loads(line)
            except json.JSONDecodeError:
                pass


def run_recbole(args, work: Path, data_path: Path, name: str, env: dict) -> dict:
    driver = work / "recbole_driver.py"
    driver.write_text(RECBOLE_DRIVER, encoding="utf-8")
    run_dir = work / "recbole_run"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    options = {"threads": args.threads, "dataset": name, "data_path": str(data_path), "lr": 2e-3, "dropout": 0.3,
               "checkpoint_dir": str(run_dir / "saved")}
    command = [str(venv_python(args.venv)), str(driver), json.dumps(options)]
    run = run_budgeted(command, args.minutes * 60, env, run_dir, run_dir / "stdout.log")
    ready, epochs, progress = None, [], None
    for t, record in json_lines(run["lines"]):
        if record.get("event") == "ready":
            ready = record
        elif record.get("event") == "epoch" and t <= args.minutes * 60:
            epochs.append(record)
        elif record.get("event") == "progress":
            progress = record
    if ready is None:
        tail = "\n".join(line for _, line in run["lines"][-30:])
        raise SystemExit(f"RecBole did not start (exit {run['returncode']}):\n{tail}")
    return {"system": "recbole-sasrec", "bf16": "off", "seen_excluded": False, "ready": ready, "epochs": epochs,
            "targets_per_epoch": ready["train_targets"], "partial_epoch": progress,
            "command": command, **{k: v for k, v in run.items() if k != "lines"}}


def run_ours(args, system: str, env: dict, work: Path) -> dict:
    run_dir = work / f"ours_{system}"
    shutil.rmtree(run_dir, ignore_errors=True)
    command = [sys.executable, "-m", "diffrec_ext", "train", "--data", str(args.data), "--format", "sequence",
               "--out", str(run_dir), "--threads", str(args.threads), "--quiet", "--epochs", "100000",
               *OURS_COMMON, *SYSTEMS[system]]
    if system.startswith("diffrec") and args.diffrec_seeds:
        command += ["--seeds", str(args.diffrec_seeds)]
    command = [c for c in command if c != "--quiet"]  # the progress bar (on a pty) tells the partial epoch
    run = run_budgeted(command, args.minutes * 60, env, REPO, work / f"ours_{system}.stdout.log", tty_stderr=True)
    epochs = []
    log_file = run_dir / "log.jsonl"
    if log_file.exists():
        for line in log_file.read_text(encoding="utf-8").splitlines():
            try:
                epochs.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by the stop
    # only the epochs whose line the CLI printed inside the budget (not one finished while it stopped)
    in_budget = {int(m.group(1)) for t, line in run["lines"] if t <= args.minutes * 60
                 for m in [re.match(r"epoch\s+(\d+)\s", line)] if m}
    epochs = [e for e in epochs if e["epoch"] in in_budget]
    if not epochs and not run["stopped_by_budget"]:
        tail = "\n".join(line for _, line in run["lines"][-30:])
        raise SystemExit(f"{system} stopped with no epoch (exit {run['returncode']}):\n{tail}")
    partial = None  # the unfinished epoch's rate: batches done over the time since its bar started
    bar_start = {}
    for t, line in run["lines"]:
        match = re.search(r"epoch (\d+)/\d+:.*?(\d+)/(\d+) \[", line)
        if match and t <= args.minutes * 60:
            epoch, done, total = (int(g) for g in match.groups())
            bar_start.setdefault(epoch, t)
            if done > 0 and t > bar_start[epoch]:
                partial = {"epoch": epoch, "batches": done, "of_batches": total,
                           "train_seconds": round(t - bar_start[epoch], 2)}
    bf16_line = next((line for _, line in run["lines"] if "bf16" in line.lower()), None)
    return {"system": system, "bf16": SYSTEMS[system][-1], "seen_excluded": False, "epochs": epochs,
            "bf16_note": bf16_line, "partial_epoch": partial, "command": command, **{k: v for k, v in run.items() if k != "lines"}}


# ---------------------------------------------------------------- report


def _partial_label(partial: dict | None) -> str:
    if not partial:
        return "-"
    if partial.get("of_batches") and partial["batches"] >= partial["of_batches"]:
        return "the first epoch's training (its validation unfinished)"
    return "the unfinished first epoch"


def summarize(result: dict, all_targets: int, threads: int) -> dict:
    epochs = result["epochs"]
    row = {"system": result["system"], "threads": threads, "bf16": result["bf16"], "epochs_done": len(epochs),
           "rate_from": "finished epochs" if epochs else _partial_label(result.get("partial_epoch"))}
    if result["system"] == "recbole-sasrec":
        per_epoch = [e["targets"] for e in epochs] or [result["targets_per_epoch"]]
        rates = [e["targets_per_s"] for e in epochs]
        if not rates and result.get("partial_epoch"):  # no finished epoch: the rate within the first one
            p = result["partial_epoch"]
            rates = [p["targets"] / p["train_seconds"]]
    else:
        per_epoch = [round(e["coverage"] * all_targets) for e in epochs] or [all_targets]
        rates = [e["targets_per_s"] for e in epochs]
        if not rates and result.get("partial_epoch"):  # estimate: its rows are shuffled, targets ~ batches
            p = result["partial_epoch"]
            rates = [p["batches"] / p["of_batches"] * all_targets / p["train_seconds"]]
    train_s = [e["train_seconds"] for e in epochs]
    partial = result.get("partial_epoch")
    if not epochs and partial and partial.get("of_batches") and partial["batches"] >= partial["of_batches"]:
        train_s = [partial["train_seconds"]]  # its training pass finished, its validation did not
    total_s = [e["seconds"] for e in epochs]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    last = epochs[-1]["valid"] if epochs else {}
    best = max((e["valid"]["NDCG@10"] for e in epochs), default=None)
    row.update({
        "s_per_epoch_train": mean(train_s), "s_per_epoch_with_valid": mean(total_s),
        "targets_per_epoch": round(mean(per_epoch)) if per_epoch else None,
        "targets_per_s": mean(rates),
        "valid_NDCG@10": last.get("NDCG@10"), "valid_HR@10": last.get("HR@10"), "best_valid_NDCG@10": best,
        "seen_excluded": "yes" if result["seen_excluded"] else "no",
        "load_start": " ".join(f"{x:.2f}" for x in result["load_start"]),
        "load_end": " ".join(f"{x:.2f}" for x in result["load_end"]),
        "wall_s": result["wall_s"], "cpu_s": result["cpu_s"],
        "cores_used": round(result["cpu_s"] / result["wall_s"], 2) if result["wall_s"] else None,
    })
    return row


def fmt(value, spec):
    return "-" if value is None else format(value, spec)


def write_report(out: Path, rows: list[dict], meta: dict) -> str:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "table.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    header = ("| system | threads | bf16 | s/epoch (train) | s/epoch (+valid) | targets/epoch | targets/s | epochs done "
              "| valid NDCG@10 | valid HR@10 | seen excluded | load start | load end | cores used |")
    lines = [header, "|" + " --- |" * header.count(" | ") + " --- |"]
    for r in rows:
        lines.append(f"| {r['system']} | {r['threads']} | {r['bf16']} | {fmt(r['s_per_epoch_train'], '.1f')} "
                     f"| {fmt(r['s_per_epoch_with_valid'], '.1f')} | {fmt(r['targets_per_epoch'], ',')} "
                     f"| {'~' if r['rate_from'] != 'finished epochs' and r['targets_per_s'] else ''}{fmt(r['targets_per_s'], ',.0f')} | {r['epochs_done']} | {fmt(r['valid_NDCG@10'], '.4f')} "
                     f"| {fmt(r['valid_HR@10'], '.4f')} | {r['seen_excluded']} | {r['load_start']} "
                     f"| {r['load_end']} | {fmt(r['cores_used'], '.2f')} |")
    unfinished = []
    for result in meta.get("results", []):
        partial = result.get("partial_epoch")
        if result["epochs"] or not partial:
            continue
        if partial.get("of_batches") and partial["batches"] >= partial["of_batches"]:
            unfinished.append(f"{result['system']} finished its first training pass in {partial['train_seconds']:.0f} s, "
                              f"its validation did not finish inside the budget")
        else:
            unfinished.append(f"{result['system']} trained {partial['batches']:,}"
                              + (f" of {partial['of_batches']:,}" if partial.get("of_batches") else "")
                              + f" batches of its first epoch in {partial['train_seconds']:.0f} s")
    ratios = {ours: meta[f"ratio_{ours}_to_recbole_targets_per_s"] for ours in ("sasrec-fp32", "sasrec-bf16")
              if f"ratio_{ours}_to_recbole_targets_per_s" in meta}
    text = ["# Training benchmark on the CPU (Beauty, d = 64, T = 50, batch 256)", "",
            f"{meta['date']}, commit {meta['commit']}{' (dirty tree)' if meta['dirty'] else ''}, "
            f"{meta['machine']['cpu']} ({meta['machine']['cores']} cores), {meta['threads']} torch thread(s), "
            f"budget {meta['minutes']} min of wall time per system (start-up and validation included), "
            f"systems run one after another.", "",
            f"Command: `{meta['command']}`", "", *lines, ""]
    if unfinished:
        text += ["No epoch inside the budget: " + "; ".join(unfinished) + ".", ""]
    if ratios:
        text.append("Training targets/s, ours SASRec / RecBole SASRec: "
                    + ", ".join(f"{ours} **{ratio:.2f}x**" for ours, ratio in ratios.items())
                    + " (issue 12's target: >= 5x).")
        text.append("")
    m = meta["machine"]
    text += [f"bf16: the bf16 rows ran `--bf16 on` (autocast forced). `--bf16 auto` on this CPU picks "
             f"{'bf16' if m['bf16_auto_picks_bf16'] else 'float32'} (CPU flags avx512_bf16 = {m['avx512_bf16_flag']}, "
             f"amx_bf16 = {m['amx_bf16_flag']}; oneDNN bf16 usable = {m['onednn_bf16_supported']}: without those "
             f"flags oneDNN emulates bf16 with AVX-512 conversions, no native bf16 dot products).", ""]
    c = meta["counts"]
    text += [f"Data: {c['ours']['users']:,} users, {c['ours']['items']:,} items, {c['ours']['interactions']:,} "
             f"interactions on both sides (RecBole: {c['recbole']['users']:,} / {c['recbole']['items']:,} / "
             f"{c['recbole']['interactions']:,}); training targets per epoch (every training item after a user's "
             f"first): {c['ours']['train_targets']:,}.", "",
             "Notes: ~targets/s = no epoch (training and validation) finished inside the budget: the rate within "
             "the first epoch's training so far (batches done x targets per batch / its seconds so far; "
             "table.csv's rate_from says whether that training pass had finished). Cores used = the process's CPU seconds / its wall seconds (with the load average, how much of "
             "the machine it got). targets/s = supervised next-item predictions per second of training (validation excluded). "
             "RecBole's SASRec trains on every prefix of the training part (one target per prefix, last "
             "position); ours runs window mode (each training target once per epoch, all positions of a "
             "window in one pass). Validation NDCG@10 / HR@10 are each system's own full ranking of the "
             "leave-one-out validation item, at the last epoch finished inside the budget; seen items are "
             "ranked too on both sides (RecBole never removes them for sequential models; ours ran with "
             "--no-eval-exclude-seen). RecBole's venv: recbole, torch, numpy = " + meta["recbole_versions"] + "; ours: torch "
             + meta["torch"] + ". Context: RecBole's MAX_ITEM_LIST_LENGTH 50 = up to 50 history items; our "
             "--max-len 50 = up to 49 history items plus the target slot.", ""]
    (out / "table.md").write_text("\n".join(text), encoding="utf-8")
    (out / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n", encoding="utf-8")
    return "\n".join(text)


def machine() -> dict:
    flags = ""
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        pass
    import torch

    from common import cpu_model
    from diffrec_ext.config import bf16_enabled

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "bf16_auto_picks_bf16": bf16_enabled("auto", "cpu"),
            "avx512_bf16_flag": "avx512_bf16" in flags,
            "amx_bf16_flag": "amx_bf16" in flags,
            "onednn_bf16_supported": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(), "platform": platform.platform(),
            "python": platform.python_version()}


def git(*args) -> str:
    return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Beauty.txt (sequence lines)")
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget per system (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of every system (default 2)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help=f"comma list of {', '.join(SYSTEMS)}")
    parser.add_argument("--venv", type=Path, default=Path.home() / ".cache/diffrec_ext/recbole-venv",
                        help="RecBole's venv (created if missing)")
    parser.add_argument("--work", type=Path, default=Path.home() / ".cache/diffrec_ext/bench_train",
                        help="converted data and run directories")
    parser.add_argument("--out", type=Path, default=REPO / "results/train_bench_cpu")
    parser.add_argument("--diffrec-seeds", type=int, default=0,
                        help="DiffRec's --seeds (predictions averaged per validation ranking; 0 = its default, "
                             "10: its validation then costs about 10 SASRec validations)")
    parser.add_argument("--quick", action="store_true",
                        help="1 minute per system, report into a temp dir unless --out is given")
    args = parser.parse_args(argv)
    if args.quick:
        args.minutes = 1.0
        if "--out" not in (argv if argv is not None else sys.argv[1:]):
            args.out = Path(tempfile.mkdtemp(prefix="train_bench_quick_"))
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {list(SYSTEMS)}")
    args.work.mkdir(parents=True, exist_ok=True)
    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "OPENBLAS_NUM_THREADS": str(args.threads), "PYTHONUNBUFFERED": "1"}
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
            "command": "python " + " ".join([os.path.relpath(sys.argv[0], REPO) if sys.argv[0] else "?",
                                             *sys.argv[1:]]),
            "machine": machine(), "threads": args.threads, "minutes": args.minutes, "torch": torch.__version__,
            "load_at_start": load(), "systems": systems, "ours_common_flags": OURS_COMMON,
            "ours_flags": {s: SYSTEMS[s] for s in systems if SYSTEMS[s]}, "diffrec_seeds": args.diffrec_seeds or "default"}

    counts_ours = our_counts(args.data)
    data_path, name, counts_file = convert_to_inter(args.data, args.work)
    log(f"data: ours {counts_ours}; the .inter file {counts_file} ({data_path / name})")
    meta["counts"] = {"ours": counts_ours, "inter_file": counts_file}
    meta["recbole_versions"] = "-"
    results = []
    for system in systems:
        log(f"{system}: {args.minutes:g} min, {args.threads} thread(s), load {load()}")
        if system == "recbole-sasrec":
            meta["recbole_versions"] = ensure_recbole_venv(args.venv)  # before the budget starts
            result = run_recbole(args, args.work, data_path, name, env)
            ready = result["ready"]
            meta["counts"]["recbole"] = {k: ready[k] for k in ("users", "items", "interactions", "train_targets")}
            same = all(meta["counts"]["recbole"][k] == counts_ours[k] for k in counts_ours)
            meta["counts"]["identical"] = same
            log(f"RecBole sees {meta['counts']['recbole']}: {'identical to ours' if same else 'DIFFERENT from ours'}")
        else:
            result = run_ours(args, system, env, args.work)
        row = summarize(result, counts_ours["train_targets"], args.threads)
        log(f"{system}: {row}")
        results.append({"row": row, **{k: v for k, v in result.items() if k != "lines"}})
    meta.setdefault("counts", {}).setdefault("recbole", counts_file)
    meta["load_at_end"] = load()
    rows = [r["row"] for r in results]
    by_name = {r["system"]: r for r in rows}
    recbole = by_name.get("recbole-sasrec", {}).get("targets_per_s")
    for ours in ("sasrec-fp32", "sasrec-bf16"):
        if recbole and by_name.get(ours, {}).get("targets_per_s"):
            ratio = by_name[ours]["targets_per_s"] / recbole
            meta[f"ratio_{ours}_to_recbole_targets_per_s"] = ratio
            if "ratio_ours_sasrec_to_recbole_targets_per_s" not in meta or ratio > meta[
                    "ratio_ours_sasrec_to_recbole_targets_per_s"]:
                meta["ratio_ours_sasrec_to_recbole_targets_per_s"] = ratio
                meta["ratio_of"] = ours
    meta["results"] = results
    print(write_report(args.out, rows, meta))
    log(f"wrote {args.out}/table.md, table.csv, run.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
