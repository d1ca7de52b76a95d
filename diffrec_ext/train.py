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
- "window" (the default): each user's training part cut into windows of T items, stride s; every
  training target supervised exactly once per epoch, every position of a window in one pass (the
  two-stream form), with its own step n per supervised position (data.training_sequences).
- "prefix" (the paper): every prefix of every training sequence is one example,
  [history (last T - 1 items), target]; `samples_per_epoch` > 0 draws that many prefixes per epoch.
- "user": only the window of the last T items of each user's training part, trained as a window
  row (every position in one pass, a step n per supervised position); the earlier targets of a
  longer user are not seen.

`Trainer` runs it, RecBole-style: `fit()` = per epoch `train_epoch`, `validate`, `save`; then `test`
(`train(...)` is `Trainer(...).fit()`). Validation NDCG@10 after every epoch picks the best
checkpoint, which is tested at the end. Each epoch appends a JSON line to <out_dir>/log.jsonl.
`train(..., resume=True)` continues from the last completed epoch and gives the same result as an
uninterrupted run (model, optimizer, sampler and generator states are restored; dropout's RNG is
reseeded at every epoch).

Under torchrun (a default process group of P > 1 processes) the same call trains data-parallel:
see `train` and docs/distributed.md.
"""

from __future__ import annotations

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
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from . import checkpoint as ckpt
from . import distributed as dd
from . import ops
from ._deprecation import NUM_SAMPLES_RENAME, renamed_keywords
from .config import ConfigError, TrainConfig, autocast_context, bf16_enabled, resolve_device
from .data import (SequenceDataset, evaluation_batch, item_popularity, training_sequences,
                   training_target_count)
from .engine import InferenceEngine
from .inference import shard_users
from .metrics import KS, popularity_ranks, ranking_metrics
from .model import DSR, build_model, embedding_statistics
from .sampler import LossSecondMomentSampler


def dataset_fingerprint(dataset: SequenceDataset) -> dict[str, Any]:
    return {
        "name": dataset.name, "num_users": dataset.num_users, "num_items": dataset.num_items,
        "num_actions": dataset.num_actions,
        "crc32": zlib.crc32(np.ascontiguousarray(dataset.items).tobytes()
                            + np.ascontiguousarray(dataset.offsets).tobytes()),
    }


# --------------------------------------------------------------------------------------------------
# Evaluation


@renamed_keywords(method="algorithm", **NUM_SAMPLES_RENAME)
def evaluate(model: DSR, dataset: SequenceDataset, split: str = "valid", *, num_samples: int = 10,
             algorithm: str = "alg3", exclude_seen: bool = True, seed: int = 0, stride: int = 1,
             batch_size: int = 256, ks=KS, progress: bool = False, bf16: bool = False,
             sharded: bool = False) -> dict[str, float]:
    """HR@K / NDCG@K of full ranking on a leave-one-out split, averaged over users. `bf16`: autocast
    the forward passes on CUDA (autocast_context).

    `sharded`: split the users over the processes of the default torch.distributed group (rank r
    ranks the user batches r, r + P, ...; collective: every rank must call it with the same
    arguments). The ranks are summed into one [U] vector on every rank, so every rank returns the
    metrics of the single-process call exactly (each batch draws the same noise either way)."""
    batch = evaluation_batch(dataset, split, model.max_len - 1)
    device = model.pos_emb.device
    rank, world_size = dd.rank_and_world_size() if sharded else (0, 1)
    # the live model (no copy) at its own dtype; no CUDA graphs, which would be captured anew each call
    engine = InferenceEngine(model, device=device, dtype=model.pos_emb.dtype, batch_size=batch_size,
                             cuda_graphs=False)
    with autocast_context(device, bf16):
        ranks = engine.target_ranks(
            batch.histories, batch.targets, exclude_seen=exclude_seen, num_samples=num_samples, algorithm=algorithm,
            seed=seed,
            stride=stride, seen_offsets=batch.seen_offsets, seen_items=batch.seen_items, progress=progress,
            shard=(rank, world_size),
        )
    if world_size > 1:
        every_user = torch.zeros(len(batch), dtype=torch.int64)
        every_user[shard_users(len(batch), batch_size, (rank, world_size))] = torch.from_numpy(ranks)
        every_user = every_user.to(device)  # nccl reduces device tensors only
        dist.all_reduce(every_user)  # each user's rank comes from one process, zeros elsewhere
        ranks = every_user.cpu().numpy()
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


@dataclass
class TrainState:
    epoch: int = 0  # last completed epoch
    best_metric: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    stopped_early: bool = False
    history: list = field(default_factory=list)


@dataclass(frozen=True)
class _Replicas:
    """This process's place among the data-parallel processes of the default torch.distributed
    group (rank 0 of 1 without one).

    The combined batch of a step is the single-process batch: local row j of rank r is row
    j * P + r of it (the layout of DistributedSampler, see `_epoch_rows`), so every draw made for
    the combined batch (steps, noise) is sliced [r::P]."""

    rank: int = 0
    size: int = 1

    @property
    def lead(self) -> bool:
        return self.rank == 0

    def mine(self, combined: torch.Tensor) -> torch.Tensor:
        return combined[self.rank::self.size]

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(tensor)
        return tensor

    def from_lead(self, value):
        """`value` of rank 0, on every rank (pickled; tensors should be on the CPU)."""
        if self.size == 1:
            return value
        holder = [value if self.lead else None]
        dist.broadcast_object_list(holder, src=0)
        return holder[0]


class _TrainingLoss(nn.Module):
    """The per-target losses of a batch in one forward: L_rec [R] and, for DiffRec, L_n [R], with
    `supervised` ([B, T] bool in the two-stream modes: which window positions the R rows are;
    None in prefix mode, where row = sequence). One module, so that DistributedDataParallel sees
    every use of the parameters (the item layer and the MSE target are used outside DSR.forward)."""

    def __init__(self, model: DSR, two_stream: bool):
        super().__init__()
        self.model = model
        self.two_stream = two_stream

    def forward(self, inputs: dict[str, torch.Tensor], steps, noise):
        model = self.model
        if self.two_stream:
            window, supervised = inputs["window"], inputs["supervised"]
            out = model.forward_two_stream(*((window, steps, noise) if model.diffusion else (window,)))
            f, targets = out[supervised], window[supervised]
        else:
            history, targets = inputs["history"], inputs["target"]
            if model.diffusion:
                f = model(model.build_input(history, targets), steps, noise)
            else:
                f = model(model.build_input(history))
            supervised = None
        f = f.float()  # bf16 under CPU autocast; the catalog cross-entropy and L_n in float32
        weight, bias = model.item_layer()
        rec_rows = ops.catalog_xent(f, weight, bias, targets)[0]
        l_n = None
        if model.diffusion:
            h0 = model.item_vectors(targets).detach()  # stop-gradient through the MSE target
            l_n = (f - h0).pow(2).mean(dim=-1)  # averaged over d
        return rec_rows, l_n, supervised


def _train_step(loss_module, model: DSR, batch: dict[str, torch.Tensor], config: TrainConfig, sampler,
                step_gen, noise_gen, device, replicas: _Replicas) -> tuple[torch.Tensor, dict[str, float]]:
    """(this rank's loss to back-propagate, the combined batch's loss parts).

    Diffusion steps are drawn per target: one per sequence in prefix mode, one per window position
    in the two-stream modes (only the supervised positions' draws are used). The loss is
    normalised by the number of targets of the COMBINED batch and multiplied by P, so that
    DistributedDataParallel's gradient average gives the gradient of the combined batch's mean
    loss: the same update as one process on the combined batch. One all-reduce per step carries
    the target count, the loss sums and the (step, recorded loss) of every target, which every
    rank feeds to its importance sampler in the combined batch's order: the samplers stay
    identical and so draw identical steps."""
    inputs = {key: value.to(device) for key, value in batch.items() if key != "user"}
    local = batch["user"].shape[0]
    combined = local * replicas.size
    per_row = model.max_len if config.two_stream else 1  # step draws per row
    steps = importance = noise = None
    if model.diffusion:
        num_steps = model.num_steps
        if sampler is not None:
            steps, probs = sampler.sample(combined * per_row, step_gen)
        else:
            steps = torch.randint(1, num_steps + 1, (combined * per_row,), generator=step_gen)
            probs = torch.full((combined * per_row,), 1.0 / num_steps, dtype=torch.float64)
        shape = (combined, per_row) if config.two_stream else (combined,)
        importance = replicas.mine((1.0 / (num_steps * probs)).reshape(shape)).to(device=device, dtype=torch.float32)
        steps = replicas.mine(steps.reshape(shape)).to(device)
        noised = model.max_len if config.two_stream else model.noised_positions
        noise = replicas.mine(torch.randn(combined, noised, model.dim, generator=noise_gen, device=device))

    rec_rows, l_n, supervised = loss_module(inputs, steps, noise)
    rec_sum = rec_rows.sum()
    mse_sum = None
    if model.diffusion:
        mse_sum = ((importance if supervised is None else importance[supervised]) * l_n).sum()

    # [targets, rec sum, mse sum] then, with a sampler, 3 slots per step draw of the combined batch
    # (step, recorded loss, used), this rank's rows at [r::P] and zeros elsewhere.
    totals = torch.zeros(3 + (3 * combined * per_row if sampler is not None else 0), dtype=torch.float64,
                         device=device)
    totals[0] = rec_rows.shape[0]
    totals[1] = rec_sum.detach()
    if mse_sum is not None:
        totals[2] = mse_sum.detach()
    if sampler is not None:
        # what the sampler records per target: L_n (the paper) or L_n + L_rec
        recorded = (l_n if config.importance_loss == "mse" else l_n + rec_rows).detach().double()
        used = torch.ones(local, per_row, dtype=torch.bool, device=device) if supervised is None else supervised
        per_draw = torch.zeros(local, per_row, dtype=torch.float64, device=device)
        per_draw[used] = recorded
        slots = totals[3:].view(3, combined, per_row)
        slots[:, replicas.rank::replicas.size] = torch.stack([steps.reshape(local, per_row).double(), per_draw,
                                                                used.double()])
    replicas.sum(totals)
    rows = float(totals[0])
    parts = {"targets": rows, "loss_rec": float(totals[1]) / rows}
    scale = replicas.size / rows
    loss = rec_sum * scale
    if mse_sum is not None:
        parts["loss_mse"] = float(totals[2]) / rows
        loss = loss + config.mse_weight * scale * mse_sum
    parts["loss"] = parts["loss_rec"] + config.mse_weight * parts.get("loss_mse", 0.0)
    if sampler is not None:
        all_steps, all_losses, used = totals[3:].view(3, -1).cpu()
        kept = used > 0
        sampler.update(all_steps[kept].round().to(torch.int64), all_losses[kept])
    return loss, parts


def _epoch_rows(count: int, config: TrainConfig, epoch: int, replicas: _Replicas) -> np.ndarray:
    """This rank's training rows of `epoch`, in order, from torch's DistributedSampler: a permutation
    seeded with seed + epoch (padded to a multiple of P by repeating its first rows), of which rank
    r takes every P-th row from r. So the ranks' j-th batches of config.batch_size / P rows make up
    the single-process batch j. samples_per_epoch keeps the first ceil(samples / P) rows per rank."""
    sampler = DistributedSampler(range(count), num_replicas=replicas.size, rank=replicas.rank, shuffle=True,
                                 seed=config.seed)
    sampler.set_epoch(epoch)
    rows = np.fromiter(iter(sampler), dtype=np.int64, count=len(sampler))
    if config.mode == "prefix" and 0 < config.samples_per_epoch < count:
        rows = rows[: math.ceil(config.samples_per_epoch / replicas.size)]
    return rows


def _dropout_seed(seed: int, epoch: int, rank: int) -> int:
    """Seed of the global torch RNG (dropout) for an epoch on a rank: reseeding at every epoch
    makes a resumed run draw what an uninterrupted one would, without storing RNG states, and
    gives every rank its own dropout masks."""
    return (seed * 1_000_003 + epoch * 1_009 + rank) % 2**63


def _generator_tensors(step_gen: torch.Generator, noise_gen: torch.Generator) -> dict[str, torch.Tensor]:
    return {"rng.steps": step_gen.get_state(), "rng.noise": noise_gen.get_state()}


def _on_cpu(value):
    """`value` with every tensor in it (dicts, lists) copied to the CPU, for broadcast_object_list and
    the best epoch's weights. Always a copy: .cpu() of a CPU tensor would share its storage."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _on_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_on_cpu(item) for item in value)
    return value


def _training_device(config: TrainConfig, replicas: _Replicas) -> torch.device:
    device = resolve_device(config.device)
    if replicas.size > 1:
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())  # set per process from LOCAL_RANK
        if dist.get_backend() == "nccl" and device.type != "cuda":
            raise ConfigError(f"the process group uses nccl, which needs device cuda, got {device}")
    return device


