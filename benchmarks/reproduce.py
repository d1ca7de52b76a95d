#!/usr/bin/env python
"""Paper reproduction of DiffRec (Du et al. 2023, Table 2 and the analyses of section 5.3).

Main table (no --analysis): for every --data file, train DiffRec and the SASRec-CE baseline (the
same DSR backbone with diffusion switched off: clean [unk] slot, full catalog cross-entropy), once
per training seed; each run keeps the checkpoint with the best validation NDCG@10 and is tested on
the test split (leave-one-out, full ranking), with the user's earlier items excluded from the
ranking and without (the paper does not say which). Writes <out>/reproduce_<dataset>.json and .md:
test HR/NDCG@5/10/20 as mean +- std over the seeds, the popularity ranking, the paper's numbers,
whether DiffRec beats the baseline / the paper, the machine, load average, commit and command.

    # this 2-core CPU (writes results/reproduce_cpu/): ML-1M, 60 minutes for its two runs
    python benchmarks/reproduce.py --preset cpu --data ../shared/data/ml-1m/ml-1m.txt.gz --seeds 0 \
        --total-minutes 60 --threads 2
    # a GPU, the paper's settings
    python benchmarks/reproduce.py --data ../shared/data/ml-1m/ml-1m.txt.gz ../shared/data/beauty/Beauty.txt \
        --seeds 0 1 2 --total-minutes 7.5 --out results

Analyses (--analysis NAME ...; DiffRec on the first --data file, one training seed), each writing
<out>/analysis_<name>.json and .png:
    schedule    sqrt / cosine / linear noise schedules (section 5.3.1, Figure 2)
    steps       number of diffusion steps N, 10 .. 2000 (5.3.2, Figure 3)
    embeddings  no position / no step / neither embedding (5.3.3, Figure 4)
    positions   noise the last K positions, K = 1 .. all (5.3.4, Figure 5; prefix training, as K > 1 needs it)
    seeds       S = 1 .. 20 inference seeds on ONE trained checkpoint (5.3.5, Figure 7)
    figure6     per-seed top-5 lists of one ML-1M user with titles and genres from movies.dat (Figure 6)

Settings (GUIDE section 1, the paper's section 5.1): d = 256, 2 layers, 2 heads, T = 50, batch 256,
Adam lr 1e-3, dropout 0.3 (Amazon) / 0.2 (ML-1M), sqrt schedule, N = 1000, target-only noising,
importance-sampled steps, Alg. 3 with S = 10 seeds, at most 50 epochs, best validation NDCG@10.
Beyond the paper (each one recorded in the outputs):
  - training-sequence construction: --mode window (default) cuts each user's training part into
    windows of T items (stride TrainConfig.window_stride) so that every training target is
    supervised once per epoch, all of a window's targets in one pass (SASRec: causal attention;
    DiffRec: the two-stream form of model.DSR.forward_two_stream, one sampled step per target),
    instead of the paper's one example per prefix (--mode prefix, optionally --samples-per-epoch);
    --mode user keeps one window of the last T items per user;
  - --preset cpu: d = 64, the item layer tied to the item embeddings, input scale 0.2, lr 2e-3
    (chosen on ML-1M's validation split for a CPU budget; --preset paper is the default);
  - --input-scale: candidates for the input scaling b of model.DSR (b = 1 is the paper); with more
    than one candidate each is trained with the first seed and the one with the best VALIDATION
    NDCG@10 is kept (the test split is never used to choose anything);
  - a wall-clock budget per run (--max-minutes, or --total-minutes shared by all runs): training
    stops after the epoch past which the next one would not fit, and the best validation
    checkpoint so far is tested;
  - bf16 autocast of the forward passes on CUDA (--bf16 auto, the default; float32 master
    weights; --bf16 off to turn off, --bf16 on to force it on the CPU).

Plots need matplotlib; without it the JSON files are still written, and `--replot DIR` draws the
PNGs later from them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout: use its diffrec_ext, not another installed copy
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:  # common.py beside this file, also when loaded as a module
    sys.path.insert(0, str(REPO / "benchmarks"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from common import cpu_model  # noqa: E402
from diffrec_ext.metrics import KS  # noqa: E402
from diffrec_ext.config import TrainConfig, autocast_context, bf16_enabled  # noqa: E402
from diffrec_ext.train import evaluate, popularity_metrics, train  # noqa: E402

METRICS = [f"{m}@{k}" for k in KS for m in ("HR", "NDCG")]
ANALYSES = ("schedule", "steps", "positions", "embeddings", "seeds", "figure6")

# Table 2 of the paper (test split, full ranking): DiffRec and the SASRec column.
PAPER = {
    "beauty": {
        "DiffRec": {"HR@5": 0.0629, "HR@10": 0.0847, "HR@20": 0.1125, "NDCG@5": 0.0447, "NDCG@10": 0.0518, "NDCG@20": 0.0588},
        "SASRec": {"HR@5": 0.0371, "HR@10": 0.0592, "HR@20": 0.0893, "NDCG@5": 0.0233, "NDCG@10": 0.0284, "NDCG@20": 0.0361},
    },
    "ml-1m": {
        "DiffRec": {"HR@5": 0.2022, "HR@10": 0.2900, "HR@20": 0.3923, "NDCG@5": 0.1374, "NDCG@10": 0.1657, "NDCG@20": 0.1916},
        "SASRec": {"HR@5": 0.1078, "HR@10": 0.1810, "HR@20": 0.2745, "NDCG@5": 0.0681, "NDCG@10": 0.0918, "NDCG@20": 0.1156},
    },
}
TARGETS = {"ml-1m": {"HR@10": 0.2900, "NDCG@10": 0.1657}, "beauty": {"HR@10": 0.0847, "NDCG@10": 0.0518}}

# The paper's settings (section 5.1 / GUIDE section 1); dropout comes from the dataset preset.
PAPER_CONFIG = dict(
    dim=256, layers=2, heads=2, max_len=50, batch_size=256, lr=1e-3, epochs=50, schedule="sqrt", num_steps=1000,
    noised_positions=1, add_position=True, add_step=True, importance_sampling=True, num_samples=10, inference="alg3",
    eval_exclude_seen=True,
)
PRESETS = {  # how each dataset is read, and its dropout (paper: 0.3 Amazon, 0.2 ML-1M)
    "ml-1m": dict(k_core=5, item_k_core=0, dropout=0.2),  # item_k_core=0: 6,040 users, 3,706 items, 1,000,209 actions
    "beauty": dict(k_core=5, item_k_core=None, dropout=0.3),  # already 5-core: 22,363 users, 12,101 items
    "synthetic": dict(k_core=5, item_k_core=None, dropout=0.2),
    "other": dict(k_core=5, item_k_core=None, dropout=0.2),
}
# --preset cpu: the departures from the paper chosen on the VALIDATION split of ML-1M for a 2-core CPU
# budget (each one is a flag of TrainConfig, recorded in the outputs): d = 64 instead of 256, the item
# layer tied to the item embeddings (W = E), input scale b = 0.2 (lower signal-to-noise ratio at every
# step), Adam lr 2e-3. `--preset paper` keeps the paper's settings (b = 1 and 0.2 both tried).
CPU_PRESET = dict(dim=64, tie_output=True, lr=2e-3)
CPU_PRESET_INPUT_SCALES = [0.2]
WEIGHT_DIFFREC, WEIGHT_SASREC = 2.0, 1.0  # share of a --total-minutes budget per run (x sqrt(rows per epoch))


def log(message: str = "") -> None:
    print(message, flush=True)


# --------------------------------------------------------------------------------------------------
# data


@dataclasses.dataclass
class Data:
    key: str  # "ml-1m", "beauty", "synthetic" or the file stem
    spec: str  # the --data argument
    dataset: Any
    preset: dict
    load_seconds: float
    path: Path | None = None

    def describe(self) -> dict:
        return {"name": self.key, "path": str(self.path) if self.path else self.spec, "users": self.dataset.num_users,
                "items": self.dataset.num_items, "actions": self.dataset.num_actions,
                "k_core": self.preset["k_core"], "item_k_core": self.preset["item_k_core"]}


def dataset_key(spec: str) -> str:
    name = Path(spec).name.lower()
    if spec.startswith("synthetic"):
        return "synthetic"
    if "ml-1m" in name or "ml1m" in name:
        return "ml-1m"
    if "beauty" in name:
        return "beauty"
    return name.split(".")[0] or "data"


def load_data(spec: str) -> Data:
    """A dataset from a file (sequence lines, MovieLens ratings, .inter, CSV; .gz ok) or
    'synthetic[:field=value,...]' (diffrec_ext.synthetic with SyntheticConfig overrides)."""
    key = dataset_key(spec)
    preset = dict(PRESETS.get(key, PRESETS["other"]))
    started = time.perf_counter()
    if key == "synthetic":
        from diffrec_ext.synthetic import synthetic_dataset

        overrides = {}
        if ":" in spec:
            for item in spec.split(":", 1)[1].split(","):
                name, value = item.split("=")
                overrides[name.strip()] = float(value) if "." in value else int(value)
        dataset = synthetic_dataset(k_core=preset["k_core"], **overrides)
        return Data(key, spec, dataset, preset, time.perf_counter() - started)
    from diffrec_ext.data import load_dataset

    path = Path(spec).expanduser().resolve()
    if not path.is_file():
        raise SystemExit(f"reproduce.py: data file {path} does not exist")
    dataset = load_dataset(path, k_core=preset["k_core"], item_k_core=preset["item_k_core"])
    return Data(key, spec, dataset, preset, time.perf_counter() - started, path)


def default_data_dir() -> Path | None:
    for candidate in (os.environ.get("DIFFREC_DATA"), REPO.parent / "shared" / "data"):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


# --------------------------------------------------------------------------------------------------
# one training run under a time budget


class Budget:
    """train() callback: stop after the epoch past which the next epoch would overrun `seconds`
    (measured from the start of the run); records the per-epoch curve."""

    def __init__(self, seconds: float | None):
        self.seconds = seconds
        self.started = time.perf_counter()
        self.curve: list[dict] = []
        self.stopped = False

    def __call__(self, record: dict) -> bool:
        self.curve.append({"epoch": record["epoch"], "valid_NDCG@10": round(record["valid"]["NDCG@10"], 5),
                           "valid_HR@10": round(record["valid"]["HR@10"], 5),
                           "loss": round(record.get("loss", float("nan")), 5), "seconds": record["seconds"],
                           "train_seconds": record.get("train_seconds"),
                           "item_emb_cos": round(record["item_emb_cos"], 4)})
        if self.seconds is None:
            return False
        elapsed = time.perf_counter() - self.started
        if elapsed + record["seconds"] > self.seconds:
            self.stopped = True
            return True
        return False


def make_config(data: Data, kind: str, seed: int, args, **overrides) -> TrainConfig:
    values = dict(PAPER_CONFIG, dropout=data.preset["dropout"], kind=kind, seed=seed, mode=args.mode,
                  samples_per_epoch=args.samples_per_epoch, device=args.device,
                  eval_batch_size=args.eval_batch_size, bf16=args.bf16)
    if args.preset == "cpu":
        values.update(CPU_PRESET)
    for name in ("dim", "layers", "heads", "max_len", "batch_size", "epochs", "lr", "dropout", "num_samples_eval"):
        value = getattr(args, name, None)
        if value is not None:
            values["num_samples" if name == "num_samples_eval" else name] = value
    values.update(parse_sets(args.set))
    values.update(overrides)
    if kind == "sasrec":  # diffusion options have no effect on the baseline: keep them at their defaults
        for name in ("input_scale", "schedule", "num_steps", "noised_positions", "add_step"):
            values.pop(name, None)
    if values.get("noised_positions", 1) != 1 and kind == "diffrec":
        values["mode"] = "prefix"  # K > 1 needs one example per prefix (TrainConfig.validate)
    return TrainConfig.from_dict(values)


def parse_sets(items) -> dict:
    """--set key=value (TrainConfig fields; JSON values, else strings)."""
    out = {}
    for item in items or []:
        if "=" not in item:
            raise SystemExit(f"reproduce.py: --set needs key=value, got {item!r}")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def run_model(data: Data, config: TrainConfig, budget_s: float | None, quiet: bool = False,
              keep_model: bool = False) -> dict:
    """Train (Alg. 1) under the budget, select by validation NDCG@10, test: a JSON-able record."""
    label = f"{data.key} {config.kind} seed {config.seed}"
    extra = ""
    if config.kind == "diffrec":
        extra = (f" input_scale {config.input_scale} schedule {config.schedule} N {config.num_steps} "
                 f"K {config.noised_positions} pos {config.add_position} step {config.add_step}")
    log(f"-- {label}{extra}: mode {config.mode}, d {config.dim}, T {config.max_len}, dropout {config.dropout}, "
        f"budget {'none' if budget_s is None else f'{budget_s:.0f}s'}, at most {config.epochs} epochs")
    budget = Budget(budget_s)
    started = time.perf_counter()
    result = train(config, data.dataset, None, progress=False, callback=budget,
                   log=None if quiet else (lambda m: log("   " + m)))
    seconds = time.perf_counter() - started
    # the paper does not say whether a user's earlier items are excluded from the ranking: test both ways
    other = evaluate(result["model"], data.dataset, "test", num_samples=config.num_samples, algorithm=config.inference,
                     exclude_seen=not config.eval_exclude_seen, seed=config.seed, batch_size=config.eval_batch_size,
                     bf16=bf16_enabled(config.bf16, result["model"].pos_emb.device))
    by_exclusion = {config.eval_exclude_seen: result["test"], not config.eval_exclude_seen: other}
    record = {
        "kind": config.kind, "seed": config.seed, "valid": result["valid"], "test": result["test"],
        "test_seen_excluded": by_exclusion[True], "test_seen_included": by_exclusion[False],
        "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
        "stopped_by_budget": budget.stopped, "seconds": round(seconds, 2),
        "train_seconds": round(sum(r["seconds"] for r in budget.curve), 2),
        "budget_seconds": None if budget_s is None else round(budget_s, 1),
        "curve": budget.curve, "config": config.to_dict(),
    }
    if config.lr_schedule != "constant" and record["epochs_run"] < config.epochs:
        log(f"   {label}: the budget stopped the run at epoch {record['epochs_run']} of the {config.epochs} its "
            f"{config.lr_schedule} lr schedule was planned for, before the lr was annealed")
    log(f"   {label}: best epoch {record['best_epoch']}/{record['epochs_run']}  valid NDCG@10 "
        f"{result['valid']['NDCG@10']:.4f}  test HR@10 {result['test']['HR@10']:.4f} NDCG@10 "
        f"{result['test']['NDCG@10']:.4f}  ({seconds:.0f}s)")
    if keep_model:
        record["_model"] = result["model"]
    return record


class Planner:
    """Splits a total wall-clock budget over the planned runs by weight, re-dividing what is left
    before each run (a run that ends early leaves its time to the others). The measured
    overhead of a run outside its training budget (test evaluation) is reserved for the runs left."""

    def __init__(self, total_s: float | None, per_run_s: float | None, weights: list[float]):
        self.total_s, self.per_run_s = total_s, per_run_s
        self.weights = list(weights)
        self.started = time.perf_counter()
        self.done = 0
        self.overheads: list[float] = []

    def next_budget(self) -> float | None:
        share = None
        if self.total_s is not None:
            left = self.total_s - (time.perf_counter() - self.started)
            runs_left = len(self.weights) - self.done
            reserve = (np.mean(self.overheads) if self.overheads else 0.0) * runs_left
            weights = self.weights[self.done:] or [1.0]
            share = max(1.0, (left - reserve) * weights[0] / sum(weights))
        if self.per_run_s is not None:
            share = self.per_run_s if share is None else min(share, self.per_run_s)
        return share

    def finished(self, record: dict):
        self.done += 1
        self.overheads.append(max(0.0, record["seconds"] - record["train_seconds"]))


def run_weight(kind: str, data: Data, mode: str, max_len: int) -> float:
    from diffrec_ext.data import training_sequences

    rows = len(training_sequences(data.dataset, max_len, "user")) if mode == "user" else data.dataset.num_actions
    return (WEIGHT_DIFFREC if kind == "diffrec" else WEIGHT_SASREC) * math.sqrt(max(rows, 1) / 1000.0)


# --------------------------------------------------------------------------------------------------
# summaries and files


def mean_std(values: list[float]) -> dict:
    values = [float(v) for v in values]
    return {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarize(runs: list[dict], split: str = "test_seen_excluded") -> dict:
    return {metric: mean_std([r[split][metric] for r in runs]) for metric in METRICS}


def environment(args) -> dict:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    info = {"device": device, "torch": torch.__version__, "python": platform.python_version(),
            "host": platform.node(), "cpu_threads": torch.get_num_threads(),
            "bf16_autocast": bf16_enabled(args.bf16, device), "cpu": cpu_model(), "cores": os.cpu_count(),
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
            "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                        text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        info["working_tree"] = "modified" if dirty else "clean"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import diffrec_ext.ops as ops

        info["extension"] = dict(ops.BUILD_INFO) if isinstance(getattr(ops, "BUILD_INFO", None), dict) else None
        info["compiled_ops"] = bool(ops.HAVE_EXTENSION)
    except Exception:  # pragma: no cover
        pass
    return info


def run_label(env: dict, preset: str) -> str:
    where = f"GPU ({env.get('gpu', 'CUDA')})" if env["device"].startswith("cuda") else f"CPU ({env['cpu']})"
    return f"{where}, {preset} preset"


def fmt(summary: dict, metric: str) -> str:
    value = summary[metric]
    return f"{value['mean']:.4f} ± {value['std']:.4f}" if value["n"] > 1 else f"{value['mean']:.4f}"


def verdict(report: dict) -> dict:
    diff, sas = report["summary"]["DiffRec"], report["summary"]["SASRec-CE"]
    out = {"diffrec_minus_sasrec": {m: diff[m]["mean"] - sas[m]["mean"] for m in METRICS}}
    out["diffrec_beats_sasrec"] = {m: diff[m]["mean"] > sas[m]["mean"] for m in METRICS}
    out["diffrec_beats_sasrec_all"] = all(out["diffrec_beats_sasrec"].values())
    targets = TARGETS.get(report["dataset"]["name"])
    if targets:
        out["paper_targets"] = targets
        out["meets_paper_targets"] = {m: diff[m]["mean"] >= t for m, t in targets.items()}
        out["sasrec_meets_paper_targets"] = {m: sas[m]["mean"] >= t for m, t in targets.items()}
    return out


def markdown(report: dict) -> str:
    env, ds, s = report["environment"], report["dataset"], report["settings"]
    lines = [f"# DiffRec vs SASRec-CE on {ds['name']}: {report['label']}", ""]
    lines.append(f"Test split, leave-one-out, full ranking over all {ds['items']:,} items, "
                 f"{ds['users']:,} users, {ds['actions']:,} actions. Mean ± std over training seeds "
                 f"{report['seeds']}; each run keeps the checkpoint with the best validation NDCG@10 (validation "
                 "with the user's earlier items excluded). The paper does not say whether earlier items are "
                 "excluded from the ranking, so the test is reported both ways; the verdict uses 'excluded'.")
    paper = PAPER.get(ds["name"])
    for title, key in (("seen items excluded", "summary"), ("seen items NOT excluded", "summary_seen_included")):
        lines += ["", f"**{title}**", "", "| method | " + " | ".join(METRICS) + " |",
                  "|---" * (len(METRICS) + 1) + "|"]
        rows = [(name, report[key][name]) for name in ("SASRec-CE", "DiffRec")]
        if key == "summary":
            rows.insert(0, ("popularity", {m: {"mean": report["popularity"]["test"][m], "std": 0.0, "n": 1}
                                           for m in METRICS}))
        for name, summary in rows:
            lines.append(f"| {name} | " + " | ".join(fmt(summary, m) for m in METRICS) + " |")
        if paper:
            for name in ("SASRec", "DiffRec"):
                lines.append(f"| paper {name} (Table 2) | "
                             + " | ".join(f"{paper[name][m]:.4f}" for m in METRICS) + " |")
    v = report["verdict"]
    lines += ["", "**Verdict.** " + (
        "DiffRec beats the SASRec-CE baseline on every metric (mean over seeds)." if v["diffrec_beats_sasrec_all"]
        else "DiffRec does NOT beat the SASRec-CE baseline on: "
             + ", ".join(m for m, b in v["diffrec_beats_sasrec"].items() if not b) + " (mean over seeds).")]
    if "meets_paper_targets" in v:
        met = v["meets_paper_targets"]
        lines.append("Paper targets (" + ", ".join(f"{m} >= {t}" for m, t in v["paper_targets"].items()) + "): "
                     + ("met." if all(met.values()) else "NOT met (" + ", ".join(
                         f"{m} {report['summary']['DiffRec'][m]['mean']:.4f}" for m in met) + ")."))
    sel = report.get("selection")
    if sel:
        lines += ["", f"**Input scale chosen on the validation split** (seed {sel['seed']}): " + ", ".join(
            f"b = {c['input_scale']}: valid NDCG@10 {c['valid_NDCG@10']:.4f}" for c in sel["candidates"])
                  + f" -> b = {sel['chosen']}."]
    lines += ["", "| run | seed | epochs (best) | budget s | run s | valid NDCG@10 | test HR@10 | test NDCG@10 |",
              "|---|---|---|---|---|---|---|---|"]
    for name in ("SASRec-CE", "DiffRec"):
        for r in report["runs"][name]:
            lines.append(f"| {name} | {r['seed']} | {r['epochs_run']} ({r['best_epoch']}) | {r['budget_seconds']} | "
                         f"{r['seconds']:.0f} | {r['valid']['NDCG@10']:.4f} | {r['test']['HR@10']:.4f} | "
                         f"{r['test']['NDCG@10']:.4f} |")
    lines += ["", "Settings: " + ", ".join(f"{k}={v}" for k, v in s["common"].items()) + ".",
              "DiffRec: " + ", ".join(f"{k}={v}" for k, v in s["diffrec"].items()) + ".",
              f"Training sequences: {s['training_sequences']}.",
              f"Budget: {s['budget']}.",
              f"Device: {env['device']}{' (' + env['gpu'] + ')' if env.get('gpu') else ''}, torch {env['torch']}, "
              f"bf16 autocast {env['bf16_autocast']}, commit {env.get('commit', '?')} ({env.get('working_tree', '?')} tree)"
              f", {env['cores']} cores ({env['cpu']}), torch threads {env['cpu_threads']}, load average "
              f"{env['load_average_at_start']} at the start, {env['load_average_at_end']} at the end.",
              f"Command: `{env['command']}`", ""]
    return "\n".join(lines)


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(strip_private(obj), indent=1))
    os.replace(tmp, path)


def strip_private(obj):
    if isinstance(obj, dict):
        return {k: strip_private(v) for k, v in obj.items() if not str(k).startswith("_")}
    if isinstance(obj, list):
        return [strip_private(v) for v in obj]
    return obj


def budget_text(args, runs: int, datasets: int) -> str:
    parts = []
    if args.max_minutes is not None:
        parts.append(f"at most {args.max_minutes} min per training run")
    if args.total_minutes is not None:
        parts.append(f"{args.total_minutes} min in total for the {runs} training runs over {datasets} dataset(s), "
                     f"shared by weight (DiffRec {WEIGHT_DIFFREC}, SASRec {WEIGHT_SASREC}, x sqrt(rows per epoch))")
    return "; ".join(parts) or "none (the epoch limit only)"


def describe_sequences(mode: str, samples_per_epoch: int, stride: int) -> str:
    if mode == "window":
        return (f"window mode: each user's training part cut into windows of T items with stride {stride}, every "
                "training target supervised exactly once per epoch, all of a window's targets in one pass (DiffRec: "
                "two-stream form, one sampled step n per target)")
    if mode == "user":
        return ("user mode: one window of the last T items of each user's training part per epoch, every position "
                "supervised in one pass (SASRec: causal self-attention; DiffRec: two-stream form, the query stream "
                "holds the noised targets, one sampled step n per window)")
    return ("prefix mode (the paper): every prefix of every training part is one example [history, target]"
            + (f", {samples_per_epoch:,} prefixes drawn per epoch" if samples_per_epoch else ", all prefixes each epoch"))


# --------------------------------------------------------------------------------------------------
# main table


def warm_up(args, data: Data) -> None:
    """On CUDA: one short epoch of each model on a tiny synthetic dataset, so that the first timed
    run does not pay for CUDA, cuBLAS and autocast initialisation."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if not device.startswith("cuda"):
        return
    from diffrec_ext.synthetic import synthetic_dataset

    started = time.perf_counter()
    tiny = Data("warm-up", "synthetic", synthetic_dataset(num_users=300, num_items=100), data.preset, 0.0)
    for kind in ("diffrec", "sasrec"):
        config = make_config(tiny, kind, 0, args, epochs=1, num_samples=2)
        train(config, tiny.dataset, None, progress=False, log=None)
    torch.cuda.synchronize()
    log(f"warm-up on {device}: {time.perf_counter() - started:.1f}s")


