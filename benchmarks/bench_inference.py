"""`python benchmarks/bench_inference.py`: latency and throughput of the inference engines, fused against eager
PyTorch in the same run.

Sweeps the number of reverse steps of Alg. 2 (1, 10, 100, 1000: the strided schedule with stride
N / steps), the catalog size, the batch size (users per call) and the device; Alg. 3 (one denoiser
pass per seed) is measured at every catalog and batch size. Writes `results.csv`, `table.md` and
`inference.png` (latency and users/s against steps, log axes) into the output folder and prints
the table.

The model is randomly initialised at the requested shape (timing does not depend on the weights)
and every user has a full-length history (T - 1 items): no padding to trim, the worst case.

Engines: "eager" (eager_engine.EagerEngine, beside this file), "fused" (engine.InferenceEngine, defaults), and two
variants that isolate where the speed comes from: "fused_kernel" (scoring always by the
ops.seed_topk kernel) and "fused_full" (no shared history: B * S full sequences).

Timing: every engine of a configuration runs in turn, round after round (a load change on a
shared machine hits all of them alike), after a warm-up call (on CUDA: graph capture); the median
of the rounds is reported. A measurement whose estimated time exceeds `max_seconds` is skipped
and listed as such.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import cpu_model
from eager_engine import EagerEngine

from diffrec_ext.checkpoint import load_model
from diffrec_ext.config import resolve_device
from diffrec_ext.data import evaluation_batch, load_dataset
from diffrec_ext.engine import InferenceEngine
from diffrec_ext.errors import CheckpointError
from diffrec_ext.inference import reverse_steps
from diffrec_ext.metrics import ranking_metrics
from diffrec_ext.model import DSR
from diffrec_ext.synthetic import synthetic_dataset

ENGINE_VARIANTS = ("eager", "fused", "fused_kernel", "fused_full")
COLUMNS = ("device", "device_name", "dtype", "engine", "algorithm", "steps", "stride", "seeds", "batch_size",
           "catalog_size", "dim", "max_len", "layers", "k", "latency_ms", "denoise_ms", "score_ms", "ms_per_step",
           "users_per_s", "speedup_vs_eager", "repeats", "cuda_graphs", "share_history", "scoring", "threads",
           "load_avg", "status")


def default_sweep(device: str) -> dict:
    """A sweep that fits the device: the issue's targets on CUDA, a few minutes on a small CPU."""
    if device.startswith("cuda"):
        return dict(steps=(1, 10, 100, 1000), catalog_sizes=(100_000, 1_000_000), batch_sizes=(64, 256),
                    alg2_batch_sizes=None, alg2_catalog_sizes=(100_000,), engines=("eager", "fused"),
                    max_seconds=30.0)
    return dict(steps=(1, 10, 100, 1000), catalog_sizes=(10_000, 100_000), batch_sizes=(16, 64),
                alg2_batch_sizes=(2, 16), alg2_catalog_sizes=(100_000,), engines=ENGINE_VARIANTS, max_seconds=20.0)


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({os.cpu_count()} cores)"


def make_engine(variant: str, model: DSR, device: str, batch_size: int):
    options = dict(device=device, batch_size=batch_size, profile=True)
    if variant == "eager":
        return EagerEngine(model, **options)
    if variant == "fused":
        return InferenceEngine(model, **options)
    if variant == "fused_kernel":
        return InferenceEngine(model, scoring="kernel", **options)
    if variant == "fused_full":
        return InferenceEngine(model, share_history=False, **options)
    raise ValueError(f"engine must be one of {ENGINE_VARIANTS}, got {variant!r}")


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(torch.device(device))


def _measure(engines: dict, histories, call: dict, device: str, warmup: bool, min_seconds: float,
             max_repeats: int) -> dict:
    """Median wall time per call (and its denoise / score phases) of every engine, round-robin."""
    def once(engine):
        _synchronize(device)
        start = time.perf_counter()
        engine.recommend_dense(histories, seed=0, **call)
        _synchronize(device)
        return time.perf_counter() - start, engine.last_timings.get("denoise_s", math.nan), \
            engine.last_timings.get("score_s", math.nan)

    if warmup:
        for engine in engines.values():
            once(engine)
    samples = {name: [] for name in engines}
    while True:
        for name, engine in engines.items():
            samples[name].append(once(engine))
        spent = min(sum(s[0] for s in runs) for runs in samples.values())
        if spent >= min_seconds or len(next(iter(samples.values()))) >= max_repeats:
            break
    return {name: tuple(statistics.median(column) for column in zip(*runs)) + (len(runs),)
            for name, runs in samples.items()}


