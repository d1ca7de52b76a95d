"""The training configuration and the option vocabularies, below the trainer and the inference
layer: `TrainConfig` (validated on construction from a dict and on replace), the device and bf16
settings. A checkpoint stores a TrainConfig, so loading a model needs this module and the model,
never the trainer."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .data import TRAIN_MODES
from .errors import ConfigError
from .model import MODEL_KINDS, STEP_EMBEDDINGS, TWO_STREAM_MODES, resolve_step_embedding
from .schedules import MAX_STEPS, SCHEDULES

METHODS = ("alg3", "alg2")  # inference: "alg3" one denoiser pass per seed, "alg2" the reverse process
IMPORTANCE_LOSSES = ("mse", "total")
BF16_SETTINGS = ("auto", "on", "off")
LR_SCHEDULES = ("constant", "cosine")


def bf16_enabled(setting: str, device) -> bool:
    """Whether --bf16 `setting` autocasts on `device`, with float32 master weights: "auto" does on
    CUDA only. On the CPU bf16 is opt-in ("on"): measured 0.7-0.8x of float32's training speed on a
    CPU without native bf16 dot products (oneDNN emulates them there), and not measured on one with
    avx512_bf16 or AMX."""
    device = torch.device(device)
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda"


def autocast_context(device, bf16: bool):
    """bf16 autocast of the forward passes (the encoder's matmuls and attention) on the device's
    type; the item layer's cross-entropy and the seed ops get float32 f_theta (see _TrainingLoss,
    InferenceEngine.target_ranks). A no-op when bf16 is False."""
    device = torch.device(device)
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _check_field(name: str, value, kind, low=None, high=None, choices=None) -> None:
    """ConfigError unless `value` is of `kind` (bool and int kept apart; floats finite), in
    `choices` and within [low, high]."""
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
        what = "a finite float" if kind is float else kind.__name__
        raise ConfigError(f"{name} must be {what}, got {value!r} ({type(value).__name__})")
    if choices is not None and value not in choices:
        raise ConfigError(f"{name} must be one of {choices}, got {value!r}")
    if low is not None and value < low:
        raise ConfigError(f"{name} must be >= {low}, got {value!r}")
    if high is not None and value > high:
        raise ConfigError(f"{name} must be <= {high}, got {value!r}")


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
    tie_output: bool = False  # item layer W = the item embeddings (see model.DSR.item_layer)
    # diffusion
    schedule: str = "sqrt"
    num_steps: int = 1000  # N
    noised_positions: int = 1  # K: noise the last K positions (1 = target only, the paper)
    input_scale: float = 1.0  # the forward process runs on input_scale * h0 (1 = the paper; see model.DSR)
    add_position: bool = True
    add_step: bool = True
    # where z_n goes: "all" positions (Eq. 14), the noised "target" only, or "auto": "target" for
    # the two-stream modes (window, user), which need it, "all" for prefix
    step_embedding: str = "auto"
    mse_weight: float = 1.0
    importance_sampling: bool = True  # False: uniform steps
    importance_loss: str = "mse"  # what p_n follows: "mse" = L_n (Eq. 18), "total" = L_n + L_rec
    # inference / evaluation
    num_samples: int = 10  # S of Alg. 3: noise draws averaged per user (the key "seeds" in older checkpoints)
    inference: str = "alg3"  # "alg3" | "alg2"
    eval_exclude_seen: bool = True
    eval_batch_size: int = 256
    # optimisation
    lr: float = 1e-3
    # "cosine": lr * (1 + cos(pi * t / t_end)) / 2 per batch, t_end = the last batch of `epochs`, so a run
    # that is planned to its budget ends annealed (a run cut short by a budget or patience does not)
    lr_schedule: str = "constant"
    weight_decay: float = 0.0
    batch_size: int = 256
    epochs: int = 50
    mode: str = "window"  # "window" | "prefix" | "user" (see data.training_sequences)
    window_stride: int = 0  # window mode: windows start this many items apart; 0 = max_len // 2
    samples_per_epoch: int = 0  # prefix mode: 0 = every prefix each epoch
    patience: int = 0  # early stopping after this many epochs without a better valid NDCG@10; 0 = off
    grad_clip: float = 0.0  # max gradient norm; 0 = off
    seed: int = 42
    device: str = "auto"  # "auto" | "cpu" | "cuda" | "cuda:N"
    bf16: str = "auto"  # bf16 autocast: "auto" (on CUDA only), "on" or "off"

    OLD_NAMES = {"seeds": "num_samples"}  # field names in older checkpoints and config files
    # fields that may change when a run is resumed
    RESUMABLE_CHANGES = ("epochs", "patience", "device", "eval_batch_size", "bf16")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "TrainConfig":
        if not isinstance(values, dict):
            raise ConfigError(f"config must be a mapping, got {type(values).__name__}")
        values = cls.with_current_names(values)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; known keys: {sorted(known)}")
        config = cls(**values)
        config.validate()
        return config

    @classmethod
    def with_current_names(cls, values: dict[str, Any]) -> dict[str, Any]:
        """`values` with each old field name (OLD_NAMES) renamed, unless the new name is there too
        (then the old one is left, for from_dict to refuse as unknown)."""
        renamed = {old: new for old, new in cls.OLD_NAMES.items() if old in values and new not in values}
        return {renamed.get(key, key): value for key, value in values.items()}

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes) -> "TrainConfig":
        config = dataclasses.replace(self, **changes)
        config.validate()
        return config

    def validate(self) -> "TrainConfig":
        """ConfigError naming the first field with a bad type or value, or the first bad combination."""
        self._check_fields()
        self._check_combinations()
        return self

    def _check_fields(self) -> None:
        def need(name, kind, low=None, high=None, choices=None):
            _check_field(name, getattr(self, name), kind, low, high, choices)

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
        need("num_samples", int, 1)
        need("inference", str, choices=METHODS)
        need("eval_exclude_seen", bool)
        need("eval_batch_size", int, 1)
        need("lr", float)
        if not self.lr > 0:
            raise ConfigError(f"lr must be > 0, got {self.lr!r}")
        need("lr_schedule", str, choices=LR_SCHEDULES)
        need("weight_decay", float, 0.0)
        need("batch_size", int, 1)
        need("epochs", int, 1)
        need("mode", str, choices=TRAIN_MODES)
        need("window_stride", int, 0, self.max_len - 1)
        need("samples_per_epoch", int, 0)
        need("tie_output", bool)
        need("step_embedding", str, choices=("auto",) + STEP_EMBEDDINGS)
        need("patience", int, 0)
        need("grad_clip", float, 0.0)
        need("seed", int, 0, 2**63 - 1)
        need("device", str)
        need("bf16", str, choices=BF16_SETTINGS)

    def _check_combinations(self) -> None:
        if self.samples_per_epoch and self.mode != "prefix":
            raise ConfigError(f"samples_per_epoch = {self.samples_per_epoch} draws prefixes: it needs mode 'prefix', "
                              f"got mode {self.mode!r} (which trains on every target each epoch)")
        if self.dim % self.heads != 0:
            raise ConfigError(f"dim = {self.dim} must be divisible by heads = {self.heads}")
        if self.two_stream and not self.causal:
            raise ConfigError(f"mode {self.mode!r} (every position supervised in one pass) needs causal attention")
        if self.two_stream and self.kind == "diffrec" and self.noised_positions != 1:
            raise ConfigError(f"mode {self.mode!r} noises the target only: use noised_positions = 1 or mode 'prefix'")
        if self.two_stream and self.kind == "diffrec" and self.step_embedding == "all":
            raise ConfigError(f"mode {self.mode!r} draws a step per target, so the step embedding goes to the "
                              "target only: use step_embedding 'target' (or 'auto') or mode 'prefix'")
        if self.inference == "alg2" and self.noised_positions != 1:
            raise ConfigError("inference 'alg2' (reverse process) needs noised_positions = 1")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {self.device!r}")

    def learning_rate(self, epoch: int, batch: int, batches_per_epoch: int) -> float:
        """The lr of batch `batch` (0-based) of epoch `epoch` (1-based) under lr_schedule: a function
        of the position alone, so a resumed run continues the same schedule."""
        if self.lr_schedule == "constant":
            return self.lr
        progress = ((epoch - 1) * batches_per_epoch + batch) / (self.epochs * batches_per_epoch)
        return self.lr * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    @property
    def two_stream(self) -> bool:
        """Every position of a window supervised in one pass (model.DSR.forward_two_stream)."""
        return self.mode in TWO_STREAM_MODES

    @property
    def resolved_step_embedding(self) -> str:
        return resolve_step_embedding(self.step_embedding, self.mode)

    @property
    def resolved_window_stride(self) -> int:
        return self.window_stride or self.max_len // 2


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} requested but CUDA is not available")
    return device
