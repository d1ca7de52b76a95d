"""Training (Alg. 1), evaluation and the SASRec baseline under one protocol.

Loss of DiffRec for a batch (Eq. 18), one importance-sampled step n per sequence:

    L = mse_weight * mean_b[ L_n(b) / (N p_n(b)) ] + mean_b[ L_rec(b) ]

- L_n = mean over the d dimensions of (f_theta(h_n_T, n) - sg(h0_T))^2, with the gradient stopped
  through the clean target embedding h0_T = E[v_T] (sg): left trainable and summed over d, the
  item embeddings collapse (GUIDE, "measured pitfall").
- 1 / (N p_n): E_{n~p}[L_n / p_n] is an unbiased estimate of the SUM of L_n over the N steps;
  dividing by N gives the scale of the uniform-sampling MEAN, so the MSE term has the same weight
  during the uniform warm-up (where the factor is exactly 1) and after it.
- L_rec = -log softmax(W f_theta + b)[v_T], the catalog cross-entropy (ops.catalog_xent).
- The sampler (sampler.py) records L_n of every sequence for its step (importance_loss="mse", the
  paper). With importance_loss="total" it records L_n + L_rec instead, an option beyond the paper:
  with unit-scale item vectors the noised target stays readable for roughly the first half of the
  sqrt schedule, so L_rec there is learned by copying the slot, while L_n saturates near 1 for
  every high-noise step and hardly steers p_n; L_rec ranges from ~0.5 (n small) to ~log V (n = N)
  and moves the sampling mass to the steps whose prediction inference (Alg. 3, n = N) relies on.
  The MSE weight 1 / (N p_n) keeps the MSE term an unbiased estimate of the mean over steps either
  way; L_rec, outside the expectation in Eq. 18, is then averaged over the sampled steps.

SASRec ("diffrec with diffusion switched off"): the same DSR with the clean [unk] token in the
target slot, no noise, no step embedding, no MSE term, only L_rec.

Training modes:
- "prefix" (the paper): every prefix of every training sequence is one example,
  [history (last T - 1 items), target]; `samples_per_epoch` > 0 draws that many prefixes per epoch.
- "user": one window of the last T items of each user's training part, every position supervised
  in one pass (the two-stream form of model.DSR.forward_two_stream; one step n per window; the
  window's L_n recorded by the sampler is the mean over its positions).

Validation NDCG@10 after every epoch picks the best checkpoint, which is tested at the end. Each
epoch appends a JSON line to <out_dir>/log.jsonl. `train(..., resume=True)` continues from the last
completed epoch and gives the same result as an uninterrupted run (model, optimizer, sampler and
RNG states are restored).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint as ckpt
from . import ops
from .data import SequenceDataset, evaluation_batch, item_popularity, training_sequences
from .inference import METHODS, target_ranks
from .metrics import KS, popularity_ranks, ranking_metrics
from .model import DSR, MODEL_KINDS
from .sampler import LossSecondMomentSampler
from .schedules import MAX_STEPS, SCHEDULES

TRAIN_MODES = ("prefix", "user")
IMPORTANCE_LOSSES = ("mse", "total")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # model
    kind: str = "diffrec"  # "diffrec" | "sasrec"
    dim: int = 256
    layers: int = 2
    heads: int = 2
    dropout: float = 0.2
    ffn_mult: int = 4
    attn_dropout: float | None = None  # dropout on attention weights; None = dropout
    emb_scale: float = 50.0  # stored embedding tables start at std 1 / emb_scale (see model.DSR)
    norm_embeddings: bool = True  # item vectors on the sphere of radius sqrt(dim) (see model.DSR.item_vectors)
    max_len: int = 50  # T: T - 1 history items + the target slot
    causal: bool = True
    # diffusion
    schedule: str = "sqrt"
    num_steps: int = 1000  # N
    noised_positions: int = 1  # K: noise the last K positions (1 = target only, the paper)
    input_scale: float = 1.0  # the forward process runs on input_scale * h0 (1 = the paper; see model.DSR)
    add_position: bool = True
    add_step: bool = True
    mse_weight: float = 1.0
    importance_sampling: bool = True  # False: uniform steps
    importance_loss: str = "mse"  # what p_n follows: "mse" = L_n (Eq. 18), "total" = L_n + L_rec
    # inference / evaluation
    seeds: int = 10  # S of Alg. 3
    inference: str = "alg3"  # "alg3" | "alg2"
    eval_exclude_seen: bool = True
    eval_batch_size: int = 256
    # optimisation
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 50
    mode: str = "prefix"  # "prefix" | "user"
    samples_per_epoch: int = 0  # prefix mode: 0 = every prefix each epoch
    patience: int = 0  # early stopping after this many epochs without a better valid NDCG@10; 0 = off
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    seed: int = 42
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"

    # fields that may change when a run is resumed
    RESUMABLE_CHANGES = ("epochs", "patience", "device", "eval_batch_size")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"config must be a mapping, got {type(values).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        config = cls(**values)
        config.validate()
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def validate(self) -> "TrainConfig":
        def need(name, kind, low=None, high=None, choices=None):
            value = getattr(self, name)
            if kind is bool:
                ok = isinstance(value, bool)
            elif kind is int:
                ok = isinstance(value, (int, np.integer)) and not isinstance(value, bool)
            elif kind is float:
                ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
                ok = ok and math.isfinite(float(value))
            else:
                ok = isinstance(value, kind)
            if not ok:
                raise ConfigError(f"{name} must be {kind.__name__}, got {value!r} ({type(value).__name__})")
            if choices is not None and value not in choices:
                raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
            if low is not None and value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value!r}")
            if high is not None and value > high:
                raise ConfigError(f"{name} must be <= {high}, got {value!r}")

        need("kind", str, choices=MODEL_KINDS)
        need("dim", int, 1)
        need("layers", int, 0)
        need("heads", int, 1)
        need("dropout", float, 0.0)
        if self.dropout >= 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout!r}")
        need("ffn_mult", int, 1)
        if self.attn_dropout is not None:
            need("attn_dropout", float, 0.0)
            if self.attn_dropout >= 1.0:
                raise ConfigError(f"attn_dropout must be in [0, 1), got {self.attn_dropout!r}")
        need("max_len", int, 2)
        need("emb_scale", float)
        if not self.emb_scale > 0:
            raise ConfigError(f"emb_scale must be > 0, got {self.emb_scale!r}")
        need("norm_embeddings", bool)
        need("causal", bool)
        need("schedule", str, choices=SCHEDULES)
        need("num_steps", int, 1, MAX_STEPS)
        need("noised_positions", int, 1, self.max_len)
        need("input_scale", float)
        if not self.input_scale > 0:
            raise ConfigError(f"input_scale must be > 0, got {self.input_scale!r}")
        need("add_position", bool)
        need("add_step", bool)
        need("mse_weight", float, 0.0)
        need("importance_sampling", bool)
        need("importance_loss", str, choices=IMPORTANCE_LOSSES)
        need("seeds", int, 1)
        need("inference", str, choices=METHODS)
        need("eval_exclude_seen", bool)
        need("eval_batch_size", int, 1)
        need("lr", float)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        need("weight_decay", float, 0.0)
        need("batch_size", int, 1)
        need("epochs", int, 1)
        need("mode", str, choices=TRAIN_MODES)
        need("samples_per_epoch", int, 0)
        need("patience", int, 0)
        need("grad_clip", float, 0.0)
        need("seed", int, 0, 2**63 - 1)
        need("device", str)
        if self.dim % self.heads != 0:
            raise ConfigError(f"dim = {self.dim} must be divisible by heads = {self.heads}")
        if self.mode == "user" and not self.causal:
            raise ConfigError("mode 'user' (every position supervised in one pass) needs causal attention")
        if self.mode == "user" and self.kind == "diffrec" and self.noised_positions != 1:
            raise ConfigError("mode 'user' noises the target only: use noised_positions = 1 or mode 'prefix'")
        if self.inference == "alg2" and self.noised_positions != 1:
            raise ConfigError("inference 'alg2' (reverse process) needs noised_positions = 1")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")
        return self


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device


def build_model(config: TrainConfig, num_items: int) -> DSR:
    return DSR(
        num_items=num_items, max_len=config.max_len, dim=config.dim, layers=config.layers, heads=config.heads,
        dropout=config.dropout, ffn_mult=config.ffn_mult, attn_dropout=config.attn_dropout, emb_scale=config.emb_scale, norm_embeddings=config.norm_embeddings, schedule=config.schedule, num_steps=config.num_steps,
        noised_positions=config.noised_positions, add_position=config.add_position, add_step=config.add_step,
        causal=config.causal, kind=config.kind, input_scale=config.input_scale,
    )


def dataset_fingerprint(dataset: SequenceDataset) -> dict[str, Any]:
    return {
        "name": dataset.name, "num_users": dataset.num_users, "num_items": dataset.num_items,
        "num_actions": dataset.num_actions,
        "crc32": zlib.crc32(np.ascontiguousarray(dataset.items).tobytes()
                            + np.ascontiguousarray(dataset.offsets).tobytes()),
    }


# --------------------------------------------------------------------------------------------------
# Evaluation


def autocast_context(device, bf16: bool):
    """bf16 autocast of the forward passes on CUDA (the encoder's matmuls and attention; LayerNorm
    outputs, and so f_theta, stay float32, so the fused ops see float32); a no-op on the CPU or when
    bf16 is False."""
    device = torch.device(device)
    if bf16 and device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def evaluate(model: DSR, dataset: SequenceDataset, split: str = "valid", *, seeds: int = 10,
             method: str = "alg3", exclude_seen: bool = True, seed: int = 0, stride: int = 1,
             batch_size: int = 256, ks=KS, progress: bool = False, bf16: bool = False) -> dict[str, float]:
    """HR@K / NDCG@K of full ranking on a leave-one-out split, averaged over users. `bf16`: autocast
    the forward passes on CUDA (autocast_context)."""
    batch = evaluation_batch(dataset, split, model.max_len - 1)
    with autocast_context(model.out.weight.device, bf16):
        ranks = target_ranks(
            model, torch.from_numpy(batch.histories), torch.from_numpy(batch.targets), exclude_seen=exclude_seen,
            seeds=seeds, method=method, seed=seed, stride=stride, batch_size=batch_size,
            seen_offsets=batch.seen_offsets, seen_items=batch.seen_items, progress=progress,
        )
    return ranking_metrics(ranks, ks)


def popularity_metrics(dataset: SequenceDataset, split: str = "valid", exclude_seen: bool = True,
                       ks=KS) -> dict[str, float]:
    """The popularity ranking (counts of the data visible at the split) under the same protocol."""
    batch = evaluation_batch(dataset, split, 1)
    counts = item_popularity(dataset, split)
    offsets, items = (batch.seen_offsets, batch.seen_items) if exclude_seen else (None, None)
    return ranking_metrics(popularity_ranks(counts, batch.targets, offsets, items), ks)


# --------------------------------------------------------------------------------------------------
# Training


class _Stop(Exception):
    pass


@dataclass
class TrainState:
    epoch: int = 0  # last completed epoch
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)


def _loss(model: DSR, batch: dict[str, torch.Tensor], config: TrainConfig, sampler, step_gen, noise_gen,
          device) -> tuple[torch.Tensor, dict[str, float]]:
    history = batch["history"].to(device)
    target = batch["target"].to(device)
    size = history.shape[0]
    weight, bias = model.out.weight, model.out.bias
    num_steps = model.num_steps
    steps = probs = None
    if model.diffusion:
        if sampler is not None:
            steps, probs = sampler.sample(size, step_gen)
        else:
            steps = torch.randint(1, num_steps + 1, (size,), generator=step_gen)
            probs = torch.full((size,), 1.0 / num_steps, dtype=torch.float64)
        importance = (1.0 / (num_steps * probs)).to(device=device, dtype=torch.float32)
        steps = steps.to(device)

    if config.mode == "prefix":
        if model.diffusion:
            ids = model.build_input(history, target)
            noise = torch.randn(size, model.noised_positions, model.dim, generator=noise_gen, device=device)
            f = model(ids, steps, noise)
        else:
            f = model(model.build_input(history))
        targets, row_of = target, None
    else:  # user: window = the last T items of [history, target], every position with history supervised
        window = torch.cat([history, target[:, None]], dim=1)[:, -model.max_len:]
        supervised = torch.zeros_like(window, dtype=torch.bool)
        supervised[:, 1:] = (window[:, 1:] != 0) & (window[:, :-1] != 0)
        if model.diffusion:
            noise = torch.randn(size, model.max_len, model.dim, generator=noise_gen, device=device)
            out = model.forward_two_stream(window, steps, noise)
        else:
            out = model.forward_two_stream(window)
        f = out[supervised]
        targets = window[supervised]
        row_of = supervised.nonzero()[:, 0]

    rec_rows = ops.catalog_xent(f, weight, bias, targets)[0]
    rec = rec_rows.mean()
    parts = {"loss_rec": float(rec.detach())}
    loss = rec
    if model.diffusion:
        h0 = model.item_vectors(targets).detach()  # stop-gradient through the MSE target
        l_n = (f - h0).pow(2).mean(dim=-1)  # averaged over d
        # what the sampler records: L_n (the paper) or L_n + L_rec of the sequence
        recorded = l_n.detach() if config.importance_loss == "mse" else (l_n + rec_rows).detach()
        if row_of is None:
            mse = (importance * l_n).mean()
            per_sequence = recorded
        else:
            mse = (importance[row_of] * l_n).mean()
            sums = torch.zeros(size, device=device).index_add_(0, row_of, recorded)
            counts = torch.bincount(row_of, minlength=size).clamp(min=1)
            per_sequence = sums / counts
            has_rows = torch.bincount(row_of, minlength=size) > 0
            steps, per_sequence = steps[has_rows], per_sequence[has_rows]
        loss = loss + config.mse_weight * mse
        parts["loss_mse"] = float(mse.detach())
        if sampler is not None:
            sampler.update(steps.cpu(), per_sequence.cpu())
    parts["loss"] = float(loss.detach())
    return loss, parts


def _rng_tensors(step_gen: torch.Generator, noise_gen: torch.Generator, order_gen: torch.Generator,
                 device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {
        "rng.torch": torch.get_rng_state(), "rng.steps": step_gen.get_state(),
        "rng.noise": noise_gen.get_state(), "rng.order": order_gen.get_state(),
    }
    if device.type == "cuda":
        tensors["rng.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def _restore_rng(tensors, step_gen, noise_gen, order_gen, device):
    torch.set_rng_state(tensors["rng.torch"])
    step_gen.set_state(tensors["rng.steps"])
    order_gen.set_state(tensors["rng.order"])
    noise_gen.set_state(tensors["rng.noise"])
    if device.type == "cuda" and "rng.cuda" in tensors:
        torch.cuda.set_rng_state(tensors["rng.cuda"], device)


def train(config: TrainConfig, dataset: SequenceDataset, out_dir=None, *, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], None] | None = None,
          log: Callable[[str], None] | None = print, extra_meta: dict | None = None,
          bf16: bool = False) -> dict[str, Any]:
    """Alg. 1 with validation after each epoch; returns {"valid", "test", "popularity", ...}.

    `out_dir` (optional) receives epoch checkpoints, best.json / last.json pointers, log.jsonl and
    result.json. `resume` continues the run found in out_dir. `callback(record)` is called after
    each epoch (after its checkpoint is written); if it returns True, training stops after that
    epoch (e.g. a time budget) and the best checkpoint is tested as usual. `extra_meta` is stored in
    the checkpoints (e.g. how the dataset was read). `bf16`: autocast the forward passes (training
    and evaluation) to bf16 on CUDA; no effect on the CPU."""
    config.validate()
    log = log or (lambda message: None)
    device = resolve_device(config.device)
    out_dir = Path(out_dir) if out_dir is not None else None
    if resume and out_dir is None:
        raise ConfigError("resume needs an output directory")
    fingerprint = dataset_fingerprint(dataset)
    meta = {"dataset": fingerprint, **(extra_meta or {})}

    torch.manual_seed(config.seed)
    model = build_model(config, dataset.num_items).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    sampler = (LossSecondMomentSampler(config.num_steps)
               if config.kind == "diffrec" and config.importance_sampling else None)
    step_gen = torch.Generator().manual_seed(config.seed + 1)
    order_gen = torch.Generator().manual_seed(config.seed + 2)
    noise_gen = torch.Generator(device=device).manual_seed(config.seed + 3)
    state = TrainState()
    best_weights = None

    if resume:
        found = ckpt.read_run_state(out_dir)
        if found is not None:
            directory, scalars, tensors = found
            saved = TrainConfig.from_dict(ckpt.read_json(directory / ckpt.CONFIG_FILE)["config"])
            changed = [name for name in dataclasses.asdict(config)
                       if getattr(saved, name) != getattr(config, name) and name not in TrainConfig.RESUMABLE_CHANGES]
            if changed:
                raise ConfigError(f"cannot resume {out_dir}: config differs in {changed} "
                                  f"(only {list(TrainConfig.RESUMABLE_CHANGES)} may change)")
            saved_fp = ckpt.read_json(directory / ckpt.CONFIG_FILE).get("dataset")
            if saved_fp != fingerprint:
                raise ConfigError(f"cannot resume {out_dir}: it was trained on a different dataset "
                                  f"({saved_fp} vs {fingerprint})")
            ckpt.load_weights(model, directory / ckpt.MODEL_FILE)
            needed = ["rng.torch", "rng.steps", "rng.noise", "rng.order"]
            needed += ["sampler.loss_history", "sampler.counts"] if sampler is not None else []
            missing = [name for name in needed if name not in tensors]
            missing += [name for name in ("optimizer", "train_state")
                        if not isinstance(scalars, dict) or name not in scalars]
            if missing:
                raise ckpt.CheckpointError(f"cannot resume from {directory}: its training state lacks {missing}")
            try:
                ckpt.optimizer_from_parts(optimizer, tensors, scalars["optimizer"])
                if sampler is not None:
                    sampler.load_state_dict({"loss_history": tensors["sampler.loss_history"],
                                             "counts": tensors["sampler.counts"]})
                _restore_rng(tensors, step_gen, noise_gen, order_gen, device)
                state = TrainState(**scalars["train_state"])
            except (KeyError, TypeError, ValueError, RuntimeError) as error:
                raise ckpt.CheckpointError(f"cannot resume from {directory}: its training state does not fit "
                                           f"this model and config ({type(error).__name__}: {error})") from None
            ckpt.remove_stale_temporaries(out_dir)  # left by a run that was killed while writing
            log(f"resuming {out_dir} after epoch {state.epoch} (best valid NDCG@10 "
                f"{state.best_metric:.4f} at epoch {state.best_epoch})")
            if out_dir is not None:  # the log is rebuilt from the checkpoint's records
                ckpt.atomic_write_bytes(out_dir / "log.jsonl",
                                        "".join(json.dumps(r) + "\n" for r in state.history).encode())
        else:
            log(f"nothing to resume in {out_dir}: starting a new run")
    elif out_dir is not None and (out_dir / ckpt.LAST_POINTER).exists():
        raise ConfigError(f"{out_dir} already holds a run; pass resume=True (--resume) or choose another directory")
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        if not resume or not state.history:
            ckpt.atomic_write_bytes(out_dir / "log.jsonl", b"")

    train_rows = training_sequences(dataset, config.max_len if config.mode == "user" else config.max_len - 1,
                                    config.mode)
    if len(train_rows) == 0:
        raise ValueError("the dataset has no training sequence (every user needs >= 2 training items)")
    log(f"{config.kind}: {sum(p.numel() for p in model.parameters()):,} parameters, {len(train_rows):,} "
        f"training rows ({config.mode} mode), device {device}")

    item_ids = [dataset.item_original_ids[i] for i in range(1, dataset.num_items + 1)]
    eval_options = dict(seeds=config.seeds, method=config.inference, exclude_seen=config.eval_exclude_seen,
                        seed=config.seed, batch_size=config.eval_batch_size, bf16=bf16)

    for epoch in range(state.epoch + 1, config.epochs + 1):
        if state.stopped_early:
            break
        model.train()
        started = time.perf_counter()
        order = torch.randperm(len(train_rows), generator=order_gen).numpy()
        if config.mode == "prefix" and 0 < config.samples_per_epoch < len(order):
            order = order[: config.samples_per_epoch]
        batches = range(0, len(order), config.batch_size)
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(batches, desc=f"{config.kind} epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                       disable=None)  # None: off when stderr is not a terminal
            batches = bar
        totals: dict[str, float] = {}
        for index, first in enumerate(batches, start=1):
            batch = train_rows.batch(order[first:first + config.batch_size])
            with autocast_context(device, bf16):
                loss, parts = _loss(model, batch, config, sampler, step_gen, noise_gen, device)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss {parts} at epoch {epoch}, batch {index}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            if bar is not None:
                bar.set_postfix({key: f"{value / index:.4f}" for key, value in totals.items()})
        if bar is not None:
            bar.close()
        num_batches = max(1, math.ceil(len(order) / config.batch_size))
        train_seconds = time.perf_counter() - started
        valid = evaluate(model, dataset, "valid", **eval_options)
        ndcg = valid["NDCG@10"]
        improved = ndcg > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = ndcg, epoch, 0
            if out_dir is None:
                best_weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            state.bad_epochs += 1
        if config.patience and state.bad_epochs >= config.patience:
            state.stopped_early = True
        record = {
            "epoch": epoch, **{key: value / num_batches for key, value in totals.items()},
            "valid": valid, "item_emb_norm": model.item_embedding_norm(),
            "item_emb_cos": model.item_embedding_cosine(),
            "out_weight_norm": model.output_weight_norm(),
            "sampler_warm": bool(sampler.warmed_up()) if sampler is not None else None,
            "best_epoch": state.best_epoch, "train_seconds": round(train_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
        state.epoch = epoch
        state.history.append(record)
        if out_dir is not None:
            opt_tensors, opt_meta = ckpt.optimizer_to_parts(optimizer)
            tensors = {**opt_tensors, **_rng_tensors(step_gen, noise_gen, order_gen, device)}
            if sampler is not None:
                tensors.update({f"sampler.{k}": v for k, v in sampler.state_dict().items()})
            scalars = {"format": ckpt.FORMAT, "optimizer": opt_meta, "train_state": dataclasses.asdict(state)}
            ckpt.write_run_checkpoint(out_dir, epoch, model, config.to_dict(), item_ids,
                                      {**meta, "epoch": epoch, "valid": valid}, tensors, scalars, improved)
            with open(out_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        loss_text = " ".join(f"{k} {record[k]:.4f}" for k in ("loss", "loss_mse", "loss_rec") if k in record)
        log(f"epoch {epoch:3d}  {loss_text}  valid HR@10 {valid['HR@10']:.4f} NDCG@10 {ndcg:.4f}"
            f"{' *' if improved else ''}  |E| {record['item_emb_norm']:.2f} cos {record['item_emb_cos']:.3f}"
            f"  {record['seconds']:.1f}s")
        if callback is not None and callback(record) is True:
            log(f"stopped by the callback after epoch {epoch}")
            break
        if state.stopped_early:
            log(f"early stop: no better valid NDCG@10 for {config.patience} epochs")
            break

    # test the best checkpoint
    if out_dir is not None:
        ckpt.load_weights(model, ckpt.resolve(out_dir, "best") / ckpt.MODEL_FILE)
    elif best_weights is not None:
        model.load_state_dict(best_weights)
    best_record = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
    test = evaluate(model, dataset, "test", **eval_options)
    result = {
        "kind": config.kind, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
        "valid": best_record["valid"] if best_record else None, "test": test,
        "popularity": {split: popularity_metrics(dataset, split, config.eval_exclude_seen) for split in ("valid", "test")},
        "dataset": fingerprint, "config": config.to_dict(),
    }
    if out_dir is not None:
        ckpt.atomic_write_json(out_dir / "result.json", result)
    result["model"] = model
    return result