def _row(base: dict, engine, variant: str, algorithm: str, steps: int, stride: int, seeds: int,
         measured: tuple | None, status: str) -> dict:
    row = dict(base, engine=variant, algorithm=algorithm, steps=steps, stride=stride, seeds=seeds,
               cuda_graphs=getattr(engine, "cuda_graphs", False), share_history=engine.shares_history,
               scoring=getattr(engine, "scoring", "eager softmax"), status=status)
    if measured is None:
        row.update(latency_ms=math.nan, denoise_ms=math.nan, score_ms=math.nan, ms_per_step=math.nan,
                   users_per_s=math.nan, repeats=0)
        return row
    latency, denoise, score, repeats = measured
    row.update(latency_ms=latency * 1e3, denoise_ms=denoise * 1e3, score_ms=score * 1e3,
               ms_per_step=denoise * 1e3 / steps, users_per_s=base["batch_size"] / latency, repeats=repeats)
    return row


def run_benchmark(steps=(1, 10, 100, 1000), catalog_sizes=(100_000,), batch_sizes=(256,), devices=("cpu",),
                  out_dir=None, *, engines=("eager", "fused"), seeds: int = 10, alg2_seeds: int = 1,
                  alg2_batch_sizes=None, alg2_catalog_sizes=None, dim: int = 256, max_len: int = 50,
                  layers: int = 2, heads: int = 2, num_steps: int = 1000, k: int = 20, max_seconds: float = 30.0,
                  min_seconds: float = 1.0, max_repeats: int = 10, quiet: bool = False) -> list[dict]:
    """Measure every configuration, return the rows (see COLUMNS); with `out_dir`, also write
    results.csv, table.md and inference.png there. `alg2_batch_sizes` / `alg2_catalog_sizes`
    restrict the Alg. 2 step sweep (None: all of batch_sizes / catalog_sizes)."""
    for variant in engines:
        if variant not in ENGINE_VARIANTS:
            raise ValueError(f"engine must be one of {ENGINE_VARIANTS}, got {variant!r}")
    for count in steps:
        if not isinstance(count, int) or not 1 <= count <= num_steps:
            raise ValueError(f"steps must be ints in [1, N = {num_steps}], got {count!r}")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    rows: list[dict] = []
    for device in devices:
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {device} requested but CUDA is not available")
        name = device_name(device)
        for catalog in catalog_sizes:
            torch.manual_seed(0)
            model = DSR(num_items=catalog, max_len=max_len, dim=dim, layers=layers, heads=heads, dropout=0.0,
                        num_steps=num_steps).eval()
            largest = max(tuple(batch_sizes) + tuple(alg2_batch_sizes or ()))
            built = {variant: make_engine(variant, model, device, largest) for variant in engines}
            if device.startswith("cuda"):  # on CUDA the kernel is the fused engine's scoring already
                built.pop("fused_kernel", None)
            dtype = str(built[next(iter(built))].dtype).replace("torch.", "")
            rng = np.random.default_rng(0)
            for batch in sorted(set(batch_sizes) | set(alg2_batch_sizes or ())):
                histories = [rng.integers(1, catalog + 1, max_len - 1) for _ in range(batch)]
                base = dict(device=device, device_name=name, dtype=dtype, batch_size=batch, catalog_size=catalog,
                            dim=dim, max_len=max_len, layers=layers, k=k, threads=torch.get_num_threads(),
                            load_avg=round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else math.nan)
                if batch in batch_sizes:
                    say(f"[{device}] V={catalog:,} B={batch} alg3 S={seeds}: {', '.join(built)}")
                    measured = _measure(built, histories, dict(k=k, num_samples=seeds, algorithm="alg3"), device, True,
                                        min_seconds, max_repeats)
                    for variant, engine in built.items():
                        rows.append(_row(base, engine, variant, "alg3", 1, 1, seeds, measured[variant], "ok"))
                    _add_speedups(rows)
                    say("   " + _summary(rows[-len(built):]))
                if (alg2_batch_sizes is not None and batch not in alg2_batch_sizes) or \
                        (alg2_catalog_sizes is not None and catalog not in alg2_catalog_sizes):
                    continue
                rows.extend(_sweep_steps(built, histories, base, steps, num_steps, alg2_seeds, k, device,
                                         max_seconds, min_seconds, max_repeats, say))
                _add_speedups(rows)
            del built, model
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    if out_dir is not None:
        write_outputs(rows, out_dir, say)
    return rows