def run_main(args, datas: list[Data]) -> list[dict]:
    env = environment(args)
    scales = args.input_scale or (CPU_PRESET_INPUT_SCALES if args.preset == "cpu" else [1.0, 0.2])
    plans = []  # (data, kind, seed, input_scale or None)
    for data in datas:
        first = args.seeds[0]
        for scale in scales:
            plans.append((data, "diffrec", first, scale))
        plans.append((data, "sasrec", first, None))
        for seed in args.seeds[1:]:
            plans.append((data, "diffrec", seed, "chosen"))
            plans.append((data, "sasrec", seed, None))
    max_len = args.max_len or PAPER_CONFIG["max_len"]
    warm_up(args, datas[0])
    planner = Planner(None if args.total_minutes is None else args.total_minutes * 60,
                      None if args.max_minutes is None else args.max_minutes * 60,
                      [run_weight(kind, data, args.mode, max_len) for data, kind, _, _ in plans])
    reports = {}
    for data in datas:
        reports[data.key] = {"runs": {"SASRec-CE": [], "DiffRec": []}, "candidates": [],
                             "popularity": {split: popularity_metrics(data.dataset, split, True)
                                            for split in ("valid", "test")}}
    done = {data.key: 0 for data in datas}
    total = {data.key: sum(1 for p in plans if p[0] is data) for data in datas}
    for data, kind, seed, scale in plans:
        rep = reports[data.key]
        if scale == "chosen":
            scale = rep["chosen"]
        overrides = {"input_scale": float(scale)} if kind == "diffrec" else {}
        config = make_config(data, kind, seed, args, **overrides)
        record = run_model(data, config, planner.next_budget(), args.quiet)
        planner.finished(record)
        if kind == "sasrec":
            rep["runs"]["SASRec-CE"].append(record)
        elif seed == args.seeds[0] and "chosen" not in rep:
            rep["candidates"].append(record)
            if len(rep["candidates"]) == len(scales):  # choose on the validation split only
                best = max(rep["candidates"], key=lambda r: r["valid"]["NDCG@10"])
                rep["chosen"] = best["config"]["input_scale"]
                rep["runs"]["DiffRec"].append(best)
                if len(scales) > 1:
                    log(f"   {data.key}: input_scale {rep['chosen']} chosen on valid NDCG@10 ("
                        + ", ".join(f"{r['config']['input_scale']}: {r['valid']['NDCG@10']:.4f}"
                                    for r in rep["candidates"]) + ")")
        else:
            rep["runs"]["DiffRec"].append(record)
        done[data.key] += 1
        complete = done[data.key] == total[data.key]
        if rep["runs"]["SASRec-CE"] and rep["runs"]["DiffRec"] and not complete:
            write_report(args, env, data, rep, len(plans), len(datas), complete=False)  # in case of a kill
    return [write_report(args, env, data, reports[data.key], len(plans), len(datas), complete=True)
            for data in datas]


