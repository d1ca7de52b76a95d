"""The inference engine: top-k recommendations and target ranks for many users at once, from a
checkpoint; the package's one implementation of Alg. 2 / Alg. 3 scoring (`recommend`,
`recommend_dense`, `target_ranks`, `predict_h0`; `recommender.Recommender` is the facade over it).

- `InferenceEngine`: bf16 on CUDA, float32 on the CPU; the embedding sum through the
  fused `ops.denoiser_input`; the catalog scored by `ops.seed_topk` in tiles (never a [B, S, V]
  tensor); users sorted by history length and batched, each batch trimmed to its longest history;
  on CUDA the whole denoiser (Alg. 3's pass, or Alg. 2's reverse loop) captured in a CUDA graph
  per batch shape, inputs copied from pinned memory on a side stream while the previous batch runs.
- The plain PyTorch baseline measured beside it (`EagerEngine`) lives in benchmarks/eager_engine.py.

The shared-history pass. With causal attention (the default model) no position attends to a later
one, so the history positions never see the noised slot: their states in every layer, keys and
values included, are the same for all S seeds. `InferenceEngine` computes them once per user and
runs only the K noised positions per seed, attending to the shared keys and values. This is exact
(the tests compare it with the model's own forward); it turns B * S * T token passes into
B * T + B * S * K. A model with bidirectional attention has no such structure and runs B * S full
sequences (`share_history` is then off).

Randomness: each call draws its noise from a generator seeded with `seed`, batch after batch
([n, S, K, d] for Alg. 3, [m, n, S, d] for Alg. 2, as `inference.predict_h0`), so a call is
reproducible for the same histories, order, batch size and seed.
"""

from __future__ import annotations

import copy
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import pairwise

import numpy as np
import torch

from . import ops
from ._deprecation import NUM_SAMPLES_RENAME, renamed_keywords
from .checkpoint import load_model
from .config import resolve_device
from .errors import UnknownItemsError
from .inference import (METHODS, batch_seed, check_finite_predictions, check_flag, check_item_layer_finite,
                        check_k, check_rank_inputs, check_room, check_seed, exclusion, history_items, posterior,
                        reverse_steps, seen_exclusion, shard_starts)
from .model import DSR, PAD, attention_mask, padding_mask_of

ALGORITHMS = METHODS  # "alg3": one denoiser pass per seed; "alg2": the reverse process
SCORING_METHODS = ("auto", "kernel", "user_chunks")


@dataclass
class TopK:
    """Top-k recommendations of a batch, best first."""

    items: list[list]  # the dataset's own item ids, [B][k]
    scores: torch.Tensor  # [B, k] float32: the seed-averaged probability
    dense_ids: torch.Tensor  # [B, k] int64: the model's ids (1..num_items)


@dataclass
class StepPlan:
    """The denoiser steps of one algorithm for one batch shape, as device tensors made once."""

    steps: list[int]  # visited diffusion steps, descending
    rows_steps: list[torch.Tensor]  # per visited step: [rows] int64 (the history pass)
    seq_steps: list[torch.Tensor]  # per visited step: [rows * S] int64 (the noised positions)
    coefficients: list[tuple[float, float, float]] = field(default_factory=list)  # posterior per transition
    start: tuple[float, float] = (0.0, 0.0)  # h_N = start[0] * E[unk] + start[1] * eps

    def truncated(self, count: int) -> StepPlan:
        count = min(count, len(self.steps))
        return StepPlan(self.steps[:count], self.rows_steps[:count], self.seq_steps[:count],
                         self.coefficients[:count - 1], self.start)


# ------------------------------------------------------------------------------------- denoiser passes
def slot_steps(model: DSR, steps: torch.Tensor, noised: int) -> torch.Tensor:
    """The steps argument of ops.denoiser_input for `noised` slot positions: [rows], or [rows, K]
    when the model puts the step embedding on the noised positions only (step_embedding "target")."""
    if model.step_embedding == "target":
        return steps[:, None].expand(steps.shape[0], noised)
    return steps


def _history_has_step(model: DSR) -> bool:
    """Whether the history positions carry the step embedding (Eq. 14's "all" positions)."""
    return model.add_step and model.step_embedding == "all"


def repeat_rows(t: torch.Tensor, num_samples: int) -> torch.Tensor:
    """Each row `num_samples` times in a row ([rows, ...] -> [rows * S, ...]), as repeat_interleave,
    written as expand + reshape: no output-size computation, so safe inside a graph capture."""
    return t.unsqueeze(1).expand(t.shape[0], num_samples, *t.shape[1:]).reshape(t.shape[0] * num_samples, *t.shape[1:])