def _sweep_steps(built, histories, base, steps, num_steps, seeds, k, device, max_seconds, min_seconds,
                 max_repeats, say) -> list[dict]:
    rows = []
    per_step: dict[str, float] = {}  # seconds per visited step, from the last measurement
    warmed = set()
    for count in sorted(steps):
        stride = num_steps // count
        visited = len(reverse_steps(num_steps, stride))
        runnable, skipped = {}, {}
        rounds = 2 if device.startswith("cuda") or variant_not_warmed(built, warmed) else 1  # (+ warm-up)
        # all engines or none, so that every measured row has its eager baseline from the same moment
        estimate = sum(per_step.get(variant, 0.0) for variant in built) * visited * rounds
        if estimate > max_seconds:
            skipped = {variant: f"skipped: estimated {estimate:.0f} s > max_seconds = {max_seconds:g}"
                       for variant in built}
        else:
            runnable = dict(built)
        for variant, status in skipped.items():
            rows.append(_row(base, built[variant], variant, "alg2", visited, stride, seeds, None, status))
            say(f"[{device}] V={base['catalog_size']:,} B={base['batch_size']} alg2 steps={visited} {variant}: {status}")
        if not runnable:
            continue
        # CPU: one warm-up per engine is enough; CUDA: every stride is its own captured graph
        warmup = device.startswith("cuda") or not set(runnable) <= warmed
        warmed |= set(runnable)
        say(f"[{device}] V={base['catalog_size']:,} B={base['batch_size']} alg2 steps={visited} S={seeds}: "
            f"{', '.join(runnable)}")
        measured = _measure(runnable, histories, dict(k=k, num_samples=seeds, algorithm="alg2", stride=stride), device,
                            warmup, min_seconds if visited < 100 else 0.0, max_repeats)
        for variant, engine in runnable.items():
            rows.append(_row(base, engine, variant, "alg2", visited, stride, seeds, measured[variant], "ok"))
            per_step[variant] = measured[variant][0] / visited
        _add_speedups(rows)
        say("   " + _summary(rows[-len(runnable):]))
    return rows


def variant_not_warmed(built: dict, warmed: set) -> bool:
    return not set(built) <= warmed


def _config_key(row: dict) -> tuple:
    return tuple(row[c] for c in ("device", "algorithm", "steps", "seeds", "batch_size", "catalog_size"))


def _add_speedups(rows: list[dict]) -> None:
    eager = {_config_key(r): r["users_per_s"] for r in rows if r["engine"] == "eager"}
    for row in rows:
        baseline = eager.get(_config_key(row), math.nan)
        measured = not math.isnan(baseline) and baseline > 0
        row["speedup_vs_eager"] = row["users_per_s"] / baseline if measured else math.nan


def _summary(rows: list[dict]) -> str:
    return "; ".join(f"{r['engine']} {r['latency_ms']:.1f} ms {r['users_per_s']:.0f} users/s "
                     f"(x{r['speedup_vs_eager']:.2f})" for r in rows)