def write_report(args, env, data: Data, rep: dict, num_runs: int, num_datasets: int, complete: bool) -> dict:
    sample = rep["runs"]["DiffRec"][0]["config"]
    common_keys = ("dim", "layers", "heads", "max_len", "batch_size", "lr", "lr_schedule", "dropout", "attn_dropout",
                   "epochs", "mode", "window_stride", "samples_per_epoch", "tie_output", "norm_embeddings", "num_samples",
                   "inference", "bf16")
    env = {**env, "load_average_at_end": [round(x, 2) for x in os.getloadavg()]}
    report = {
        "dataset": data.describe(), "seeds": list(args.seeds), "complete": complete, "environment": env,
        "preset": args.preset,
        "label": run_label(env, args.preset) + ("" if complete else " [PARTIAL: not every planned run finished]"),
        "settings": {
            "common": {k: sample[k] for k in common_keys},
            "diffrec": {k: sample[k] for k in ("schedule", "num_steps", "noised_positions", "input_scale",
                                                "importance_sampling", "importance_loss", "mse_weight",
                                                "norm_embeddings", "add_position", "add_step")},
            "training_sequences": describe_sequences(sample["mode"], sample["samples_per_epoch"],
                                                     sample["window_stride"] or sample["max_len"] // 2),
            "budget": budget_text(args, num_runs, num_datasets),
            "data_load_seconds": round(data.load_seconds, 2),
        },
        "popularity": rep["popularity"],
        "summary": {name: summarize(runs) for name, runs in rep["runs"].items()},
        "summary_seen_included": {name: summarize(runs, "test_seen_included") for name, runs in rep["runs"].items()},
        "summary_valid": {name: summarize(runs, "valid") for name, runs in rep["runs"].items()},
        "runs": rep["runs"],
        "paper": PAPER.get(data.key),
    }
    if len(rep["candidates"]) > 1 and "chosen" in rep:
        report["selection"] = {
            "on": "validation NDCG@10", "seed": args.seeds[0], "chosen": rep["chosen"],
            "candidates": [{"input_scale": r["config"]["input_scale"], "valid_NDCG@10": r["valid"]["NDCG@10"],
                            "test": r["test"], "epochs_run": r["epochs_run"], "best_epoch": r["best_epoch"]}
                           for r in rep["candidates"]],
        }
    report["verdict"] = verdict(report)
    json_path = Path(args.out) / f"reproduce_{data.key}{args.suffix}.json"
    md_path = json_path.with_name(json_path.name[: -len(".json")] + ".md")
    write_json(json_path, report)
    md_path.write_text(markdown(report))
    if complete:
        log("\n" + markdown(report))
        log(f"wrote {json_path} and {md_path}")
    return report


# --------------------------------------------------------------------------------------------------
# analyses


def analysis_variants(name: str, args, max_len: int) -> list[tuple[str, dict]]:
    if name == "schedule":
        return [(s, {"schedule": s}) for s in ("sqrt", "cosine", "linear")]
    if name == "steps":
        return [(f"N={n}", {"num_steps": n}) for n in args.steps_list]
    if name == "embeddings":
        return [("both (default)", {}), ("no position", {"add_position": False}),
                ("no step", {"add_step": False}), ("neither", {"add_position": False, "add_step": False})]
    if name == "positions":
        out = []
        for k in args.positions_list:
            value = max_len if str(k) == "all" else int(k)
            out.append((f"K={'all' if value == max_len else value}",
                        {"noised_positions": value, "mode": "prefix", "samples_per_epoch": args.prefix_samples}))
        return out
    raise ValueError(name)


PAPER_FINDINGS = {
    "schedule": "Figure 2: little difference; sqrt best on Toys and ML-1M, second on Beauty; linear slightly lower.",
    "steps": "Figure 3: good with large N (1000, 1500, 2000), best at N = 1000, worse with few steps.",
    "embeddings": "Figure 4: every variant is worse than the default; no embedding at all is the worst.",
    "positions": "Figure 5: noising only the target is best; more noised positions steadily worse; all is worst.",
    "seeds": "Figure 7: performance rises steadily with S from 1 to 20 and plateaus.",
    "figure6": "Figure 6: per-seed top-5 lists (user #5200) are all relevant (Action/Adventure/Sci-Fi) but differ; "
               "the average is more diverse and accurate.",
}


class ModelCache:
    """Trained configurations of this invocation: a variant equal to one already trained reuses it."""

    def __init__(self):
        self.records: dict[str, dict] = {}

    @staticmethod
    def key(config: TrainConfig) -> str:
        return json.dumps(config.to_dict(), sort_keys=True)

    def get(self, config):
        return self.records.get(self.key(config))

    def put(self, config, record):
        self.records[self.key(config)] = record


def resolve_input_scale(args, data: Data) -> float:
    value = args.analysis_input_scale
    if value != "auto":
        return float(value)
    paths = [Path(args.out) / f"reproduce_{data.key}.json", REPO / "results" / f"reproduce_{data.key}.json"]
    for path in paths:
        if path.is_file():
            report = json.loads(path.read_text())
            scale = report.get("selection", {}).get("chosen") or report["runs"]["DiffRec"][0]["config"]["input_scale"]
            log(f"input_scale {scale}: the value chosen on validation in {path}")
            return float(scale)
    log(f"input_scale 1.0 (the paper): none of {[str(p) for p in paths]} to take the validated choice from")
    return 1.0


def run_analyses(args, data: Data) -> list[Path]:
    env = environment(args)
    seed = args.seeds[0]
    scale = resolve_input_scale(args, data)
    max_len = args.max_len or PAPER_CONFIG["max_len"]
    names = list(dict.fromkeys(ANALYSES if "all" in args.analysis else args.analysis))
    names.sort(key=lambda n: n not in ("seeds", "figure6"))  # the default model first: seeds and figure6 use it
    # plan the unique training runs, then share the budget over them
    base_config = make_config(data, "diffrec", seed, args, input_scale=scale)
    warm_up(args, data)
    planned: list[tuple[str, str, TrainConfig]] = []
    seen = set()

    def plan(name, label, config):
        planned.append((name, label, config))
        seen.add(ModelCache.key(config))

    for name in names:
        if name in ("seeds", "figure6"):
            if not args.checkpoint and ModelCache.key(base_config) not in seen:
                plan(name, "default", base_config)
            continue
        for label, overrides in analysis_variants(name, args, max_len):
            config = make_config(data, "diffrec", seed, args, input_scale=scale, **overrides)
            if ModelCache.key(config) not in seen:
                plan(name, label, config)
    planner = Planner(None if args.total_minutes is None else args.total_minutes * 60,
                      None if args.max_minutes is None else args.max_minutes * 60, [1.0] * len(planned))
    log(f"analyses {names} on {data.key}: {len(planned)} training runs (" + ", ".join(
        f"{name}/{label}" for name, label, _ in planned) + f"), seed {seed}, input_scale {scale}")
    cache = ModelCache()
    need_model = {"seeds", "figure6"} & set(names)

    # Variants are compared at equal epochs: the first run of each training mode runs under its time
    # share, and its epoch count is then fixed for the later runs of that mode (with twice the share
    # as a safety limit), so that a run slowed by something else is not a worse variant.
    fixed_epochs: dict[str, int] = {}

    def trained(config) -> dict:
        found = cache.get(config)
        if found is None:
            keep = need_model and ModelCache.key(config) == ModelCache.key(base_config)
            budget = planner.next_budget()
            run_config = config
            if config.mode in fixed_epochs:
                run_config = config.replace(epochs=min(config.epochs, fixed_epochs[config.mode]))
                budget = None if budget is None else 2 * budget
            found = run_model(data, run_config, budget, args.quiet, keep_model=bool(keep))
            fixed_epochs.setdefault(config.mode, found["epochs_run"])
            planner.finished(found)
            cache.put(config, found)
        return found

    written = []
    common = {"dataset": data.describe(), "environment": env, "label": run_label(env), "training_seed": seed,
              "input_scale": scale, "epochs_per_mode": fixed_epochs,
              "popularity": {split: popularity_metrics(data.dataset, split, True) for split in ("valid", "test")},
              "budget": budget_text(args, len(planned), 1) + "; variants compared at the epoch count of the "
                        "first run of their training mode"}
    if need_model:
        if args.checkpoint:
            from diffrec_ext.checkpoint import load_model

            device = torch.device(base_config.device if base_config.device != "auto"
                                  else ("cuda" if torch.cuda.is_available() else "cpu"))
            model, config, _, _ = load_model(args.checkpoint, device=device)
            source = {"checkpoint": str(args.checkpoint), "config": config.to_dict()}
        else:
            record = trained(base_config)
            model = record["_model"]
            source = {"trained_here": True, "config": record["config"], "valid": record["valid"],
                      "test": record["test"], "epochs_run": record["epochs_run"], "best_epoch": record["best_epoch"]}
            if args.save_model:
                from diffrec_ext.checkpoint import save_model

                directory = Path(args.save_model)
                save_model(directory, model, record["config"],
                           [data.dataset.item_original_ids[i] for i in range(1, data.dataset.num_items + 1)],
                           {"data": {"path": data.spec}})
                source["saved_to"] = str(directory)
        model.eval()
        if "seeds" in names:
            report = {"analysis": "seeds", **common, "paper_finding": PAPER_FINDINGS["seeds"], "model": source,
                      **seeds_analysis(model, data, args)}
            written += save_analysis(report, args.out)
        if "figure6" in names:
            report = {"analysis": "figure6", **common, "paper_finding": PAPER_FINDINGS["figure6"], "model": source,
                      **figure6(model, data, args)}
            written += save_analysis(report, args.out)
    for name in names:
        if name in ("seeds", "figure6"):
            continue
        variants = []
        for label, overrides in analysis_variants(name, args, max_len):
            config = make_config(data, "diffrec", seed, args, input_scale=scale, **overrides)
            record = trained(config)
            variants.append({"label": label, "overrides": overrides, **strip_private(record)})
        report = {"analysis": name, **common, "paper_finding": PAPER_FINDINGS[name], "variants": variants,
                  "settings": describe_sequences(variants[0]["config"]["mode"], variants[0]["config"]["samples_per_epoch"],
                                                variants[0]["config"]["window_stride"]
                                                or variants[0]["config"]["max_len"] // 2)}
        written += save_analysis(report, args.out)

    return written


def seeds_analysis(model, data: Data, args) -> dict:
    """One checkpoint; S varies at inference only (Alg. 3), averaged over `--repeats` noise draws."""
    rows = []
    for s in args.seeds_list:
        row = {"S": s}
        for split in args.seeds_splits:
            values = []
            started = time.perf_counter()
            for repeat in range(args.repeats):
                values.append(evaluate(model, data.dataset, split, num_samples=s, seed=1000 + repeat,
                                       batch_size=args.eval_batch_size,
                                       bf16=bf16_enabled(args.bf16, model.pos_emb.device)))
            row[split] = {m: float(np.mean([v[m] for v in values])) for m in METRICS}
            if args.repeats > 1:
                row[split + "_std"] = {m: float(np.std([v[m] for v in values], ddof=1)) for m in METRICS}
            row[split + "_seconds"] = round(time.perf_counter() - started, 2)
        log(f"   S = {s:2d}: " + "  ".join(f"{split} NDCG@10 {row[split]['NDCG@10']:.4f} HR@10 {row[split]['HR@10']:.4f}"
                                          for split in args.seeds_splits))
        rows.append(row)
    return {"splits": list(args.seeds_splits), "repeats": args.repeats, "rows": rows}


def read_movies(path: Path) -> dict[int, tuple[str, str]]:
    movies = {}
    for line in path.read_bytes().decode("latin-1").splitlines():
        parts = line.split("::")
        if len(parts) >= 3:
            movies[int(parts[0])] = (parts[1], parts[2])
    return movies


@torch.no_grad()
def figure6(model, data: Data, args) -> dict:
    """Per-seed top-5 (Alg. 3 with S = 1, each seed its own noise draw) and the S-seed average for
    one user's test input (history = every item before the test item), with titles and genres."""
    from diffrec_ext import ops
    from diffrec_ext.inference import exclusion, inference_input, predict_h0

    dataset = data.dataset
    movies_path = Path(args.movies) if args.movies else (data.path.parent / "movies.dat" if data.path else None)
    movies = read_movies(movies_path) if movies_path and movies_path.is_file() else {}
    if not movies:
        log(f"   figure6: no movies.dat ({movies_path}): item ids only")
    try:
        user = int(dataset.dense_users([args.user])[0])
        user_id = args.user
    except (KeyError, ValueError, IndexError):
        user = 0
        user_id = dataset.user_original_ids[0].item() if hasattr(dataset.user_original_ids[0], "item") \
            else dataset.user_original_ids[0]
        log(f"   figure6: user {args.user} not in the data, using user {user_id}")
    sequence = [int(i) for i in dataset.sequence(user)]
    history, target = sequence[:-1], sequence[-1]

    def item(dense: int) -> dict:
        original = dataset.item_original_ids[dense]
        original = original.item() if hasattr(original, "item") else original
        title, genres = movies.get(int(original), (str(original), "")) if movies else (str(original), "")
        return {"dense": dense, "id": original, "title": title, "genres": genres}

    device = model.pos_emb.device
    ids = inference_input(model, [history], device)
    generator = torch.Generator(device=device).manual_seed(args.figure6_noise_seed)
    total = max(args.figure6_seeds, args.figure6_average)
    with autocast_context(device, bf16_enabled(args.bf16, device)):
        hidden = predict_h0(model, ids, total, "alg3", generator)  # [1, total, d]
    offsets, excluded = exclusion([history], 1, True, device)
    w, b = model.item_layer()
    target_t = torch.tensor([target], device=device)

    def top(h):
        scores, items = ops.seed_topk(h.contiguous(), w, b, args.figure6_k, offsets, excluded)
        rank = int(ops.seed_target_rank(h.contiguous(), w, b, target_t, offsets, excluded)[0])
        return [{**item(int(i)), "prob": float(p)} for i, p in zip(items[0].tolist(), scores[0].tolist())], rank

    lists = []
    for s in range(args.figure6_seeds):
        entries, rank = top(hidden[:, s:s + 1])
        lists.append({"seed": s + 1, "top": entries, "target_rank": rank})
    avg_entries, avg_rank = top(hidden[:, :args.figure6_average])
    union = {e["dense"] for l in lists for e in l["top"]}
    out = {
        "user": user_id, "history_length": len(history),
        "history_tail": [item(i) for i in history[-args.figure6_history:]],
        "ground_truth": item(target), "per_seed": lists,
        "average": {"S": args.figure6_average, "top": avg_entries, "target_rank": avg_rank},
        "distinct_items_in_per_seed_lists": len(union), "movies_file": str(movies_path) if movies else None,
    }
    log(f"   figure6: user {user_id}, ground truth {out['ground_truth']['title']} ({out['ground_truth']['genres']})")
    for l in lists + [{"seed": f"avg S={args.figure6_average}", **out["average"]}]:
        log(f"     seed {l['seed']}: " + " | ".join(e["title"] for e in l["top"]) + f"  (target rank {l['target_rank']})")
    return out


def save_analysis(report: dict, out_dir) -> list[Path]:
    path = Path(out_dir) / f"analysis_{report['analysis']}.json"
    write_json(path, report)
    written = [path]
    png = plot_analysis(report, path.with_suffix(".png"))
    if png:
        written.append(png)
    log(f"wrote {', '.join(map(str, written))}")
    return written


# --------------------------------------------------------------------------------------------------
# plots


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        log("matplotlib is not installed: no PNG (run `reproduce.py --replot DIR` where it is)")
        return None


def plot_analysis(report: dict, png_path) -> Path | None:
    """Draw one analysis JSON (a dict as written by this script) as a PNG; returns the path."""
    plt = _pyplot()
    if plt is None:
        return None
    name = report["analysis"]
    title = f"{report['dataset']['name']}: {name} ({report.get('label', '')})"
    png_path = Path(png_path)
    if name == "figure6":
        fig = _plot_figure6(plt, report)
    elif name == "seeds":
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        xs = [r["S"] for r in report["rows"]]
        for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
            for split in report["splits"]:
                ys = [r[split][metric] for r in report["rows"]]
                err = [r[split + "_std"][metric] for r in report["rows"]] if (split + "_std") in report["rows"][0] else None
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=split)
            _popularity_line(ax, report, metric, report["splits"])
            ax.set_xlabel("number of inference seeds S")
            ax.set_ylabel(metric)
            ax.set_xticks(xs)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=9)
    else:
        variants = report["variants"]
        labels = [v["label"] for v in variants]
        ncols = 3 if name == "schedule" else 2
        fig, axes = plt.subplots(1, ncols, figsize=(4.6 * ncols, 3.8))
        axes = list(np.atleast_1d(axes))
        if name == "schedule":
            from diffrec_ext.schedules import NoiseSchedule

            ax = axes.pop(0)
            for schedule in ("sqrt", "cosine", "linear"):
                abar = NoiseSchedule.create(schedule, 1000).abar.numpy()
                ax.plot(np.arange(len(abar)), abar, label=schedule)
            ax.set_xlabel("diffusion step n (N = 1000)")
            ax.set_ylabel("abar_n")
            ax.legend()
            ax.grid(alpha=0.3)
        for ax, metric in zip(axes, ("NDCG@10", "HR@10")):
            if name == "steps":
                xs = [v["config"]["num_steps"] for v in variants]
                for split, marker in (("test", "o"), ("valid", "s")):
                    ax.plot(xs, [v[split][metric] for v in variants], marker=marker, label=split)
                ax.set_xscale("log")
                ax.set_xticks(xs)
                ax.set_xticklabels([str(x) for x in xs], rotation=45)
                ax.set_xlabel("diffusion steps N")
            else:
                x = np.arange(len(labels))
                ax.bar(x - 0.2, [v["test"][metric] for v in variants], 0.4, label="test")
                ax.bar(x + 0.2, [v["valid"][metric] for v in variants], 0.4, label="valid", alpha=0.6)
                ax.set_xticks(x)
                ax.set_xticklabels(labels, rotation=20, fontsize=8)
            _popularity_line(ax, report, metric)
            ax.legend(fontsize=7, loc="best")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3, axis="y")
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def _popularity_line(ax, report, metric, splits=("test",)):
    """A dashed line at the popularity ranking's score (the collapse reference), when recorded."""
    for split in splits:
        value = report.get("popularity", {}).get(split, {}).get(metric)
        if value is not None:
            ax.axhline(value, ls="--", lw=1, color="0.3" if split == "test" else "0.6", label=f"popularity ({split})")