class _SharedHistoryPass:
    """Denoiser passes for `rows` users and `num_samples` seeds that compute the history once per user
    (see the module docstring). `ids` [rows, L] end with the K noised positions; L may be shorter
    than the model's T when every history of the batch is (left padding trimmed: exact, since
    padding is masked everywhere)."""

    def __init__(self, engine: InferenceEngine, ids: torch.Tensor, num_samples: int):
        model = engine.model
        self.model, self.engine, self.num_samples = model, engine, num_samples
        rows, length = ids.shape
        self.rows = rows
        suffix = engine.suffix_length
        prefix = length - suffix
        self.prefix_length = prefix
        positions = engine.position_table[model.max_len - length:]
        self.prefix_positions, self.suffix_positions = positions[:prefix], positions[prefix:]
        padding = padding_mask_of(ids)
        self.prefix_padding = padding[:, :prefix]
        self.suffix_padding = repeat_rows(padding[:, prefix:], num_samples)
        vectors = model.item_vectors(ids)
        self.prefix_vectors = vectors[:, :prefix]
        self.suffix_vectors = repeat_rows(vectors[:, prefix:], num_samples)
        self.slot_vectors = self.suffix_vectors[:, -1]
        self.prefix_attention = attention_mask(self.prefix_padding, causal=True)
        self.suffix_attention = self._suffix_attention(padding[:, prefix:], num_samples)
        self.no_noise_prefix = vectors.new_zeros(rows, 0, model.dim)
        self.no_noise_suffix = vectors.new_zeros(rows * num_samples, 0, model.dim)
        self._history_cache: tuple[object, list] | None = None

    def _suffix_attention(self, suffix_padding: torch.Tensor, num_samples: int) -> torch.Tensor:
        """[rows, 1, S * K, P + S * K] bool: the query of (seed s, position i) may attend every
        non-padding history key and the keys (s, j <= i) of its own seed; always itself."""
        rows, suffix = suffix_padding.shape
        device = suffix_padding.device
        to_history = (~self.prefix_padding)[:, None, None, :].expand(rows, 1, num_samples * suffix, self.prefix_length)
        index = torch.arange(num_samples * suffix, device=device)
        seed_of, position_of = index // suffix, index % suffix
        same_seed_before = (seed_of[:, None] == seed_of[None, :]) & (position_of[None, :] <= position_of[:, None])
        key_present = (~suffix_padding).repeat(1, num_samples)  # [rows, S * K], seed-major like the queries
        to_suffix = same_seed_before[None, None] & key_present[:, None, None, :]
        to_suffix = to_suffix | torch.eye(num_samples * suffix, dtype=torch.bool, device=device)
        return torch.cat([to_history, to_suffix], dim=-1)

    def _history_states(self, rows_steps: torch.Tensor) -> list:
        """Keys and values of the history positions in every layer, [rows, heads, P, head_dim]."""
        model = self.model
        if self.prefix_length == 0:
            return [None] * len(model.layers)
        with_step = _history_has_step(model)
        if not with_step and self._history_cache is not None:
            return self._history_cache[1]  # without a step embedding the history is the same at every step
        table, table_noise = self.engine.noising_tables
        x = ops.denoiser_input(self.prefix_vectors, self.prefix_positions, rows_steps, table, table_noise,
                               self.no_noise_prefix, self.prefix_padding, 0, model.add_position, with_step)
        x = model.input_drop(model.input_ln(x))
        states = []
        for index, layer in enumerate(model.layers):
            q, k, v = layer.qkv_heads(x)
            states.append((k, v))
            if index + 1 < len(model.layers):  # the last layer's history outputs are never read
                x = layer.feed_forward(x + layer.attend(q, k, v, self.prefix_attention))
        self._history_cache = (rows_steps, states)
        return states

    def _by_user(self, t: torch.Tensor) -> torch.Tensor:
        # [rows * S, heads, K, hd] -> [rows, heads, S * K, hd], seed-major (matches _suffix_attention)
        heads, suffix, head_dim = t.shape[1:]
        return t.reshape(self.rows, self.num_samples, heads, suffix, head_dim).transpose(1, 2).reshape(
            self.rows, heads, self.num_samples * suffix, head_dim)

    def _suffix_outputs(self, x: torch.Tensor, states: list) -> torch.Tensor:
        model = self.model
        for layer, state in zip(model.layers, states):
            q, k, v = (self._by_user(t) for t in layer.qkv_heads(x))
            if state is not None:
                k, v = torch.cat([state[0], k], dim=2), torch.cat([state[1], v], dim=2)
            attended = layer.attend(q, k, v, self.suffix_attention)  # [rows, S * K, d]
            x = layer.feed_forward(x + attended.reshape(x.shape))
        return model.final_ln(x[:, -1])

    def one_pass(self, noise: torch.Tensor | None, plan: StepPlan) -> torch.Tensor:
        """Alg. 3's pass (or SASRec's): f(h_N, N) for every user and seed, [rows * S, d]."""
        model = self.model
        table, table_noise = self.engine.noising_tables
        states = self._history_states(plan.rows_steps[0])
        noised = model.noised_positions
        x = ops.denoiser_input(self.suffix_vectors, self.suffix_positions, slot_steps(model, plan.seq_steps[0], noised),
                               table, table_noise, noise if noised else self.no_noise_suffix, self.suffix_padding,
                               noised, model.add_position, model.add_step)
        return self._suffix_outputs(model.input_drop(model.input_ln(x)), states)

    def denoise_slot(self, h: torch.Tensor, step: int, plan: StepPlan) -> torch.Tensor:
        """f(h_n, n) with the slot's state given (Alg. 2; the slot is the only noised position)."""
        model = self.model
        table, table_noise = self.engine.noising_tables
        states = self._history_states(plan.rows_steps[step])
        slot = h.to(self.suffix_vectors.dtype)[:, None]
        if model.step_embedding == "target":  # the slot as the noised position, with "leave it as it is" tables
            x = ops.denoiser_input(slot, self.suffix_positions, slot_steps(model, plan.seq_steps[step], 1),
                                   *self.engine.identity_tables, torch.zeros_like(slot), self.suffix_padding, 1,
                                   model.add_position, model.add_step)
        else:
            x = ops.denoiser_input(slot, self.suffix_positions, plan.seq_steps[step], table, table_noise,
                                   self.no_noise_suffix, self.suffix_padding, 0, model.add_position, model.add_step)
        return self._suffix_outputs(model.input_drop(model.input_ln(x)), states)


