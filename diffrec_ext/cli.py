"""Command line: `diffrec <command>` or `python -m diffrec_ext <command>`.

    demo       train and evaluate DiffRec and the SASRec baseline on the built-in synthetic data
    prepare    read and preprocess an interaction file, print its statistics, write it processed
    download   fetch a MovieLens dataset
    train      train a model on any dataset file (every config option is a flag)
    evaluate   evaluate a checkpoint on a dataset split (full ranking, HR/NDCG@5/10/20)
    recommend  top-k for a user of a dataset or for a given history of original item ids
    score      top-k for every user of a dataset or every history of a file, into Parquet or CSV parts
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import json
import math
import os
import sys
import time
import typing
from pathlib import Path

import numpy as np
import torch

from . import scoring, serve
from ._version import __version__
from . import download as dl
from .checkpoint import CONFIG_FILE, ITEMS_FILE, MODEL_FILE, atomic_write_bytes, resolve
from .config import BF16_SETTINGS, IMPORTANCE_LOSSES, LR_SCHEDULES, METHODS, TrainConfig, bf16_enabled, resolve_device
from .data import TRAIN_MODES, detect_format, load_dataset
from .distributed import exit_without_teardown, init_process_group_from_env
from .engine import InferenceEngine
from .errors import CheckpointError, ConfigError, DataFormatError
from .metrics import format_table
from .model import MODEL_KINDS, STEP_EMBEDDINGS
from .recommender import Recommender
from .schedules import SCHEDULES
from .synthetic import synthetic_dataset
from .train import evaluate, popularity_metrics, train

DEMO_DEFAULTS = dict(
    dim=64, layers=2, heads=2, max_len=20, dropout=0.1, attn_dropout=0.0, mode="window",
    batch_size=256, lr=1e-3, num_samples=10, num_steps=1000, schedule="sqrt", epochs=5,
)
DEMO_SASREC_EPOCHS = 5
SYNTHETIC = "synthetic"


class CLIError(Exception):
    """A user error: printed as `diffrec <command>: error: ...`, exit status 2."""


def _int_at_least(minimum: int, meaning: str):
    """argparse type: an int >= minimum (argparse names the flag in its error message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {meaning}, got {value}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


# --------------------------------------------------------------------------------------------------
# shared argument groups


THREADS_HELP = "torch CPU threads (0 = the cores this process may use, divided among torchrun's local processes)"


def _set_threads(threads: int) -> None:
    """torch's intra-op threads: `threads`, or with 0 the cores this process may run on divided by
    the processes torchrun started on this node (torchrun's own default is 1 thread each, which
    leaves cores idle when there are fewer processes than cores)."""

    if not threads:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        threads = max(1, cores // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    torch.set_num_threads(threads)


def _add_data_args(parser, required: bool = False, default_help: str = ""):
    group = parser.add_argument_group("data")
    group.add_argument("--data", required=required, metavar="PATH",
                       help=f"interaction file (sequence lines `user item ...`, MovieLens ratings, RecBole .inter, "
                            f"CSV, Parquet; .gz ok), or '{SYNTHETIC}' for the built-in synthetic data{default_help}")
    group.add_argument("--format", default="auto", choices=["auto", "sequence", "movielens", "recbole", "csv", "parquet"],
                       help="file format (default: detect from the name and first line)")
    group.add_argument("--k-core", type=int, default=None, metavar="K",
                       help="iterative k-core filter: users and items keep >= K interactions (default 5)")
    group.add_argument("--item-k-core", type=int, default=None, metavar="K",
                       help="a separate threshold for items (default: --k-core); 0 keeps every item, which "
                            "reproduces the paper's ML-1M statistics (3,706 items, 1,000,209 actions)")
    group.add_argument("--min-rating", type=float, default=None, metavar="R",
                       help="keep only interactions with rating >= R (default: all, implicit feedback)")
    group.add_argument("--user-col", default=None, help="CSV/Parquet user column (default 'user')")
    group.add_argument("--item-col", default=None, help="CSV/Parquet item column (default 'item')")
    group.add_argument("--time-col", default=None, help="CSV/Parquet timestamp column (default 'timestamp')")
    group.add_argument("--synthetic-seed", type=int, default=None, help="seed of the synthetic data (default 0)")


def _data_spec(args, stored: dict | None = None) -> dict:
    """How to load the dataset: from the flags, falling back on a checkpoint's stored spec."""
    stored = dict(stored or {})
    spec = {
        "path": args.data if args.data is not None else stored.get("path"),
        "format": args.format if args.format != "auto" or args.data is not None else stored.get("format", "auto"),
        "k_core": args.k_core if args.k_core is not None else stored.get("k_core", 5),
        "item_k_core": args.item_k_core if args.item_k_core is not None else stored.get("item_k_core"),
        "min_rating": args.min_rating if args.min_rating is not None else stored.get("min_rating"),
        "columns": {k: v for k, v in (("user_col", args.user_col), ("item_col", args.item_col),
                                      ("time_col", args.time_col)) if v is not None} or stored.get("columns", {}),
        "synthetic_seed": args.synthetic_seed if args.synthetic_seed is not None else stored.get("synthetic_seed", 0),
    }
    if spec["path"] is None:
        raise CLIError("no dataset: pass --data PATH (or --data synthetic)")
    if spec["path"] != SYNTHETIC:
        spec["path"] = str(Path(spec["path"]).expanduser().resolve())
    if not isinstance(spec["k_core"], int) or spec["k_core"] < 1:
        raise CLIError(f"--k-core must be a positive integer, got {spec['k_core']!r}")
    if spec["item_k_core"] is not None and (not isinstance(spec["item_k_core"], int) or spec["item_k_core"] < 0):
        raise CLIError(f"--item-k-core must be a non-negative integer, got {spec['item_k_core']!r}")
    if spec["min_rating"] is not None and not math.isfinite(spec["min_rating"]):
        raise CLIError(f"--min-rating must be a finite number, got {spec['min_rating']!r}")
    return spec


def _load_dataset(spec: dict):
    if spec["path"] == SYNTHETIC:
        return synthetic_dataset(seed=spec["synthetic_seed"], k_core=spec["k_core"],
                                 item_k_core=spec.get("item_k_core"))
    path = Path(spec["path"])
    if path.is_dir():
        raise CLIError(f"data file {path} is a directory, not a file")
    if not path.is_file():
        raise CLIError(f"data file {path} does not exist")
    options = dict(spec.get("columns") or {})
    fmt = spec.get("format", "auto")
    if options and fmt not in ("csv", "parquet"):
        if (fmt if fmt != "auto" else detect_format(path)) not in ("csv", "parquet"):
            raise CLIError("--user-col/--item-col/--time-col apply to CSV and Parquet files only")
    try:
        return load_dataset(path, fmt, k_core=spec["k_core"], item_k_core=spec.get("item_k_core"),
                            min_rating=spec.get("min_rating"), **options)
    except (DataFormatError, ValueError, KeyError, ImportError) as error:  # ImportError: no Parquet engine
        raise CLIError(str(error)) from None


def _add_eval_args(parser):
    """The engine's options under the engine's names; --seeds and --method, the old names, still work."""
    group = parser.add_argument_group("inference")
    group.add_argument("--num-samples", "--seeds", dest="num_samples", type=_positive_int, default=None,
                       help="S: noise draws averaged per user (default: the checkpoint's; --seeds: the old name)")
    group.add_argument("--algorithm", "--method", dest="algorithm", choices=["alg3", "alg2"], default=None,
                       help="alg3: one pass from step N per draw (default); alg2: the full reverse process "
                            "(--method: the old name)")
    group.add_argument("--stride", type=_positive_int, default=1, help="alg2: visit every stride-th step (default 1: all N)")
    group.add_argument("--exclude-seen", action=argparse.BooleanOptionalAction, default=None,
                       help="remove each user's history from the ranking (default: the checkpoint's setting)")
    group.add_argument("--seed", type=int, default=None,
                       help="seed of the inference noise (default: the checkpoint's training seed, with which the "
                            "run's result.json was evaluated)")
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    group.add_argument("--batch-size", type=_positive_int, default=None,
                       help="users per evaluation batch; each batch draws its own noise (default: the checkpoint's "
                            "eval_batch_size)")


CONFIG_CHOICES: dict = {}
CONFIG_ALIASES = {"num_samples": ("--seeds",)}  # old flag names that still work
CONFIG_HELP = {
    "kind": "diffrec, or sasrec: the same backbone without diffusion (clean [unk] slot, no step embedding, no MSE)",
    "dim": "hidden size d", "layers": "Transformer layers", "heads": "attention heads",
    "dropout": "dropout on embeddings, residuals and the FFN",
    "ffn_mult": "feed-forward width = ffn_mult * dim",
    "attn_dropout": "dropout on attention weights (default: --dropout)",
    "emb_scale": "embedding tables start at std 1/emb_scale",
    "norm_embeddings": "item vectors on the sphere of radius sqrt(dim) (stops the norm-growth shortcut)",
    "max_len": "T: T-1 history items plus the target slot",
    "causal": "causal attention (needed by --mode window and user)",
    "schedule": "noise schedule", "num_steps": "N diffusion steps",
    "noised_positions": "K: noise the last K positions (1 = the target only, the paper)",
    "input_scale": "diffuse input_scale * h0: lowers every step's signal-to-noise ratio (1 = the paper)",
    "add_position": "add the position embedding", "add_step": "add the sinusoidal step embedding",
    "mse_weight": "weight of the MSE term of Eq. 18",
    "importance_sampling": "importance-sample steps by sqrt(E[L_n^2]) (else uniform)",
    "importance_loss": "the loss p_n follows: mse = L_n (Eq. 18) or total = L_n + L_rec (focuses training on "
                       "the high-noise steps that inference uses)",
    "num_samples": "S: noise draws averaged per user at inference (Alg. 3; --seeds: the old name)",
    "inference": "alg3 (one pass per seed) or alg2 (reverse process) for validation and test",
    "eval_exclude_seen": "remove each user's history from the ranking in evaluation",
    "eval_batch_size": "users per evaluation batch", "lr": "Adam learning rate",
    "lr_schedule": "constant, or cosine: annealed per batch to 0 at the end of --epochs",
    "weight_decay": "Adam weight decay",
    "batch_size": "training batch size", "epochs": "epochs",
    "mode": "window: every training target once per epoch, windows of max_len items supervised in one pass; "
            "prefix: every prefix is an example (the paper); user: one window per user, every position supervised",
    "window_stride": "window mode: items between window starts, in [1, max_len - 1] (0 = max_len // 2)",
    "tie_output": "item layer W = the item embeddings (as SASRec) instead of its own matrix",
    "step_embedding": "where the step embedding z_n goes: all positions (Eq. 14), the noised target only, or "
                      "auto (target for window/user mode, all for prefix)",
    "samples_per_epoch": "prefix mode: prefixes drawn per epoch (0 = all)",
    "patience": "early stopping after this many epochs without a better valid NDCG@10 (0 = off)",
    "grad_clip": "max gradient norm (0 = off)", "seed": "random seed", "device": "auto, cpu, cuda or cuda:N",
    "bf16": "bf16 autocast of the forward passes, float32 master weights: auto (on CUDA only), on or off",
}


def _config_choices() -> dict:
    return {"kind": MODEL_KINDS, "mode": TRAIN_MODES, "schedule": SCHEDULES, "inference": METHODS,
            "importance_loss": IMPORTANCE_LOSSES, "step_embedding": ("auto",) + STEP_EMBEDDINGS,
            "bf16": BF16_SETTINGS, "lr_schedule": LR_SCHEDULES}


def _add_config_args(parser, defaults: dict | None = None):
    global CONFIG_CHOICES
    CONFIG_CHOICES = _config_choices()
    defaults = defaults or {}
    group = parser.add_argument_group("model and training (TrainConfig)")
    group.add_argument("--config", metavar="JSON", help="a JSON file of config values (flags override it)")
    hints = typing.get_type_hints(TrainConfig)
    for field in dataclasses.fields(TrainConfig):
        flags = ["--" + field.name.replace("_", "-"), *CONFIG_ALIASES.get(field.name, ())]
        default = defaults.get(field.name, field.default)
        hint = hints[field.name]
        text = CONFIG_HELP.get(field.name, field.name)
        if hint is bool:
            group.add_argument(*flags, dest=field.name, action=argparse.BooleanOptionalAction, default=None,
                               help=f"{text} (default {default})")
            continue
        args = typing.get_args(hint)
        kind = hint if hint in (int, float, str) else next((a for a in args if a in (int, float, str)), str)
        choices = CONFIG_CHOICES.get(field.name)
        group.add_argument(*flags, dest=field.name, type=kind, default=None, choices=choices,
                           metavar=None if choices else field.name.upper(), help=f"{text} (default {default})")


def _config_from_args(args, base: dict | None = None):
    values = dict(base or {})
    if getattr(args, "config", None):
        try:
            loaded = json.loads(Path(args.config).read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CLIError(f"cannot read --config {args.config}: {error}") from None
        if not isinstance(loaded, dict):
            raise CLIError(f"--config {args.config} must hold a JSON object")
        values.update(loaded)
    for field in dataclasses.fields(TrainConfig):
        value = getattr(args, field.name, None)
        if value is not None:
            values[field.name] = value
    try:
        return TrainConfig.from_dict(values)
    except (ConfigError, TypeError) as error:
        raise CLIError(f"invalid config: {error}") from None


def _print_table(rows: dict, title: str | None = None, out=None):
    out = out or sys.stdout
    if title:
        print(title, file=out)
    print(format_table(rows), file=out)


def _stats_line(dataset) -> str:
    s = dataset.stats
    return (f"dataset {dataset.name}: {s.num_users:,} users, {s.num_items:,} items, {s.num_actions:,} actions "
            f"(avg length {s.avg_length:.1f})")


# --------------------------------------------------------------------------------------------------
# commands


def cmd_demo(args) -> int:
    started = time.perf_counter()
    _set_threads(args.threads)
    dataset = synthetic_dataset(seed=args.synthetic_seed)
    print(_stats_line(dataset) + f"  [generated in {time.perf_counter() - started:.1f}s]")
    base = dict(DEMO_DEFAULTS, seed=args.seed, device=args.device)
    if args.epochs is not None:
        base["epochs"] = args.epochs
    out_root = Path(args.out) if args.out else None
    results, seconds = {}, {}
    for kind in ("diffrec", "sasrec"):
        config = TrainConfig(**{**base, "kind": kind,
                                "epochs": base["epochs"] if kind == "diffrec" or args.epochs is not None
                                else DEMO_SASREC_EPOCHS})
        print(f"\n== {kind}: " + ", ".join(f"{k}={getattr(config, k)}" for k in (
            "dim", "layers", "heads", "max_len", "mode", "epochs", "num_steps", "num_samples", "input_scale")))
        t0 = time.perf_counter()
        out_dir = out_root / kind if out_root else None
        results[kind] = train(config, dataset, out_dir, progress=not args.quiet,
                              log=None if args.quiet else print, extra_meta={"data": {"path": SYNTHETIC,
                                                                                       "synthetic_seed": args.synthetic_seed,
                                                                                       "k_core": 5}})
        seconds[kind] = time.perf_counter() - t0
    popularity = popularity_metrics(dataset, "test", DEMO_DEFAULTS.get("eval_exclude_seen", True))
    rows = {"popularity": popularity, "SASRec": results["sasrec"]["test"], "DiffRec": results["diffrec"]["test"]}
    print()
    _print_table(rows, f"test split ({dataset.num_users:,} users, full ranking over {dataset.num_items:,} items, "
                       f"seen items excluded; DiffRec: Alg. 3 with S = {base['num_samples']})")
    ratio = rows["DiffRec"]["NDCG@10"] / max(popularity["NDCG@10"], 1e-12)
    total = time.perf_counter() - started
    print(f"\nDiffRec NDCG@10 = {ratio:.2f} x popularity.  Time: DiffRec {seconds['diffrec']:.0f}s, "
          f"SASRec {seconds['sasrec']:.0f}s, total {total:.0f}s")
    if args.json:
        Path(args.json).write_text(json.dumps({"test": rows, "seconds": seconds, "total_seconds": total}, indent=1))
    return 0


def cmd_prepare(args) -> int:
    spec = _data_spec(args)
    dataset = _load_dataset(spec)
    print(dataset.describe())
    if not args.out:
        return 0
    out = Path(args.out)
    users = dataset.user_original_ids
    items = dataset.item_original_ids
    lines = []
    if out.name.removesuffix(".gz").endswith(".inter"):
        lines.append("user_id:token\titem_id:token\ttimestamp:float")
        for u in range(dataset.num_users):
            for position, item in enumerate(dataset.sequence(u)):
                lines.append(f"{users[u]}\t{items[item]}\t{position}")
    else:
        if not (np.issubdtype(np.asarray(users).dtype, np.integer) and np.issubdtype(items.dtype, np.integer)):
            raise CLIError("the sequence format needs integer user and item ids; write a RecBole file (name ending .inter)")
        for u in range(dataset.num_users):
            lines.append(" ".join([str(users[u])] + [str(items[i]) for i in dataset.sequence(u)]))
    data = ("\n".join(lines) + "\n").encode("utf-8")
    if out.suffix == ".gz":
        data = gzip.compress(data, mtime=0)

    atomic_write_bytes(out, data)
    print(f"wrote {out} ({dataset.num_users:,} users, {dataset.num_actions:,} interactions, chronological)")
    return 0


def cmd_download(args) -> int:
    try:
        path = dl.download(args.name, args.dest, args.base_url, md5=args.md5, force=args.force)
    except (ValueError, OSError, getattr(dl, "DownloadError", OSError)) as error:
        raise CLIError(str(error)) from None
    print(path)
    return 0


def cmd_train(args) -> int:

    config = _config_from_args(args)
    _set_threads(args.threads)
    lead = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: data-parallel training

        lead = init_process_group_from_env().rank == 0
        args.exit_without_teardown = True  # see main()
    say = print if lead else (lambda *parts, **options: None)
    spec = _data_spec(args)
    dataset = _load_dataset(spec)
    say(_stats_line(dataset))
    for note in dataset.notes:
        say(f"  {note}")
    out = Path(args.out)
    try:
        result = train(config, dataset, out, resume=args.resume, progress=not args.quiet and lead, log=say,
                       extra_meta={"data": spec})
    except (ConfigError, CheckpointError) as error:
        raise CLIError(str(error)) from None
    if lead:
        print()
        _print_table({"popularity": result["popularity"]["valid"], config.kind: result["valid"] or {}},
                     f"valid split (best epoch {result['best_epoch']})")
        _print_table({"popularity": result["popularity"]["test"], config.kind: result["test"]}, "test split")
        print(f"checkpoint: {out} (best.json -> epoch {result['best_epoch']}); log: {out / 'log.jsonl'}")
    return 0


def _device(name: str):
    try:
        return resolve_device(name)
    except (ConfigError, RuntimeError) as error:
        raise CLIError(f"--device {name!r}: {error}") from None


def _load_checkpoint(path, device):
    try:
        return Recommender.from_checkpoint(path, device=device)
    except CheckpointError as error:
        raise CLIError(str(error)) from None


def _seed(args, config) -> int:
    return config.seed if args.seed is None else args.seed


def _check_catalog(recommender, dataset):
    items = [str(dataset.item_original_ids[i]) for i in range(1, dataset.num_items + 1)]
    mine = [str(i) for i in recommender.item_ids]
    if items == mine:
        return
    if len(items) != len(mine):
        difference = f"the dataset has {len(items):,} items, the checkpoint {len(mine):,}"
    else:
        unequal = [i for i, (a, b) in enumerate(zip(items, mine)) if a != b]
        first = unequal[0]
        difference = (f"both have {len(mine):,} items, but {len(unequal):,} ids differ; the first, dense id "
                      f"{first + 1}, is {items[first]!r} in the dataset and {mine[first]!r} in the checkpoint")
    raise CLIError(f"the dataset's catalog differs from the checkpoint's ({difference}): preprocess the data the "
                   f"same way as for training")


def cmd_evaluate(args) -> int:
    device = _device(args.device)
    rec = _load_checkpoint(args.checkpoint, device)
    config = rec.config
    spec = _data_spec(args, rec.meta.get("data"))
    dataset = _load_dataset(spec)
    print(_stats_line(dataset))
    _check_catalog(rec, dataset)
    exclude = config.eval_exclude_seen if args.exclude_seen is None else args.exclude_seen
    num_samples = args.num_samples or config.num_samples
    algorithm = args.algorithm or config.inference
    bf16 = bf16_enabled(config.bf16, device)  # as training evaluated, so the run's numbers are reproduced
    splits = ["valid", "test"] if args.split == "both" else [args.split]
    report = {}
    for split in splits:
        t0 = time.perf_counter()
        try:
            metrics = evaluate(rec.model, dataset, split, num_samples=num_samples, algorithm=algorithm,
                               exclude_seen=exclude,
                               seed=_seed(args, config), stride=args.stride,
                               batch_size=args.batch_size or config.eval_batch_size, bf16=bf16,
                               progress=not args.quiet)
        except ValueError as error:
            raise CLIError(str(error)) from None
        report[split] = {"popularity": popularity_metrics(dataset, split, exclude), config.kind: metrics,
                         "seconds": time.perf_counter() - t0}
        _print_table({k: v for k, v in report[split].items() if k != "seconds"},
                     f"{split} split ({algorithm}, S = {num_samples if config.kind == 'diffrec' else 1}, "
                     f"{'seen items excluded' if exclude else 'seen items ranked'}{', bf16' if bf16 else ''}; "
                     f"{report[split]['seconds']:.1f}s)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


def read_titles(path) -> dict:
    """Item titles from a metadata file: MovieLens movies.dat (`MovieID::Title::Genres`, latin-1),
    movies.csv (`movieId,title,genres`), or any `id<TAB>title...` file. Keys are ints where the id is
    numeric, else strings."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise CLIError(f"cannot read --items {path}: {error.strerror or error}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("latin-1")
    titles = {}

    def key(value: str):
        value = value.strip()
        return int(value) if value.lstrip("-").isdigit() else value

    if path.suffix.lower() == ".csv":
        reader = csv.reader(text.splitlines())
        next(reader, None)  # the header row
        for row in reader:
            if len(row) >= 2:
                titles[key(row[0])] = row[1]
        return titles
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split("::") if "::" in line else line.split("\t")
        if len(parts) < 2:
            raise CLIError(f"{path}, line {number}: expected 'id::title[::...]' or 'id<TAB>title'")
        titles[key(parts[0])] = parts[1]
    return titles


def cmd_recommend(args) -> int:
    device = _device(args.device)
    rec = _load_checkpoint(args.checkpoint, device)
    config = rec.config
    if (args.user is None) == (args.history is None):
        raise CLIError("give exactly one of --user (with the dataset) or --history")
    titles = read_titles(args.items) if args.items else None
    if args.user is not None:
        spec = _data_spec(args, rec.meta.get("data"))
        dataset = _load_dataset(spec)
        _check_catalog(rec, dataset)
        user_key = int(args.user) if args.user.lstrip("-").isdigit() else args.user
        try:
            index = int(dataset.dense_users([user_key])[0])
        except KeyError:
            try:
                index = int(dataset.dense_users([args.user])[0])
            except KeyError:
                raise CLIError(f"user {args.user} is not in the dataset") from None
        dense = [int(i) for i in dataset.sequence(index)]
        subject = f"user {args.user} ({len(dense)} interactions)"
    else:
        dense, unknown = rec.to_dense([int(h) if h.lstrip("-").isdigit() else h for h in args.history])
        if unknown and not args.skip_unknown:  # the same rule as the engine and serve: an error
            raise CLIError(f"--history has {len(unknown)} item id(s) the model does not know: {unknown[:10]} "
                           "(--skip-unknown ranks with the others)")
        if unknown:
            print(f"skipping {len(unknown)} item ids unknown to the model: {unknown[:10]}", file=sys.stderr)
        if not dense:
            print("warning: empty history: the ranking is the model's prior", file=sys.stderr)
        subject = f"a history of {len(dense)} items"
    exclude = not args.include_seen
    try:
        rows = rec.recommend_dense([dense], k=args.k, exclude_seen=exclude, titles=titles,
                                   num_samples=args.num_samples or config.num_samples,
                                   algorithm=args.algorithm or config.inference, seed=_seed(args, config),
                                   stride=args.stride)[0]
    except ValueError as error:
        raise CLIError(str(error)) from None
    if args.json:
        print(json.dumps([{"item": r.item, "score": r.score, **({"title": r.title} if titles else {})} for r in rows]))
        return 0
    last = [rec.item_ids[i - 1] for i in dense[-3:]]
    if titles:
        last = [f"{item} {titles.get(item, titles.get(str(item), ''))}".strip() for item in last]
    print(f"top-{args.k} for {subject}; most recent: {', '.join(map(str, last)) or '-'}")
    width = max(len(str(r.item)) for r in rows)
    for rank, r in enumerate(rows, start=1):
        title = f"  {r.title}" if r.title else ""
        print(f"{rank:3d}. {str(r.item):>{width}}  {r.score:.5f}{title}")
    return 0


def cmd_score(args) -> int:

    _set_threads(args.threads)
    device = _device(args.device)
    lead = True
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: each process scores its share

        context = init_process_group_from_env("nccl" if device.type == "cuda" else "gloo")
        device, lead = context.device, context.rank == 0
        args.exit_without_teardown = True  # see main()
    say = print if lead else (lambda *parts, **options: None)
    try:
        batch = {} if args.batch_size is None else {"batch_size": args.batch_size}  # else the engine's default
        engine = InferenceEngine.from_checkpoint(args.checkpoint, device=device, **batch)
        directory = resolve(args.checkpoint)
    except CheckpointError as error:
        raise CLIError(str(error)) from None
    identity = {"checkpoint": {name: scoring.file_fingerprint(directory / name)["sha256"]
                               for name in (MODEL_FILE, ITEMS_FILE, CONFIG_FILE)}}
    sources = {"checkpoint": str(directory.resolve())}
    try:
        if args.histories is not None:
            if args.data is not None:
                raise CLIError("give --data or --histories, not both")
            source = scoring.HistoryFile(args.histories, args.histories_format, args.user_field, args.history_field)
            sources["histories"] = str(source.path.resolve())
        else:
            spec = _data_spec(args, engine.meta.get("data"))
            dataset = _load_dataset(spec)
            say(_stats_line(dataset))
            _check_catalog(engine, dataset)
            fingerprint = {"data": {**spec, "path": Path(spec["path"]).name}}
            if spec["path"] != SYNTHETIC:
                fingerprint.update(scoring.file_fingerprint(spec["path"]))
            source = scoring.DatasetUsers(dataset, fingerprint)
            sources["data"] = spec["path"]
        output_format = args.out_format
        if output_format == "auto":
            output_format = "csv" if Path(args.out).name.lower().endswith(".csv") else "parquet"
        report = scoring.score(
            engine, source, args.out, k=args.k, exclude_seen=True if args.exclude_seen is None else args.exclude_seen,
            num_samples=args.num_samples, algorithm=args.algorithm, stride=args.stride, seed=_seed(args, engine.config),
            chunk_users=args.chunk_users,
            output_format=output_format, identity=identity, sources=sources, progress=not args.quiet)
    except (scoring.ScoringError, DataFormatError, ValueError) as error:
        raise CLIError(str(error)) from None
    if report.already_complete:
        say(f"{report.out} is complete already ({report.users:,} users, {report.rows:,} rows in {report.parts} "
            f"part files): nothing to do")
        return 0
    rate = f"{report.users_per_second:,.0f} users/s" if report.scored else "nothing left to score"
    say(f"scored {report.scored:,} users in {report.seconds:.1f} s ({rate}; {report.processes} process"
        f"{'es' if report.processes > 1 else ''}; {report.resumed:,} done by an earlier run); {report.out}: "
        f"{report.rows:,} rows in {report.parts} part files, manifest {scoring.MANIFEST}")
    return 0


# --------------------------------------------------------------------------------------------------
# parser


def _add_demo_command(sub) -> None:
    demo = sub.add_parser("demo", help="train and evaluate DiffRec and SASRec on the built-in synthetic data",
                          description="Generate the built-in synthetic dataset (planted sequential structure), train "
                                      "DiffRec and the SASRec baseline with small CPU-friendly settings, and print "
                                      "test HR/NDCG@5/10/20 beside the popularity ranking. Demo settings: "
                                      + ", ".join(f"{k}={v}" for k, v in DEMO_DEFAULTS.items()) + ".")
    demo.add_argument("--epochs", type=_positive_int, default=None, help="epochs for both models (default: "
                      f"{DEMO_DEFAULTS['epochs']} DiffRec, {DEMO_SASREC_EPOCHS} SASRec)")
    demo.add_argument("--seed", type=int, default=42, help="training seed")
    demo.add_argument("--synthetic-seed", type=int, default=0, help="seed of the synthetic data")
    demo.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    demo.add_argument("--out", default=None, help="keep the two runs (checkpoints, logs) under this directory")
    demo.add_argument("--threads", type=_non_negative_int, default=0, help=THREADS_HELP)
    demo.add_argument("--json", default=None, metavar="PATH", help="also write the table as JSON")
    demo.add_argument("--quiet", action="store_true", help="no per-epoch output or progress bars")
    demo.set_defaults(func=cmd_demo)


def _add_prepare_command(sub) -> None:
    prepare = sub.add_parser("prepare", help="read and preprocess an interaction file, print its statistics",
                             description="Read any supported file, apply the paper's preprocessing (implicit "
                                         "feedback, k-core, chronological order), print the statistics, and "
                                         "optionally write the result: per-user sequence lines `user item ...` "
                                         "(oldest first, original ids; .gz to compress) or a RecBole .inter file.",
                             formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prepare.add_argument("input", nargs="?", default=None, help="the interaction file (same as --data)")
    _add_data_args(prepare)
    prepare.add_argument("--out", default=None, help="write the processed dataset here (.txt, .txt.gz or .inter)")
    prepare.set_defaults(func=cmd_prepare)


def _add_download_command(sub) -> None:
    download = sub.add_parser("download", help="download a MovieLens dataset",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter,
                              description="Download and unpack a MovieLens dataset (checksum verified); prints the "
                                          "path of its ratings file, ready for `diffrec train --data`.")
    download.add_argument("name", help="ml-100k, ml-1m, ml-10m, ml-20m or ml-25m")
    download.add_argument("--dest", default="data", help="destination directory")
    download.add_argument("--base-url", default=None, help="mirror holding the archives (default: GroupLens)")
    download.add_argument("--md5", default=None, help="expected MD5 of the archive")
    download.add_argument("--force", action="store_true", help="download again even if present")
    download.set_defaults(func=cmd_download)


def _add_train_command(sub) -> None:
    train = sub.add_parser("train", help="train DiffRec or the SASRec baseline on a dataset file",
                           description="Alg. 1: Adam, validation NDCG@10 after every epoch, the best checkpoint "
                                       "tested at the end. Writes epoch checkpoints (safetensors + JSON), "
                                       "best.json/last.json pointers, log.jsonl (one line per epoch) and "
                                       "result.json into --out; --resume continues an interrupted run. Under "
                                       "torchrun (`torchrun --nproc_per_node=P -m diffrec_ext train ...`) it "
                                       "trains data-parallel: --batch-size is the combined batch of the P "
                                       "processes, rank 0 writes --out.")
    _add_data_args(train, required=True)
    train.add_argument("--out", required=True, help="run directory")
    train.add_argument("--resume", action="store_true", help="continue the run in --out from its last epoch")
    train.add_argument("--threads", type=_non_negative_int, default=0, help=THREADS_HELP)
    train.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_config_args(train)
    train.set_defaults(func=cmd_train)


def _add_evaluate_command(sub) -> None:
    evaluate = sub.add_parser("evaluate", help="evaluate a checkpoint on a dataset split",
                              description="Full-ranking HR/NDCG@5/10/20 of a checkpoint (a run directory uses its "
                                          "best.json) on the valid or test split, beside the popularity ranking. "
                                          "The dataset defaults to the one the checkpoint was trained on.")
    evaluate.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    evaluate.add_argument("--split", choices=["valid", "test", "both"], default="test", help="split (default test)")
    evaluate.add_argument("--json", default=None, metavar="PATH", help="also write the metrics as JSON")
    evaluate.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_data_args(evaluate, default_help=" (default: the checkpoint's dataset)")
    _add_eval_args(evaluate)
    evaluate.set_defaults(func=cmd_evaluate)


def _add_recommend_command(sub) -> None:
    recommend = sub.add_parser("recommend", help="top-k items for a user or a history",
                               description="Top-k recommendations in original item ids, for a user of a dataset "
                                           "(their whole sequence is the history) or for --history item ids.")
    recommend.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    recommend.add_argument("--user", default=None, help="original user id (with the dataset: --data or the checkpoint's)")
    recommend.add_argument("--history", nargs="+", default=None, metavar="ITEM",
                           help="original item ids, oldest first")
    recommend.add_argument("--skip-unknown", action="store_true",
                           help="leave out --history ids the model does not know (said on stderr) instead of failing")
    recommend.add_argument("-k", "--k", type=int, default=10, help="number of items (default 10)")
    recommend.add_argument("--items", default=None, metavar="PATH",
                           help="item metadata for titles, e.g. MovieLens movies.dat (MovieID::Title::Genres)")
    recommend.add_argument("--include-seen", action="store_true", help="allow items already in the history")
    recommend.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_data_args(recommend, default_help=" (default: the checkpoint's dataset)")
    _add_eval_args(recommend)
    recommend.set_defaults(func=cmd_recommend)


def _add_score_command(sub) -> None:
    score = sub.add_parser(
        "score", help="top-k for every user of a dataset or every history of a file, into Parquet or CSV",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Top-k recommendations for every user of a dataset (--data, default: the checkpoint's; each "
                    "user's whole sequence is the history) or every history of a file (--histories: JSON lines "
                    "{\"user\": ..., \"history\": [...]}, Parquet with a list column, or CSV with the history "
                    "as space-separated item ids), through the inference engine in chunks. --out is a directory of "
                    "part files (rows user, rank, item, score in original ids) plus _manifest.json. A killed run "
                    "continues where it stopped when run again with the same options; under torchrun "
                    "(`torchrun --nproc_per_node=P -m diffrec_ext score ...`) the chunks are shared across the "
                    "processes. Rows depend only on the input, the options, --chunk-users and --seed.")
    score.add_argument("--checkpoint", required=True, help="run directory or checkpoint directory")
    score.add_argument("--histories", default=None, metavar="PATH",
                       help="score the histories of this file instead of a dataset's users")
    score.add_argument("--histories-format", default="auto", choices=["auto", *scoring.HISTORY_FORMATS],
                       help="format of --histories (auto: from the name)")
    score.add_argument("--user-field", default="user", help="--histories: the user field or column")
    score.add_argument("--history-field", default="history", help="--histories: the history field or column")
    score.add_argument("--out", required=True, help="output directory (e.g. recs.parquet)")
    score.add_argument("--out-format", default="auto", choices=["auto", "parquet", "csv"],
                       help="part file format (auto: csv when --out ends in .csv, else parquet)")
    score.add_argument("-k", "--k", type=_positive_int, default=10, help="items per user")
    score.add_argument("--chunk-users", type=_positive_int, default=8192,
                       help="users per chunk: one engine call and one part file each")
    score.add_argument("--threads", type=_non_negative_int, default=0, help=THREADS_HELP)
    score.add_argument("--quiet", action="store_true", help="no progress bar")
    _add_data_args(score, default_help=" (default: the checkpoint's dataset)")
    _add_eval_args(score)
    score.set_defaults(func=cmd_score)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffrec", description="DiffRec (Du et al. 2023, sequential "
                                     "recommendation with diffusion models) with fused C++/CUDA ops: train, "
                                     "evaluate and serve next-item recommenders.",
                                     epilog="Run `diffrec <command> --help` for the options of a command.")

    parser.add_argument("--version", action="version", version=f"diffrec-ext {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="command")
    sub.required = True

    _add_demo_command(sub)
    _add_prepare_command(sub)
    _add_download_command(sub)
    _add_train_command(sub)
    _add_evaluate_command(sub)
    _add_recommend_command(sub)
    _add_score_command(sub)

    serve.add_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "command", None) == "prepare":
        if args.input and args.data and args.input != args.data:
            parser.error("give the input file once (positional or --data)")
        args.data = args.input or args.data
    try:
        code = args.func(args)
    except CLIError as error:
        print(f"diffrec {args.command}: error: {error}", file=sys.stderr)
        code = 2
    except OSError as error:  # a file or directory that cannot be read or written: no traceback
        print(f"diffrec {args.command}: error: {error}", file=sys.stderr)
        code = 1
    except KeyboardInterrupt:
        print(f"diffrec {args.command}: interrupted", file=sys.stderr)
        code = 130
    if getattr(args, "exit_without_teardown", False):  # a torchrun worker: see distributed.exit_without_teardown

        exit_without_teardown(code)
    return code


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