def _plot_figure6(plt, report):
    columns = [("watch history (latest last)", report["history_tail"], None)]
    for l in report["per_seed"]:
        columns.append((f"seed {l['seed']} top-{len(l['top'])} (target rank {l['target_rank']})", l["top"], l))
    avg = report["average"]
    columns.append((f"average of S = {avg['S']} (target rank {avg['target_rank']})", avg["top"], avg))
    truth = report["ground_truth"]["dense"]
    rows = max(len(c[1]) for c in columns)
    fig, ax = plt.subplots(figsize=(3.4 * len(columns), 0.62 * rows + 1.6))
    ax.set_axis_off()
    ax.set_xlim(0, len(columns))
    ax.set_ylim(-1.2, rows + 1)
    for col, (heading, entries, _) in enumerate(columns):
        ax.text(col + 0.05, rows + 0.4, heading, fontsize=8, fontweight="bold", va="center")
        for row, entry in enumerate(entries):
            y = rows - row - 0.2
            title = entry["title"] if len(entry["title"]) <= 38 else entry["title"][:36] + "…"
            box = dict(boxstyle="round,pad=0.2", fc="white", ec="red", lw=1.6) if entry["dense"] == truth else None
            ax.text(col + 0.05, y, title, fontsize=7.5, va="center", bbox=box)
            ax.text(col + 0.05, y - 0.32, entry["genres"].replace("|", ", "), fontsize=6, color="0.4", va="center")
    gt = report["ground_truth"]
    ax.text(0.05, -0.8, f"user {report['user']}: ground truth (test item) {gt['title']} [{gt['genres']}], "
            f"red box where listed; {report.get('label', '')}", fontsize=7.5, color="red")
    return fig