class _FullSequencePass:
    """Denoiser passes as the model itself runs them: rows * S full sequences through the fused
    `ops.denoiser_input` (for models whose attention is not causal)."""

    def __init__(self, engine: InferenceEngine, ids: torch.Tensor, num_samples: int):
        self.model = engine.model
        self.sequences = repeat_rows(ids, num_samples)
        self.slot_vectors = self.model.item_vectors(self.sequences[:, -1])

    def one_pass(self, noise, plan: StepPlan) -> torch.Tensor:
        return self.model(self.sequences, plan.seq_steps[0], noise)

    def denoise_slot(self, h, step: int, plan: StepPlan) -> torch.Tensor:
        return self.model.forward_from_hidden(self.sequences, plan.seq_steps[step], h)


# ------------------------------------------------------------------------------------- CUDA graphs
class _CapturedDenoiser:
    """One denoiser run (Alg. 3's pass or Alg. 2's whole reverse loop) captured in a CUDA graph
    for a fixed batch shape: replaying it launches every kernel of every step with no Python and
    no per-launch overhead. Inputs are copied into static buffers; the output buffer is rewritten
    by each replay (read it, on the same stream, before the next)."""

    def __init__(self, run, ids: torch.Tensor, noise: torch.Tensor, warmup_run, keep_alive=()):
        # The graph reads every tensor it was captured with at the same address on each replay:
        # the tensors made before the capture (the plan's step tensors) must live as long as it.
        self.keep_alive = keep_alive
        self.ids = ids.clone()
        self.noise = noise.clone()
        # Lazy initialisation (cuBLAS handles and workspaces, kernel selection) must not happen
        # inside the capture: run once on a side stream first, as the PyTorch docs prescribe.
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            warmup_run(self.ids, self.noise)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.output = run(self.ids, self.noise)

    def __call__(self, ids: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        self.ids.copy_(ids)
        self.noise.copy_(noise)
        self.graph.replay()
        return self.output


# ------------------------------------------------------------------------------------- host <-> device
class _Transfers:
    """Host-to-device copies of batch inputs from pinned memory on a side stream, so that the
    copy of batch i + 1 overlaps the compute of batch i, and device-to-host copies of results
    into pinned memory without blocking. On the CPU every method is the identity."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device=device) if self.cuda else None

    def send(self, tensors: tuple[torch.Tensor, ...]):
        if not self.cuda:
            return tensors, None
        with torch.cuda.stream(self.stream):
            moved = tuple(t.pin_memory().to(self.device, non_blocking=True) for t in tensors)
            event = torch.cuda.Event()
            event.record(self.stream)
        return moved, event

    def receive(self, sent) -> tuple[torch.Tensor, ...]:
        tensors, event = sent
        if event is None:
            return tensors
        current = torch.cuda.current_stream(self.device)
        current.wait_event(event)
        for t in tensors:  # allocated on the side stream, used and freed on this one
            t.record_stream(current)
        return tensors

    def fetch(self, tensors: tuple[torch.Tensor, ...]):
        if not self.cuda:
            return tensors, None
        host = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=True).copy_(t, non_blocking=True) for t in tensors)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return host, event

    @staticmethod
    def wait(fetched) -> tuple[torch.Tensor, ...]:
        host, event = fetched
        if event is not None:
            event.synchronize()
        return host


# ------------------------------------------------------------------------------------- engines
class EngineInputs:
    """What every engine does before and around the denoiser: model preparation (device, dtype,
    noising tables), the item id map, the validation of histories and options, batching and the
    host/device pipeline. EngineBase adds the algorithms on top."""

    name = "base"
    shares_history = False
    trims_padding = False
    sorts_by_length = False

    def __init__(self, model: DSR, item_ids: Sequence | None = None, *, device=None, dtype=None,
                 batch_size: int = 256, config=None, meta: dict | None = None, profile: bool = False):
        if not isinstance(model, DSR):
            raise TypeError(f"model must be a diffrec_ext.model.DSR, got {type(model).__name__}")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if item_ids is not None and len(item_ids) != model.num_items:
            raise ValueError(f"{len(item_ids)} item ids for a model of {model.num_items} items")
        source_device = model.pos_emb.device
        self.device = torch.device(device) if device is not None else source_device
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {self.device} requested but CUDA is not available")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
            raise ValueError(f"dtype must be a floating dtype, got {self.dtype}")
        param_dtype = model.pos_emb.dtype
        # The noising tables stay float32 whatever the compute dtype (sqrt(abar_N) is ~1e-2).
        table_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32
        self.noising_tables = (model.sqrt_abar.detach().to(self.device, table_dtype),
                               model.sqrt_one_minus_abar.detach().to(self.device, table_dtype))
        # Alg. 2 feeds h_n to the slot as it is: tables of "no noise" for the denoiser input.
        self.identity_tables = (torch.ones_like(self.noising_tables[0]), torch.zeros_like(self.noising_tables[1]))
        if self.device != source_device or self.dtype != param_dtype:
            model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype)
            model.sqrt_abar, model.sqrt_one_minus_abar = self.noising_tables  # undo the cast of the buffers
        self.model = model.eval()
        self.state_dtype = torch.float64 if self.dtype == torch.float64 else torch.float32  # Alg. 2's chain
        with torch.no_grad():
            self.position_table = (model.pos_emb * model.emb_scale).detach()
        self.batch_size = batch_size
        self.item_ids = list(item_ids) if item_ids is not None else None
        self._dense_of: dict | None = None  # original id -> dense id, see lookup
        self._item_layer_finite = False
        self.config = config
        self.meta = meta or {}
        self.profile = profile
        self.last_timings: dict[str, float] = {}
        self.suffix_length = max(model.noised_positions, 1)
        self._transfers = _Transfers(self.device)
        self._plans: OrderedDict = OrderedDict()
        self._lock = threading.Lock()

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_checkpoint(cls, path, device="auto", which: str = "best", **options):
        """An engine from a checkpoint or training-run directory (see checkpoint.load_model)."""
        device = resolve_device(str(device))
        model, config, items, meta = load_model(path, device=device, which=which)
        return cls(model, items, device=device, config=config, meta=meta, **options)

    # ----------------------------------------------------------------- description
    @property
    def num_items(self) -> int:
        return self.model.num_items

    @property
    def max_history(self) -> int:
        """How many of the most recent items of a history the model reads (T - 1)."""
        return self.model.max_len - 1

    @property
    def default_num_samples(self) -> int:
        return int(getattr(self.config, "num_samples", 10))

    @property
    def default_algorithm(self) -> str:
        return str(getattr(self.config, "inference", "alg3"))

    def describe(self) -> dict:
        model = self.model
        return {
            "engine": self.name, "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "kind": model.kind, "num_items": model.num_items, "max_history": self.max_history, "dim": model.dim,
            "layers": len(model.layers), "num_steps": model.num_steps, "default_num_samples": self.default_num_samples,
            "default_algorithm": self.default_algorithm, "batch_size": self.batch_size,
            "share_history": self.shares_history,
        }

    # ----------------------------------------------------------------- ids
    def lookup(self, original_items: Sequence) -> tuple[list[int], list]:
        """(dense ids, unknown original ids) of one history given in the dataset's own item ids
        (ints or strings: 1 and "1" are the same id). Without an id map the ids are the model's."""
        if self.item_ids is None:
            return list(original_items), []
        if self._dense_of is None:  # built on first use: a dict over a large catalog costs memory
            self._dense_of = {item: index + 1 for index, item in enumerate(self.item_ids)}
            self._dense_of.update({str(item): index + 1 for index, item in enumerate(self.item_ids)})
        dense, unknown = [], []
        for item in original_items:
            key = item if item in self._dense_of else str(item)
            if key in self._dense_of:
                dense.append(self._dense_of[key])
            else:
                unknown.append(item)
        return dense, unknown

    def to_dense(self, histories: Sequence[Sequence]) -> list[list[int]]:
        """Dense ids of histories given in the dataset's own item ids; UnknownItemsError names the
        first history with ids the catalog does not know."""
        histories = [history_items(history, f"histories[{row}]") for row, history in enumerate(histories)]
        dense_histories = []
        for row, history in enumerate(histories):
            dense, unknown = self.lookup(history)
            if unknown:
                raise UnknownItemsError(row, unknown)
            dense_histories.append(dense)
        return dense_histories

    def original_ids(self, dense_ids: torch.Tensor) -> list[list]:
        if self.item_ids is None:
            return dense_ids.tolist()
        return [[self.item_ids[i - 1] for i in row] for row in dense_ids.tolist()]

    def _dense_arrays(self, histories) -> list[np.ndarray]:
        """Validated dense histories as int64 arrays, oldest first (a 2-D tensor or array is read
        as left-padded rows: 0 is padding there)."""
        if isinstance(histories, (torch.Tensor, np.ndarray)):
            table = histories.detach().cpu().numpy() if isinstance(histories, torch.Tensor) else histories
            if table.ndim != 2:
                raise ValueError(f"a history table must be 2-D [users, length], got shape {tuple(table.shape)}")
            histories = [row[row != PAD] for row in table]
        arrays = []
        for row, history in enumerate(histories):
            items = history_items(history, f"histories[{row}]")
            array = np.asarray(items)
            if array.size == 0:
                arrays.append(np.zeros(0, dtype=np.int64))
                continue
            if array.dtype.kind not in "iu":  # strs: original ids, which dense histories cannot hold
                position = next(p for p, item in enumerate(items) if not isinstance(item, (int, np.integer)))
                raise ValueError(f"histories[{row}][{position}] = {items[position]!r} is not an integer item id")
            if array.min() < 1 or array.max() > self.num_items:
                position = int(np.flatnonzero((array < 1) | (array > self.num_items))[0])
                raise ValueError(f"histories[{row}][{position}] = {int(array[position])} is out of range: dense "
                                 f"item ids lie in [1, {self.num_items}]")
            arrays.append(array.astype(np.int64, copy=False))
        return arrays

    # ----------------------------------------------------------------- options
    def _check_k(self, k, arrays, exclude_seen) -> None:
        check_k(k, self.num_items)
        check_flag("exclude_seen", exclude_seen)
        if exclude_seen:
            check_room(k, self.num_items, arrays)

    def _options(self, num_samples, algorithm, stride, seed=0) -> tuple[int, str]:
        num_samples = self.default_num_samples if num_samples is None else num_samples
        algorithm = self.default_algorithm if algorithm is None else algorithm
        if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples < 1:
            raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        check_seed(seed)
        if not self.model.diffusion:
            return 1, "alg3"  # SASRec: one deterministic pass
        if algorithm == "alg2":
            if self.model.noised_positions != 1:
                raise ValueError("Alg. 2 is defined for target-only noising (noised_positions = 1)")
            reverse_steps(self.model.num_steps, stride)  # validates the stride
        return num_samples, algorithm

    @renamed_keywords(**NUM_SAMPLES_RENAME)
    def check_options(self, num_samples: int | None = None, algorithm: str | None = None,
                      stride: int = 1) -> tuple[int, str]:
        """(num_samples, algorithm) as a call would use them; ValueError for a bad num_samples, algorithm or
        stride. SASRec models always run one deterministic pass: (1, "alg3")."""
        return self._options(num_samples, algorithm, stride)

    # ----------------------------------------------------------------- the item layer
    def _float_item_layer(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The item layer (W, b) in float32 (the seed ops take one float dtype for hidden, W and b;
        under bf16 autocast the tied W comes out of a matmul in bf16), checked finite."""
        with torch.inference_mode():
            weight, bias = self.model.item_layer()
            weight, bias = weight.float(), None if bias is None else bias.float()
        check_item_layer_finite(weight, bias)
        return weight, bias

    # ----------------------------------------------------------------- batching
    def _batch_rows(self, users: int) -> int:
        return users

    def _batch_length(self, arrays: list[np.ndarray]) -> int:
        length = self.model.max_len
        if self.trims_padding and arrays:
            longest = max(min(len(a), self.max_history) for a in arrays)
            length = max(longest + 1, self.suffix_length)
        return length

    def _host_batch(self, arrays: list[np.ndarray], exclude_seen: bool):
        """CPU tensors of one batch: ids [rows, L] (left padded, then the [unk] slot) and the
        exclusion CSR (padding always, the history too with exclude_seen)."""
        users = len(arrays)
        rows = self._batch_rows(users)
        length = self._batch_length(arrays)
        ids = np.zeros((rows, length), dtype=np.int64)
        ids[:, -1] = self.model.unk_id
        for row, array in enumerate(arrays):
            recent = array[-(length - 1):] if length > 1 else array[:0]
            if len(recent):
                ids[row, length - 1 - len(recent):length - 1] = recent
        offsets, excluded = exclusion(arrays, users, exclude_seen)
        return torch.from_numpy(ids), offsets, excluded

    def _order(self, arrays: list[np.ndarray]) -> np.ndarray:
        if not self.sorts_by_length:
            return np.arange(len(arrays))
        return np.argsort([-min(len(a), self.max_history) for a in arrays], kind="stable")

    def _timed(self, phase: str, start: float) -> float:
        if self.device.type == "cuda" and self.profile:
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.last_timings[phase] = self.last_timings.get(phase, 0.0) + now - start
        return now


class EngineBase(EngineInputs):
    """Alg. 3 / Alg. 2 over EngineInputs: the step plans, the noise, the reverse chain, and the
    public top-k, target ranks and h0 predictions; subclasses choose the denoiser pass and the
    scoring (InferenceEngine here; the eager baseline in benchmarks/eager_engine.py)."""

    # ----------------------------------------------------------------- the denoiser
    def _plan(self, algorithm: str, rows: int, num_samples: int, stride: int) -> StepPlan:
        key = (algorithm, rows, num_samples, stride)
        plan = self._plans.get(key)
        if plan is not None:
            self._plans.move_to_end(key)
            return plan
        model = self.model
        if not model.diffusion:
            visited = [0]
        elif algorithm == "alg3":
            visited = [model.num_steps]
        else:
            visited = reverse_steps(model.num_steps, stride)
        rows_steps = [torch.full((rows,), t, dtype=torch.int64, device=self.device) for t in visited]
        seq_steps = [torch.full((rows * num_samples,), t, dtype=torch.int64, device=self.device) for t in visited]
        plan = StepPlan(visited, rows_steps, seq_steps)
        if algorithm == "alg2" and model.diffusion:
            # As inference.predict_h0: the chain runs on input_scale * h0 (model.DSR).
            scale = model.input_scale
            plan.coefficients = [posterior(model, t, s) for t, s in pairwise(visited)]
            plan.coefficients = [(c0 * scale, cn, var**0.5) for c0, cn, var in plan.coefficients]
            n = model.num_steps
            plan.start = (float(model.schedule.sqrt_abar[n]) * scale, float(model.schedule.sqrt_one_minus_abar[n]))
        self._plans[key] = plan
        while len(self._plans) > 32:
            self._plans.popitem(last=False)
        return plan

    def _make_pass(self, ids: torch.Tensor, num_samples: int):
        raise NotImplementedError

    def _run_denoiser(self, ids: torch.Tensor, noise: torch.Tensor, num_samples: int, algorithm: str,
                      plan: StepPlan) -> torch.Tensor:
        """h0 predictions [rows * S, d] for device inputs `ids` [rows, L] and the call's noise."""
        denoiser = self._make_pass(ids, num_samples)
        if algorithm == "alg3" or not self.model.diffusion:
            return denoiser.one_pass(noise if self.model.noised_positions else None, plan)
        last = len(plan.steps) - 1
        signal, noise_scale = plan.start
        h = signal * denoiser.slot_vectors.to(self.state_dtype) + noise_scale * noise[0]
        for index in range(len(plan.steps)):
            f = denoiser.denoise_slot(h, index, plan)
            if index == last:
                return f  # the last visited step predicts h0 directly
            coef_h0, coef_hn, sigma = plan.coefficients[index]
            h = coef_h0 * f.to(self.state_dtype) + coef_hn * h + sigma * noise[index + 1]
        raise AssertionError("a plan visits at least one step")

    def _draw_noise(self, rows: int, num_samples: int, algorithm: str, plan: StepPlan, generator) -> torch.Tensor:
        """The call's Gaussian draws for `rows` users, in inference.predict_h0's shapes, flattened
        to the sequence layout: Alg. 3 [rows * S, K, d] (compute dtype), Alg. 2 [m, rows * S, d]."""
        model, dim = self.model, self.model.dim
        if algorithm == "alg3" or not model.diffusion:
            k = model.noised_positions
            noise = torch.randn(rows, num_samples, k, dim, generator=generator, device=self.device, dtype=self.dtype)
            return noise.reshape(rows * num_samples, k, dim)
        noise = torch.randn(len(plan.steps), rows, num_samples, dim, generator=generator, device=self.device,
                            dtype=self.state_dtype)
        return noise.reshape(len(plan.steps), rows * num_samples, dim)

    def _denoise(self, ids: torch.Tensor, users: int, num_samples: int, algorithm: str, stride: int,
                 noise: torch.Tensor) -> torch.Tensor:
        """[users, S, d] predictions of h0; `ids` may hold extra padding rows (graph shapes)."""
        rows = ids.shape[0]
        plan = self._plan(algorithm, rows, num_samples, stride)
        h0 = self._run_denoiser(ids, noise, num_samples, algorithm, plan)
        return h0.reshape(rows, num_samples, -1)[:users]

    # ----------------------------------------------------------------- scoring
    def _score(self, hidden: torch.Tensor, k: int, offsets: torch.Tensor, excluded: torch.Tensor):
        raise NotImplementedError

    # ----------------------------------------------------------------- public API
    @renamed_keywords(**NUM_SAMPLES_RENAME)
    def recommend(self, histories: Sequence[Sequence], k: int = 10, exclude_seen: bool = True,
                  num_samples: int | None = None, algorithm: str | None = None, stride: int = 1, seed: int = 0) -> TopK:
        """Top-k for each history given in the dataset's own item ids (oldest first).

        num_samples: S, the noise draws averaged (default: the checkpoint's); algorithm: "alg3"
        (one pass per draw, default) or "alg2" (the reverse process; `stride` > 1 visits every stride-th step, DDIM-style);
        exclude_seen: never return an item of the user's history. Histories longer than T - 1
        are read from their most recent T - 1 items (all of them are excluded)."""
        dense = self.to_dense(histories)
        ids, scores = self.recommend_dense(dense, k=k, exclude_seen=exclude_seen, num_samples=num_samples,
                                           algorithm=algorithm, stride=stride, seed=seed)
        return TopK(self.original_ids(ids), scores, ids)

    @renamed_keywords(**NUM_SAMPLES_RENAME)
    def recommend_dense(self, histories, k: int = 10, exclude_seen: bool = True, num_samples: int | None = None,
                        algorithm: str | None = None, stride: int = 1, seed: int = 0):
        """As `recommend`, with histories and results in the model's dense ids (1..num_items):
        (ids [B, k] int64, scores [B, k] float32), on the CPU."""
        arrays = self._dense_arrays(histories)
        self._check_k(k, arrays, exclude_seen)
        num_samples, algorithm = self._options(num_samples, algorithm, stride, seed)
        users = len(arrays)
        out_ids = torch.zeros(users, k, dtype=torch.int64)
        out_scores = torch.zeros(users, k, dtype=torch.float32)
        if users == 0:
            return out_ids, out_scores
        if not self._item_layer_finite:
            self._float_item_layer()  # once per engine: an inference engine's weights do not change
            self._item_layer_finite = True
        with self._lock, torch.inference_mode():
            self.last_timings = {}
            started = time.perf_counter()
            generator = torch.Generator(device=self.device).manual_seed(seed)
            order = self._order(arrays)
            batches = [order[start:start + self.batch_size] for start in range(0, users, self.batch_size)]
            pending = []
            upcoming = self._transfers.send(self._host_batch([arrays[i] for i in batches[0]], exclude_seen))
            for index, rows in enumerate(batches):
                mark = time.perf_counter()
                sent = upcoming
                if index + 1 < len(batches):  # prepared and copied while this batch computes
                    upcoming = self._transfers.send(
                        self._host_batch([arrays[i] for i in batches[index + 1]], exclude_seen))
                ids, offsets, excluded = self._transfers.receive(sent)
                mark = self._timed("prepare_s", mark)
                plan = self._plan(algorithm, ids.shape[0], num_samples, stride)
                noise = self._draw_noise(len(rows), num_samples, algorithm, plan, generator)
                hidden = self._denoise_with_noise(ids, len(rows), num_samples, algorithm, stride, noise)
                if self.device.type == "cpu":  # on CUDA the seed ops' device-side checks refuse NaN/Inf, unsynced
                    check_finite_predictions(hidden, rows)
                mark = self._timed("denoise_s", mark)
                values, items = self._score(hidden, k, offsets, excluded)
                pending.append((rows, self._transfers.fetch((items, values.float()))))
                self._timed("score_s", mark)
            for rows, fetched in pending:
                items, values = _Transfers.wait(fetched)
                index = torch.from_numpy(np.asarray(rows, dtype=np.int64))
                out_ids[index] = items
                out_scores[index] = values
            self.last_timings["total_s"] = time.perf_counter() - started
        return out_ids, out_scores

    @renamed_keywords(**NUM_SAMPLES_RENAME)
    def target_ranks(self, histories, targets, exclude_seen: bool = True, num_samples: int | None = None,
                     algorithm: str | None = None, stride: int = 1, seed: int = 0, seen_offsets=None,
                     seen_items=None, progress: bool = False, shard: tuple[int, int] = (0, 1)) -> np.ndarray:
        """0-based pessimistic rank of each target under full ranking (ops.seed_target_rank), [U]
        int64, without a [U, V] score matrix: the evaluation of every split (training's validation,
        `diffrec evaluate`, the benchmarks).

        `histories`: a left-padded [U, H] tensor or array, or lists of dense ids; `targets` [U]
        dense ids. With exclude_seen, each user's seen items leave the ranking: the CSR
        `seen_offsets` [U + 1] / `seen_items` when given (the untruncated history), else the items
        of `histories`. Padding (0) is never counted.

        Users go in their given order, in batches of `batch_size`; batch i draws its noise from a
        generator seeded with `inference.batch_seed(seed, i)`, so a batch's ranks do not depend on
        which batches were computed before it. `shard = (r, P)` computes only the batches i with
        i % P == r (the ranks of those users, in order; see `inference.shard_users`), which is how
        evaluation is split over P processes."""
        arrays, targets, seen_offsets, seen_items = check_rank_inputs(
            self.num_items, histories, targets, exclude_seen=exclude_seen, seed=seed, seen_offsets=seen_offsets,
            seen_items=seen_items, shard=shard)
        num_samples, algorithm = self._options(num_samples, algorithm, stride, seed)
        weight, bias = self._float_item_layer()
        starts = shard_starts(len(arrays), self.batch_size, shard)
        if progress:
            from tqdm.auto import tqdm

            starts = tqdm(starts, desc="rank", leave=False, unit="batch", disable=None)
        ranks = []
        with self._lock, torch.inference_mode():
            generator = torch.Generator(device=self.device)
            for start in starts:
                stop = min(start + self.batch_size, len(arrays))
                ids, offsets, excluded = self._host_batch(arrays[start:stop], exclude_seen and seen_offsets is None)
                if exclude_seen and seen_offsets is not None:
                    offsets, excluded = seen_exclusion(seen_offsets, seen_items, start, stop)
                ids, offsets, excluded = (t.to(self.device) for t in (ids, offsets, excluded))
                generator.manual_seed(batch_seed(seed, start // self.batch_size))
                plan = self._plan(algorithm, ids.shape[0], num_samples, stride)
                noise = self._draw_noise(stop - start, num_samples, algorithm, plan, generator)
                hidden = self._denoise_with_noise(ids, stop - start, num_samples, algorithm, stride, noise).float()
                check_finite_predictions(hidden, np.arange(start, stop))
                rank = ops.seed_target_rank(hidden, weight, bias, targets[start:stop].to(self.device), offsets,
                                            excluded)
                ranks.append(rank.cpu())
        return torch.cat(ranks).numpy() if ranks else np.zeros(0, dtype=np.int64)

    def _denoise_with_noise(self, ids, users, num_samples, algorithm, stride, noise):
        return self._denoise(ids, users, num_samples, algorithm, stride, noise)

    @renamed_keywords(**NUM_SAMPLES_RENAME)
    def predict_h0(self, histories, num_samples: int | None = None, algorithm: str | None = None, stride: int = 1,
                   noise: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
        """f_theta's predictions of h0 for dense histories, one batch, in the given order:
        [B, S, d] float32 on the CPU. `noise` fixes the draws, in inference.predict_h0's shapes
        (Alg. 3 [B, S, K, d], Alg. 2 [m, B, S, d], m = visited steps)."""
        arrays = self._dense_arrays(histories)
        num_samples, algorithm = self._options(num_samples, algorithm, stride, seed)
        users = len(arrays)
        if users == 0:
            raise ValueError("no histories: give at least one")
        with self._lock, torch.inference_mode():
            ids, _, _ = self._host_batch(arrays, False)
            ids = ids.to(self.device)
            plan = self._plan(algorithm, ids.shape[0], num_samples, stride)
            if noise is None:
                generator = torch.Generator(device=self.device).manual_seed(seed)
                flat = self._draw_noise(users, num_samples, algorithm, plan, generator)
            else:
                flat = self._given_noise(noise, users, num_samples, algorithm, plan)
            hidden = self._denoise_with_noise(ids, users, num_samples, algorithm, stride, flat)
            return hidden.float().cpu().clone()

    def _given_noise(self, noise: torch.Tensor, users: int, num_samples: int, algorithm: str, plan: StepPlan):
        dim, k = self.model.dim, self.model.noised_positions
        if algorithm == "alg3" or not self.model.diffusion:
            expected = (users, num_samples, k, dim)
            flat_shape, dtype = (users * num_samples, k, dim), self.dtype
        else:
            expected = (len(plan.steps), users, num_samples, dim)
            flat_shape, dtype = (len(plan.steps), users * num_samples, dim), self.state_dtype
        if tuple(noise.shape) != expected:
            raise ValueError(f"noise must have shape {expected}, got {tuple(noise.shape)}")
        return noise.to(self.device, dtype).reshape(flat_shape)


class InferenceEngine(EngineBase):
    """The fast engine (see the module docstring). Options:

    share_history: compute the history once per user for all seeds (default: when attention is
        causal, the only case where it is exact).
    cuda_graphs: capture the denoiser per batch shape on CUDA (default True); batch rows are
        rounded up to a power of two and lengths to a multiple of 8 so that few shapes occur.
    sort_by_length: batch users of similar history length together (default True).
    scoring: how the catalog is ranked. "kernel": ops.seed_topk over catalog tiles, memory
        O(B * S * tile). "user_chunks": one pass per chunk of users, logits [c * S, V]
        (one GEMM), exp(logit - lse) in place, mean over seeds, top-k; c from
        `scoring_memory_bytes`. "auto" (default): the kernel. Since issue 14 the CPU kernel
        makes one pass with a certificate (a second pass only for users it cannot certify) and
        beats user chunks on the CPU too (2 threads, B = 64, S = 10, d = 256, V = 100,000, seeds
        around one vector per user, load average 3: kernel 0.96 / 1.24 s, user chunks 1.36 /
        1.52 s in two rounds, same ids); user chunks stay selectable for that comparison.
    """

    name = "fused"

    def __init__(self, model: DSR, item_ids: Sequence | None = None, *, share_history: bool | None = None,
                 cuda_graphs: bool = True, sort_by_length: bool = True, max_graphs: int = 16,
                 scoring: str = "auto", scoring_memory_bytes: int = 256 << 20, **options):
        super().__init__(model, item_ids, **options)
        if scoring not in SCORING_METHODS:
            raise ValueError(f"scoring must be one of {SCORING_METHODS}, got {scoring!r}")
        if not isinstance(scoring_memory_bytes, int) or scoring_memory_bytes < 1:
            raise ValueError(f"scoring_memory_bytes must be a positive int, got {scoring_memory_bytes!r}")
        self.scoring_memory_bytes = scoring_memory_bytes
        self.scoring = "kernel" if scoring == "auto" else scoring
        causal = self.model.causal
        if share_history and not causal:
            raise ValueError("share_history needs causal attention: with bidirectional attention the history "
                             "positions attend to the noised slot")
        self.shares_history = causal if share_history is None else bool(share_history)
        self.trims_padding = self.shares_history  # the model's own forward takes exactly T positions
        self.sorts_by_length = bool(sort_by_length)
        self.cuda_graphs = bool(cuda_graphs) and self.device.type == "cuda"
        self.max_graphs = max_graphs
        self._graphs: OrderedDict = OrderedDict()

    def describe(self) -> dict:
        return {**super().describe(), "cuda_graphs": self.cuda_graphs, "scoring": self.scoring}

    def _make_pass(self, ids, num_samples):
        pass_class = _SharedHistoryPass if self.shares_history else _FullSequencePass
        return pass_class(self, ids, num_samples)

    def _batch_rows(self, users: int) -> int:
        if not self.cuda_graphs:
            return users
        return min(1 << (users - 1).bit_length(), max(self.batch_size, users))

    def _batch_length(self, arrays) -> int:
        length = super()._batch_length(arrays)
        if self.cuda_graphs and self.trims_padding:
            length = min(-(-length // 8) * 8, self.model.max_len)
        return length

    def _denoise_with_noise(self, ids, users, num_samples, algorithm, stride, noise):
        if not self.cuda_graphs:
            return self._denoise(ids, users, num_samples, algorithm, stride, noise)
        rows = ids.shape[0]
        if rows > users:  # padding rows (empty histories) get zero noise; their outputs are dropped
            axis = 0 if algorithm == "alg3" or not self.model.diffusion else 1  # [rows*S, K, d] / [m, rows*S, d]
            extra = list(noise.shape)
            extra[axis] = (rows - users) * num_samples
            noise = torch.cat([noise, noise.new_zeros(extra)], dim=axis)
        graph = self._graph(ids, noise, num_samples, algorithm, stride)
        return graph(ids, noise).reshape(rows, num_samples, -1)[:users]

    def _graph(self, ids, noise, num_samples, algorithm, stride) -> _CapturedDenoiser:
        key = (algorithm, tuple(ids.shape), num_samples, stride)
        graph = self._graphs.get(key)
        if graph is not None:
            self._graphs.move_to_end(key)
            return graph
        plan = self._plan(algorithm, ids.shape[0], num_samples, stride)
        short = plan.truncated(2)

        def run(static_ids, static_noise):
            return self._run_denoiser(static_ids, static_noise, num_samples, algorithm, plan)

        def warmup(static_ids, static_noise):
            return self._run_denoiser(static_ids, static_noise, num_samples, algorithm, short)

        graph = _CapturedDenoiser(run, ids, noise, warmup, keep_alive=(plan,))
        self._graphs[key] = graph
        while len(self._graphs) > self.max_graphs:
            self._graphs.popitem(last=False)
        return graph

    def _score(self, hidden, k, offsets, excluded):
        weight, bias = self.model.item_layer()
        hidden = hidden.to(weight.dtype)
        if self.scoring == "kernel":
            return ops.seed_topk(hidden, weight, bias, k, offsets, excluded)
        return self._score_user_chunks(hidden, weight, bias, k, offsets, excluded)

    def _score_user_chunks(self, hidden, weight, bias, k, offsets, excluded):
        """The kernel's contract (seed-averaged probability, exclusions, ties to the smaller id)
        in one pass over the catalog per chunk of users."""
        users, num_samples, dim = hidden.shape
        size = weight.shape[0]
        chunk = max(1, self.scoring_memory_bytes // (num_samples * size * 4))
        counts = offsets[1:] - offsets[:-1]
        values, items = [], []
        for start in range(0, users, chunk):
            stop = min(users, start + chunk)
            logits = torch.nn.functional.linear(hidden[start:stop].reshape(-1, dim), weight, bias).float()
            logits -= torch.logsumexp(logits, dim=-1, keepdim=True)
            probs = logits.exp_().reshape(stop - start, num_samples, size).mean(dim=1)
            rows = torch.repeat_interleave(torch.arange(stop - start, device=probs.device), counts[start:stop])
            probs[rows, excluded[int(offsets[start]):int(offsets[stop])]] = float("-inf")
            top_values, top_items = torch.topk(probs, k, dim=-1)
            # ties to the smaller id, as the kernel: sort by id, then stably by value
            by_id = torch.argsort(top_items, dim=-1)
            top_values, top_items = top_values.gather(1, by_id), top_items.gather(1, by_id)
            by_value = torch.sort(top_values, dim=-1, descending=True, stable=True).indices
            values.append(top_values.gather(1, by_value))
            items.append(top_items.gather(1, by_value))
        return torch.cat(values), torch.cat(items)