# ------------------------------------------------------------------------------------- quality
def stride_quality(model: DSR, dataset, steps=(1, 10, 100, 1000), *, split: str = "test", alg2_seeds: int = 1,
                   alg3_seeds: int = 10, max_users: int | None = 1000, exclude_seen: bool = True, seed: int = 0,
                   batch_size: int = 256, quiet: bool = False) -> list[dict]:
    """The quality cost of a strided Alg. 2 schedule: full-ranking HR/NDCG@10/20 of Alg. 2 with
    each number of visited steps (stride N / steps), beside Alg. 3, on the same users (the first
    `max_users` of the split, None: all) with the same noise seed."""
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    batch = evaluation_batch(dataset, split, model.max_len - 1)
    users = len(batch.targets) if max_users is None else min(max_users, len(batch.targets))
    offsets = batch.seen_offsets[:users + 1]
    seen = batch.seen_items[:offsets[-1]]
    engine = InferenceEngine(model, batch_size=batch_size, cuda_graphs=False)
    configs = [("alg3", 1, 1, alg3_seeds)]
    for count in sorted(steps):
        stride = model.num_steps // count
        configs.append(("alg2", len(reverse_steps(model.num_steps, stride)), stride, alg2_seeds))
    rows = []
    for algorithm, visited, stride, seeds in configs:
        started = time.perf_counter()
        ranks = engine.target_ranks(batch.histories[:users], batch.targets[:users], exclude_seen=exclude_seen,
                                    num_samples=seeds, algorithm=algorithm, seed=seed, stride=stride, seen_offsets=offsets,
                                    seen_items=seen)
        metrics = ranking_metrics(ranks, (10, 20))
        rows.append(dict(algorithm=algorithm, steps=visited, stride=stride, seeds=seeds, split=split, users=users,
                         **metrics, seconds=time.perf_counter() - started))
        say(f"quality {algorithm} steps={visited} S={seeds}: NDCG@10 {metrics['NDCG@10']:.4f} "
            f"HR@10 {metrics['HR@10']:.4f} ({rows[-1]['seconds']:.1f} s)")
    return rows


def quality_table(rows: list[dict]) -> str:
    columns = ("algorithm", "steps", "stride", "seeds", "split", "users", "HR@10", "NDCG@10", "HR@20", "NDCG@20",
               "seconds")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(f"{row[c]:.4f}" if c.startswith(("HR", "NDCG")) else _format(row[c])
                                       for c in columns) + " |")
    return "\n".join(lines)


def _quality_dataset(meta: dict, data: str | None, synthetic_seed: int | None):
    """The dataset to measure quality on: `data` (a file or "synthetic"), else the one the
    checkpoint was trained on (its stored data spec)."""
    spec = dict(meta.get("data") or {})
    path = data or spec.get("path")
    if path is None:
        raise ValueError("the checkpoint does not say which dataset it was trained on: pass --quality-data")
    k_core = int(spec.get("k_core", 5))
    if path == "synthetic":
        seed = synthetic_seed if synthetic_seed is not None else int(spec.get("synthetic_seed", 0))
        return synthetic_dataset(seed=seed, k_core=k_core)
    if not Path(path).is_file():
        raise ValueError(f"dataset file {path} does not exist")
    return load_dataset(path, spec.get("format", "auto") if data is None else "auto", k_core=k_core,
                        min_rating=spec.get("min_rating"), **(spec.get("columns") or {}))


def run_quality(checkpoint, out_dir=None, *, data: str | None = None, synthetic_seed: int | None = None,
                dataset=None, device: str = "auto", **options) -> list[dict]:
    """stride_quality for a checkpoint on `dataset` (a SequenceDataset), else on `data` (a file or
    "synthetic"), else on the dataset stored in the checkpoint; with `out_dir`, writes
    quality.csv and quality.md."""
    model, config, _, meta = load_model(checkpoint, device=resolve_device(device))
    if dataset is None:
        dataset = _quality_dataset(meta, data, synthetic_seed)
    if dataset.num_items != model.num_items:
        raise ValueError(f"the dataset has {dataset.num_items} items, the checkpoint {model.num_items}: "
                         "not the dataset it was trained on")
    options.setdefault("alg3_seeds", config.num_samples)
    rows = stride_quality(model, dataset, **options)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        with (out / "quality.csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        text = (f"Quality of the strided Alg. 2 schedule (checkpoint {checkpoint}, dataset {dataset.name}, "
                f"N = {model.num_steps}, exclude seen, full ranking):\n\n" + quality_table(rows) + "\n")
        (out / "quality.md").write_text(text)
        print(text)
    return rows


# ------------------------------------------------------------------------------------- outputs
def _format(value, digits=3) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown_table(rows: list[dict]) -> str:
    columns = ("device", "engine", "algorithm", "steps", "seeds", "batch_size", "catalog_size", "latency_ms",
               "denoise_ms", "score_ms", "ms_per_step", "users_per_s", "speedup_vs_eager", "status")
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:,}" if c == "catalog_size" else
                 (f"{row[c]:.2f}x" if c == "speedup_vs_eager" and not math.isnan(row[c]) else _format(row[c]))
                 for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def header(rows: list[dict]) -> str:
    if not rows:
        return "no measurements"
    first = rows[0]
    devices = sorted({f"{r['device']}: {r['device_name']} ({r['dtype']}, {r['threads']} threads)" for r in rows})
    loads = [r["load_avg"] for r in rows if not math.isnan(r["load_avg"])]
    return (f"Inference benchmark: randomly initialised DSR (d = {first['dim']}, T = {first['max_len']}, "
            f"{first['layers']} layers), full-length histories, k = {first['k']}; " + "; ".join(devices)
            + (f"; 1-minute load average {min(loads):.1f} to {max(loads):.1f}" if loads else "")
            + ". latency = one call for `batch_size` users (median); denoise / score = its phases; "
              "ms_per_step = denoise / steps; speedup = users/s against eager in the same run.")