def replot(directory) -> list[Path]:
    out = []
    for path in sorted(Path(directory).glob("analysis_*.json")):
        png = plot_analysis(json.loads(path.read_text()), path.with_suffix(".png"))
        if png:
            out.append(png)
            log(f"wrote {png}")
    return out


# --------------------------------------------------------------------------------------------------
# command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="dataset files (or 'synthetic[:num_users=..,...]'); default: ml-1m and beauty of the shared "
                        "data ($DIFFREC_DATA or ../shared/data)")
    p.add_argument("--analysis", nargs="+", choices=ANALYSES + ("all",), default=None,
                   help="run these analyses (on the first --data) instead of the main table")
    p.add_argument("--replot", metavar="DIR", default=None, help="only redraw the PNGs of DIR/analysis_*.json")
    p.add_argument("--out", default=None,
                   help="output folder (default results/reproduce_cpu on the CPU, results/ on CUDA)")
    p.add_argument("--suffix", default="", help="appended to the main table's file names")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    budget = p.add_argument_group("time budget")
    budget.add_argument("--max-minutes", type=float, default=None, help="wall-clock limit per training run")
    budget.add_argument("--total-minutes", type=float, default=None,
                        help="wall-clock limit for all training runs together, shared by weight")
    model = p.add_argument_group("settings (defaults: the paper's)")
    model.add_argument("--preset", choices=["paper", "cpu"], default="paper",
                       help="paper: the paper's settings; cpu: d 64, tied item layer, input scale 0.2, lr 2e-3 "
                            "(chosen on ML-1M's validation split for a CPU budget); flags below override either")
    model.add_argument("--mode", choices=["window", "prefix", "user"], default="window",
                       help="training-sequence construction (prefix: the paper's; window: every target once per "
                            "epoch, several per pass)")
    model.add_argument("--samples-per-epoch", type=int, default=0, help="prefix mode: prefixes per epoch (0 = all)")
    model.add_argument("--input-scale", type=float, nargs="+", default=None,
                       help="DiffRec input-scale candidates, chosen on validation NDCG@10 (1.0 = the paper; "
                            "default 1.0 and 0.2, or the preset's)")
    for name, kind in (("dim", int), ("layers", int), ("heads", int), ("max-len", int), ("batch-size", int),
                       ("epochs", int), ("lr", float), ("dropout", float)):
        model.add_argument(f"--{name}", type=kind, default=None, help=f"override the paper's {name}")
    model.add_argument("--eval-num-samples", "--eval-seeds", dest="num_samples_eval", type=int, default=None,
                       help="S, the noise draws averaged at evaluation (paper 10; --eval-seeds: the old name)")
    model.add_argument("--set", nargs="+", default=None, metavar="KEY=VALUE", help="any TrainConfig field")
    model.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    model.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                       help="bf16 autocast of the forward passes (auto: on CUDA only)")
    model.add_argument("--eval-batch-size", type=int, default=None, help="users per evaluation batch "
                       "(default 1024 on CUDA, 256 on the CPU)")
    model.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    model.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    ana = p.add_argument_group("analyses")
    ana.add_argument("--analysis-input-scale", default="auto",
                     help="input scale of the analysed DiffRec; auto = the value chosen on validation in "
                          "<out>/reproduce_<dataset>.json, else 1.0")
    ana.add_argument("--steps-list", type=int, nargs="+", default=[10, 50, 100, 500, 1000, 1500, 2000])
    ana.add_argument("--positions-list", nargs="+", default=["1", "2", "3", "4", "all"])
    ana.add_argument("--prefix-samples", type=int, default=100_000,
                     help="positions analysis (prefix training): prefixes per epoch")
    ana.add_argument("--seeds-list", type=int, nargs="+", default=[1, 2, 3, 5, 10, 15, 20])
    ana.add_argument("--seeds-splits", nargs="+", choices=["valid", "test"], default=["valid", "test"])
    ana.add_argument("--repeats", type=int, default=1, help="seeds analysis: noise draws per S")
    ana.add_argument("--checkpoint", default=None, help="seeds/figure6: a saved model instead of training one")
    ana.add_argument("--save-model", default=None, metavar="DIR", help="seeds/figure6: save the trained model here")
    ana.add_argument("--movies", default=None, help="figure6: movies.dat (default: beside the data file)")
    ana.add_argument("--user", type=int, default=5200, help="figure6: original user id (paper: 5200)")
    ana.add_argument("--figure6-seeds", type=int, default=3, help="figure6: per-seed lists shown")
    ana.add_argument("--figure6-average", type=int, default=10, help="figure6: S of the averaged list")
    ana.add_argument("--figure6-k", type=int, default=5)
    ana.add_argument("--figure6-history", type=int, default=10, help="figure6: history items shown")
    ana.add_argument("--figure6-noise-seed", type=int, default=0)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.replot:
        replot(args.replot)
        return 0
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if args.eval_batch_size is None:
        args.eval_batch_size = 1024 if device.startswith("cuda") else 256
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.data is None:
        folder = default_data_dir()
        if folder is None:
            raise SystemExit("reproduce.py: no --data and no shared data folder ($DIFFREC_DATA or ../shared/data)")
        args.data = [str(folder / "ml-1m" / "ml-1m.txt.gz"), str(folder / "beauty" / "Beauty.txt")]
    if args.out is None:
        args.out = str(REPO / "results" / ("reproduce_cpu" if device == "cpu" else ""))
    Path(args.out).mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    datas = []
    for spec in (args.data[:1] if args.analysis else args.data):
        data = load_data(spec)
        log(f"dataset {data.key}: {data.dataset.num_users:,} users, {data.dataset.num_items:,} items, "
            f"{data.dataset.num_actions:,} actions ({data.load_seconds:.1f}s to load)")
        datas.append(data)
    if args.analysis:
        run_analyses(args, datas[0])
    else:
        run_main(args, datas)
    log(f"total {time.perf_counter() - started:.0f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