class Trainer:
    """Alg. 1 with validation after every epoch, RecBole-style: `fit()` starts (or resumes) the run,
    then `train_epoch`, `validate` and `save` each epoch until the last, patience or the callback
    stops it, and `test` evaluates the best epoch's weights. `train()` is `Trainer(...).fit()`.
    See `train` for the arguments and for data-parallel training."""

    def __init__(self, config: TrainConfig, dataset: SequenceDataset, out_dir=None, *, resume: bool = False,
                 progress: bool = True, callback: Callable[[dict], None] | None = None,
                 log: Callable[[str], None] | None = print, extra_meta: dict | None = None):
        config.validate()
        self.config, self.dataset, self.progress, self.callback = config, dataset, progress, callback
        self.replicas = replicas = _Replicas(*dd.rank_and_world_size())
        if config.batch_size % replicas.size:
            raise ConfigError(f"batch_size = {config.batch_size} (the combined batch) must be divisible by the "
                              f"{replicas.size} processes")
        self.log = (log or (lambda message: None)) if replicas.lead else (lambda message: None)
        self.device = device = _training_device(config, replicas)
        self.bf16 = bf16_enabled(config.bf16, device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        if resume and self.out_dir is None:
            raise ConfigError("resume needs an output directory")
        self.fingerprint = dataset_fingerprint(dataset)
        self.meta = {"dataset": self.fingerprint, **(extra_meta or {})}

        torch.manual_seed(config.seed)
        self.model = model = build_model(config, dataset.num_items).to(device)
        self.optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.sampler = (LossSecondMomentSampler(config.num_steps)
                        if config.kind == "diffrec" and config.importance_sampling else None)
        self.step_gen = torch.Generator().manual_seed(config.seed + 1)
        self.noise_gen = torch.Generator(device=device).manual_seed(config.seed + 3)
        self.state, self.best_weights = self._start(resume)
        self.writes = self.out_dir is not None and replicas.lead

        self.train_rows = training_sequences(
            dataset, config.max_len if config.two_stream else config.max_len - 1, config.mode,
            config.resolved_window_stride if config.mode == "window" else None)
        if len(self.train_rows) == 0:
            raise ValueError("the dataset has no training sequence (every user needs >= 2 training items)")
        self.all_targets = training_target_count(dataset)
        self.log(f"{config.kind}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                 f"{len(self.train_rows):,} training rows ({config.mode} mode) supervising "
                 f"{self.train_rows.num_targets:,} of the {self.all_targets:,} training targets, device {device}"
                 + (f", {replicas.size} processes of {config.batch_size // replicas.size} rows per batch"
                    if replicas.size > 1 else ""))
        self.loss_module = _TrainingLoss(model, config.two_stream)
        if replicas.size > 1:  # broadcasts rank 0's parameters, then averages the gradients in backward
            self.loss_module = DistributedDataParallel(
                self.loss_module, device_ids=[device.index] if device.type == "cuda" else None)
        self.item_ids = [dataset.item_original_ids[i] for i in range(1, dataset.num_items + 1)]
        self.eval_options = dict(num_samples=config.num_samples, algorithm=config.inference,
                                 exclude_seen=config.eval_exclude_seen, seed=config.seed,
                                 batch_size=config.eval_batch_size, bf16=self.bf16, sharded=replicas.size > 1)

    # ------------------------------------------------------------------ the run
    def fit(self) -> dict[str, Any]:
        """Train the epochs left, then test the best epoch's weights; returns the result (see train)."""
        config, state = self.config, self.state
        for epoch in range(state.epoch + 1, config.epochs + 1):
            if state.stopped_early:
                break
            started = time.perf_counter()
            totals, num_batches = self.train_epoch(epoch)
            record = self.validate(epoch, totals, num_batches, started)
            self.save(record)
            if self._should_stop(record):
                break
        return self.test()

    def train_epoch(self, epoch: int) -> tuple[dict[str, float], int]:
        """One pass over this rank's rows of `epoch`: (summed loss parts and targets, batches)."""
        config, replicas, model = self.config, self.replicas, self.model
        model.train()
        torch.manual_seed(_dropout_seed(config.seed, epoch, replicas.rank))
        rows = _epoch_rows(len(self.train_rows), config, epoch, replicas)
        local_batch = config.batch_size // replicas.size
        batches = range(0, len(rows), local_batch)
        num_batches = len(batches)
        bar = None
        if self.progress and replicas.lead:
            from tqdm.auto import tqdm

            bar = tqdm(batches, desc=f"{config.kind} epoch {epoch}/{config.epochs}", unit="batch", leave=False,
                       disable=None)  # None: off when stderr is not a terminal
            batches = bar
        totals: dict[str, float] = {}
        for index, first in enumerate(batches, start=1):
            batch = self.train_rows.batch(rows[first:first + local_batch])
            with autocast_context(self.device, self.bf16):
                loss, parts = _train_step(self.loss_module, model, batch, config, self.sampler, self.step_gen,
                                          self.noise_gen, self.device, replicas)
            if not math.isfinite(parts["loss"]):  # the combined batch's loss: every rank stops here
                raise FloatingPointError(f"non-finite loss {parts} at epoch {epoch}, batch {index}")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for group in self.optimizer.param_groups:
                group["lr"] = config.learning_rate(epoch, index - 1, num_batches)
            if config.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            self.optimizer.step()
            for key, value in parts.items():
                totals[key] = totals.get(key, 0.0) + value
            if bar is not None:
                bar.set_postfix({key: f"{value / index:.4f}" for key, value in totals.items() if key != "targets"})
        if bar is not None:
            bar.close()
        return totals, max(1, num_batches)

    def validate(self, epoch: int, totals: dict[str, float], num_batches: int, started: float) -> dict[str, Any]:
        """Validation NDCG@10 after `epoch`: keeps the best weights, counts patience, and returns the
        epoch's log record (losses, coverage, targets/s, validation metrics, embedding statistics)."""
        state, model = self.state, self.model
        train_seconds = time.perf_counter() - started
        epoch_targets = int(totals.pop("targets", 0))
        valid = evaluate(model, self.dataset, "valid", **self.eval_options)
        ndcg = valid["NDCG@10"]
        improved = ndcg > state.best_metric
        if improved:
            state.best_metric, state.best_epoch, state.bad_epochs = ndcg, epoch, 0
            self.best_weights = _on_cpu(model.state_dict())
        else:
            state.bad_epochs += 1
        if self.config.patience and state.bad_epochs >= self.config.patience:
            state.stopped_early = True
        record = {
            "epoch": epoch, **{key: value / num_batches for key, value in totals.items()},
            "coverage": epoch_targets / self.all_targets, "targets_per_s": round(epoch_targets / train_seconds, 1),
            "valid": valid, **embedding_statistics(model),
            "sampler_warm": bool(self.sampler.warmed_up()) if self.sampler is not None else None,
            "best_epoch": state.best_epoch, "train_seconds": round(train_seconds, 3),
            "seconds": round(time.perf_counter() - started, 3),
        }
        state.epoch = epoch
        state.history.append(record)
        return record

    def save(self, record: dict[str, Any]) -> None:
        """The epoch's checkpoint (weights, optimizer, sampler, generators, state) and its log line,
        written by rank 0 when there is an output directory; then the epoch's line on the log."""
        epoch, valid, improved = record["epoch"], record["valid"], record["best_epoch"] == record["epoch"]
        if self.writes:
            opt_tensors, opt_meta = ckpt.optimizer_to_parts(self.optimizer)
            tensors = {**opt_tensors, **_generator_tensors(self.step_gen, self.noise_gen)}
            if self.sampler is not None:
                tensors.update({f"sampler.{k}": v for k, v in self.sampler.state_dict().items()})
            scalars = {"format": ckpt.FORMAT, "optimizer": opt_meta, "train_state": dataclasses.asdict(self.state)}
            ckpt.write_run_checkpoint(self.out_dir, epoch, self.model, self.config.to_dict(), self.item_ids,
                                      {**self.meta, "epoch": epoch, "valid": valid}, tensors, scalars, improved)
            with open(self.out_dir / "log.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        loss_text = " ".join(f"{k} {record[k]:.4f}" for k in ("loss", "loss_mse", "loss_rec") if k in record)
        self.log(f"epoch {epoch:3d}  {loss_text}  valid HR@10 {valid['HR@10']:.4f} NDCG@10 {valid['NDCG@10']:.4f}"
                 f"{' *' if improved else ''}  |E| {record['item_emb_norm']:.2f} cos {record['item_emb_cos']:.3f}"
                 f"  coverage {record['coverage']:.3f}  {record['targets_per_s']:,.0f} targets/s  "
                 f"{record['seconds']:.1f}s")

    def _should_stop(self, record: dict[str, Any]) -> bool:
        stop = self.callback is not None and self.callback(record) is True
        # any rank's callback may stop the run (e.g. a time budget), and then every rank stops
        if self.replicas.sum(torch.tensor([float(stop)], device=self.device)).item() > 0:
            self.log(f"stopped by the callback after epoch {record['epoch']}")
            return True
        if self.state.stopped_early:
            self.log(f"early stop: no better valid NDCG@10 for {self.config.patience} epochs")
            return True
        return False

    def test(self) -> dict[str, Any]:
        """The best epoch's weights on the test split; writes result.json; returns the result."""
        config, state, model = self.config, self.state, self.model
        if self.best_weights is not None:
            model.load_state_dict(self.best_weights)
        best_record = next((r for r in state.history if r["epoch"] == state.best_epoch), None)
        test = evaluate(model, self.dataset, "test", **self.eval_options)
        result = {
            "kind": config.kind, "best_epoch": state.best_epoch, "epochs_run": state.epoch,
            "valid": best_record["valid"] if best_record else None, "test": test,
            "popularity": {split: popularity_metrics(self.dataset, split, config.eval_exclude_seen)
                           for split in ("valid", "test")},
            "dataset": self.fingerprint, "config": config.to_dict(), "processes": self.replicas.size,
        }
        if self.writes:
            ckpt.atomic_write_json(self.out_dir / "result.json", result)
        result["model"] = model
        return result

    # ------------------------------------------------------------------ starting and resuming
    def _start(self, resume: bool) -> tuple[TrainState, dict | None]:
        """Rank 0 checks out_dir and, with resume, reads the run there (the checkpoint is read once);
        the other ranks receive its outcome, so a refused resume raises on every rank and a resumed
        run continues from the same state everywhere."""
        replicas, out_dir = self.replicas, self.out_dir
        outcome = None
        if replicas.lead:
            state, best_weights = TrainState(), None
            try:
                if resume:
                    state, best_weights = _restore_run(self)
                elif out_dir is not None and (out_dir / ckpt.LAST_POINTER).exists():
                    raise ConfigError(f"{out_dir} already holds a run; pass resume=True (--resume) or choose "
                                      "another directory")
                if out_dir is not None:
                    out_dir.mkdir(parents=True, exist_ok=True)
                    if not state.history:
                        ckpt.atomic_write_bytes(out_dir / "log.jsonl", b"")
            except Exception as error:  # noqa: BLE001  (re-raised below, on every rank)
                outcome = {"error": error}
            else:
                outcome = {"error": None}
                if state.epoch and replicas.size > 1:
                    outcome.update(_on_cpu({
                        "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                        "sampler": self.sampler.state_dict() if self.sampler is not None else None,
                        "generators": _generator_tensors(self.step_gen, self.noise_gen),
                        "state": dataclasses.asdict(state), "best": best_weights,
                    }))
        outcome = replicas.from_lead(outcome)
        if outcome["error"] is not None:
            raise outcome["error"]
        if replicas.lead:
            return state, best_weights
        if "state" not in outcome:  # a new run
            return TrainState(), None
        self.model.load_state_dict(outcome["model"])
        self.optimizer.load_state_dict(outcome["optimizer"])
        if self.sampler is not None:
            self.sampler.load_state_dict(outcome["sampler"])
        self.step_gen.set_state(outcome["generators"]["rng.steps"])
        self.noise_gen.set_state(outcome["generators"]["rng.noise"])
        return TrainState(**outcome["state"]), outcome["best"]


def _restore_run(trainer: Trainer) -> tuple[TrainState, dict | None]:
    """Load the run in the trainer's out_dir into its model, optimizer, sampler and generators;
    returns its TrainState and the best epoch's weights (on the CPU)."""
    config, out_dir, sampler = trainer.config, trainer.out_dir, trainer.sampler
    found = ckpt.read_run_state(out_dir)
    if found is None:
        trainer.log(f"nothing to resume in {out_dir}: starting a new run")
        return TrainState(), None
    directory, scalars, tensors = found
    saved = TrainConfig.from_dict(ckpt.read_json(directory / ckpt.CONFIG_FILE)["config"])
    changed = [name for name in dataclasses.asdict(config)
               if getattr(saved, name) != getattr(config, name) and name not in TrainConfig.RESUMABLE_CHANGES]
    if changed:
        raise ConfigError(f"cannot resume {out_dir}: config differs in {changed} "
                          f"(only {list(TrainConfig.RESUMABLE_CHANGES)} may change)")
    saved_fp = ckpt.read_json(directory / ckpt.CONFIG_FILE).get("dataset")
    if saved_fp != trainer.fingerprint:
        raise ConfigError(f"cannot resume {out_dir}: it was trained on a different dataset "
                          f"({saved_fp} vs {trainer.fingerprint})")
    needed = ["rng.steps", "rng.noise"] + (["sampler.loss_history", "sampler.counts"] if sampler is not None
                                           else [])
    missing = [name for name in needed if name not in tensors]
    missing += [name for name in ("optimizer", "train_state")
                if not isinstance(scalars, dict) or name not in scalars]
    if missing:
        raise ckpt.CheckpointError(f"cannot resume from {directory}: its training state lacks {missing}")
    ckpt.load_weights(trainer.model, directory / ckpt.MODEL_FILE)
    try:
        ckpt.optimizer_from_parts(trainer.optimizer, tensors, scalars["optimizer"])
        if sampler is not None:
            sampler.load_state_dict({"loss_history": tensors["sampler.loss_history"],
                                     "counts": tensors["sampler.counts"]})
        trainer.step_gen.set_state(tensors["rng.steps"])
        trainer.noise_gen.set_state(tensors["rng.noise"])
        state = TrainState(**scalars["train_state"])
    except (KeyError, TypeError, ValueError, RuntimeError) as error:
        raise ckpt.CheckpointError(f"cannot resume from {directory}: its training state does not fit "
                                   f"this model and config ({type(error).__name__}: {error})") from None
    best_weights = (ckpt.read_tensors(ckpt.resolve(out_dir, "best") / ckpt.MODEL_FILE) if state.best_epoch
                    else None)
    ckpt.remove_stale_temporaries(out_dir)  # left by a run that was killed while writing
    trainer.log(f"resuming {out_dir} after epoch {state.epoch} (best valid NDCG@10 "
             f"{state.best_metric:.4f} at epoch {state.best_epoch})")
    ckpt.atomic_write_bytes(out_dir / "log.jsonl", "".join(json.dumps(r) + "\n" for r in state.history).encode())
    return state, best_weights


def train(config: TrainConfig, dataset: SequenceDataset, out_dir=None, *, resume: bool = False,
          progress: bool = True, callback: Callable[[dict], None] | None = None,
          log: Callable[[str], None] | None = print, extra_meta: dict | None = None) -> dict[str, Any]:
    """Alg. 1 with validation after each epoch; returns {"valid", "test", "popularity", ...}.

    `out_dir` (optional) receives epoch checkpoints, best.json / last.json pointers, log.jsonl and
    result.json. `resume` continues the run found in out_dir. `callback(record)` is called after
    each epoch (after its checkpoint is written); if it returns True, training stops after that
    epoch (e.g. a time budget) and the best checkpoint is tested as usual. `extra_meta` is stored in
    the checkpoints (e.g. how the dataset was read). config.bf16 decides whether the forward
    passes (training and evaluation) autocast to bf16 (bf16_enabled).

    Data parallel: when the default torch.distributed group has P > 1 processes (torchrun; see
    distributed.init_process_group_from_env), every process calls train() with the same arguments.
    The model is wrapped in DistributedDataParallel, config.batch_size is the combined batch (each
    rank trains on batch_size / P rows of it), the importance samplers see every rank's losses,
    validation and test are sharded over users, and only rank 0 writes to out_dir, logs and reads a
    checkpoint to resume. Up to float rounding and dropout masks (drawn per rank), the run equals
    the single-process run of the same config (tests/test_distributed_training.py)."""
    return Trainer(config, dataset, out_dir, resume=resume, progress=progress, callback=callback, log=log,
                   extra_meta=extra_meta).fit()