def write_outputs(rows: list[dict], out_dir, say=print) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out / "results.csv", "table": out / "table.md", "plot": out / "inference.png"}
    with paths["csv"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c) for c in COLUMNS})
    text = header(rows) + "\n\n" + markdown_table(rows) + "\n"
    paths["table"].write_text(text)
    print(text)
    if not plot(rows, paths["plot"]):
        say("matplotlib is not installed: no plot (pip install matplotlib)")
        paths.pop("plot")
    say("wrote " + ", ".join(str(p) for p in paths.values()))
    return paths


def plot(rows: list[dict], path) -> bool:
    """Latency and users/s against reverse steps (Alg. 2 lines, Alg. 3 as stars at one pass)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return False
    measured = [r for r in rows if r["status"] == "ok"]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, 5.2))
    series: dict[tuple, list[dict]] = {}
    for row in measured:
        key = (row["algorithm"], row["device"], row["engine"], row["batch_size"], row["catalog_size"])
        series.setdefault(key, []).append(row)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    engine_color = {name: colors[i % len(colors)] for i, name in enumerate(ENGINE_VARIANTS)}
    shapes = sorted({key[1:2] + key[3:] for key in series})  # (device, batch, catalog): one line style each
    line_styles = ("-", "--", ":", "-.")
    for (algorithm, device, engine, batch, catalog), points in sorted(series.items()):
        points.sort(key=lambda r: r["steps"])
        x = [r["steps"] for r in points]
        label = f"{device} {engine} B={batch} V={catalog:,} {algorithm}"
        line = line_styles[shapes.index((device, batch, catalog)) % len(line_styles)]
        style = dict(color=engine_color.get(engine), label=label, linestyle=line)
        if algorithm == "alg2":
            for axis, key in ((left, "latency_ms"), (right, "users_per_s")):
                axis.plot(x, [r[key] for r in points], marker="o", markersize=4, **style)
        else:
            for axis, key in ((left, "latency_ms"), (right, "users_per_s")):
                axis.plot(x, [r[key] for r in points], marker="*", markersize=11, linestyle="none",
                          color=style["color"], label=label)
    for axis, title in ((left, "latency per call (ms)"), (right, "users per second")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_xlabel("reverse steps (Alg. 2); stars: Alg. 3, one pass per seed")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    handles, labels = right.get_legend_handles_labels()
    figure.legend(handles, labels, loc="lower center", ncol=3, fontsize=7, frameon=False)
    figure.suptitle("DiffRec inference: fused engine vs eager PyTorch (" +
                    ", ".join(sorted({r["device_name"] for r in measured})) + ")", fontsize=10)
    figure.tight_layout(rect=(0, 0.16 + 0.012 * max(0, len(labels) - 12), 1, 0.95))
    figure.savefig(path, dpi=130)
    plt.close(figure)
    return True


# ------------------------------------------------------------------------------------- command line
def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(float(v)) for v in text.replace(",", " ").split())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python benchmarks/bench_inference.py",
        description=__doc__.split("\n\n", 1)[1].split("\n\nTiming:", 1)[0],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", nargs="+", default=["auto"], help="cpu, cuda, cuda:N (several allowed); "
                        "auto: cuda if available, else cpu")
    parser.add_argument("--steps", type=_ints, default=None, help="reverse steps of Alg. 2, e.g. '1 10 100 1000'")
    parser.add_argument("--catalog-sizes", type=_ints, default=None, help="items, e.g. '100000 1000000'")
    parser.add_argument("--batch-sizes", type=_ints, default=None, help="users per call, e.g. '64 256'")
    parser.add_argument("--alg2-batch-sizes", type=_ints, default=None,
                        help="batch sizes of the Alg. 2 step sweep (default: per device)")
    parser.add_argument("--alg2-catalog-sizes", type=_ints, default=None,
                        help="catalog sizes of the Alg. 2 step sweep (default: per device)")
    parser.add_argument("--engines", nargs="+", choices=ENGINE_VARIANTS, default=None,
                        help="engines to measure (default: per device)")
    parser.add_argument("--seeds", type=int, default=10, help="S of Alg. 3")
    parser.add_argument("--alg2-seeds", type=int, default=1, help="seeds (samples) per user of Alg. 2")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--max-len", type=int, default=50, help="T")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--num-steps", type=int, default=1000, help="N of the model")
    parser.add_argument("-k", "--k", type=int, default=20, help="items per user")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="skip a measurement estimated to take longer (default: 20 on CPU, 30 on CUDA)")
    parser.add_argument("--min-seconds", type=float, default=1.0, help="repeat a measurement until this long")
    parser.add_argument("--max-repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's choice)")
    parser.add_argument("--out", default="results/inference", help="folder for results.csv, table.md, inference.png")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    quality = parser.add_argument_group("quality of the strided Alg. 2 schedule (instead of timing)")
    quality.add_argument("--quality", default=None, metavar="CHECKPOINT",
                         help="measure HR/NDCG of Alg. 2 for each --steps (and Alg. 3) with this trained checkpoint "
                              "and write quality.csv / quality.md into --out")
    quality.add_argument("--quality-data", default=None, metavar="PATH",
                         help="dataset file or 'synthetic' (default: the checkpoint's dataset)")
    quality.add_argument("--quality-users", type=int, default=1000, help="first users of the split (0: all)")
    quality.add_argument("--quality-split", choices=["valid", "test"], default="test")
    return parser


def cmd_bench_inference(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cuda" if d == "auto" and torch.cuda.is_available() else ("cpu" if d == "auto" else d)
               for d in args.device]
    if args.quality is not None:
        try:
            run_quality(args.quality, args.out, data=args.quality_data, device=devices[0],
                        steps=args.steps or (1, 10, 100, 1000), split=args.quality_split,
                        alg2_seeds=args.alg2_seeds, max_users=args.quality_users or None, quiet=args.quiet)
        except (CheckpointError, ValueError) as error:
            print(f"bench_inference.py: error: {error}", file=sys.stderr)
            return 2
        return 0
    sweep = default_sweep(devices[0])
    for name in ("steps", "catalog_sizes", "batch_sizes", "alg2_batch_sizes", "alg2_catalog_sizes", "engines",
                 "max_seconds"):
        value = getattr(args, name)
        if value is not None:
            sweep[name] = tuple(value) if isinstance(value, (list, tuple)) else value
    if args.alg2_catalog_sizes is None and args.catalog_sizes is not None:
        sweep["alg2_catalog_sizes"] = (max(args.catalog_sizes),)
    if args.alg2_batch_sizes is None and args.batch_sizes is not None and sweep["alg2_batch_sizes"] is not None:
        sweep["alg2_batch_sizes"] = tuple(args.batch_sizes)
    print(f"sweep: devices {devices}, " + ", ".join(f"{k} {v}" for k, v in sweep.items()), file=sys.stderr)
    try:
        run_benchmark(devices=tuple(devices), out_dir=args.out, seeds=args.seeds, alg2_seeds=args.alg2_seeds,
                      dim=args.dim, max_len=args.max_len, layers=args.layers, heads=args.heads,
                      num_steps=args.num_steps, k=args.k, min_seconds=args.min_seconds, max_repeats=args.max_repeats,
                      quiet=args.quiet, **sweep)
    except ValueError as error:
        print(f"bench_inference.py: error: {error}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    return cmd_bench_inference(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
