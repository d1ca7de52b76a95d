"""Catalog sharding across processes, on torch.distributed (launched with torchrun).

Each process (rank) holds one contiguous slice of the item layer, `weight[start:stop]` [V_r, d]
and `bias[start:stop]` [V_r], while the user side (`hidden`, targets, exclusion lists) is
replicated: every rank of the group passes the same values. The catalog-wide quantities are
combined with collectives of the process group:

- per-(user, seed) log-normaliser: each rank computes the log-sum-exp over its slice (the cheap
  tiled pass of `ops.catalog_xent` with every target -1), the slices are all-gathered and combined
  with a max-shifted log-sum-exp (`torch.logsumexp` over the rank axis). Every rank combines the
  same gathered tensor in the same order, so all ranks hold bit-identical global values;
- seed top-k: each rank takes its local top-min(k, V_r) of the seed-averaged probability under the
  global lse (`ops.seed_topk(..., lse=...)`), the candidates are all-gathered and merged into the
  exact global top-k with the op's ordering rule (larger value first, then smaller item id);
- target rank: the target's item row is sent from its owning rank to all ranks, each rank counts
  its items that beat the target (`ops.seed_target_rank` on its slice plus the target's row), and
  the counts are summed;
- catalog cross-entropy (differentiable): loss = lse_global - target_logit, where the target logit
  comes from the owning rank. Backward: the weight and bias gradients of a slice are computed and
  kept on its rank (each rank owns its slice: they are not reduced); the gradient of `hidden` is a
  sum over slices, so each rank's partial gradient is all-reduced (sum).

Bad input is detected collectively: each call first exchanges a small row of shape facts with
every rank, so a problem seen on one rank (wrong shape, shards that overlap or leave a gap,
k > V, ...) raises `ShardingError` on every rank instead of leaving the others waiting in a
collective forever. Values of replicated tensors are not compared across ranks (only their shapes,
dtypes and sizes): passing different `hidden` on different ranks is a silent error.

Launch: `torchrun --nproc_per_node=P your_script.py`, then `init_process_group_from_env()`
(gloo on CPU, nccl on CUDA). See docs/distributed.md.
"""

from __future__ import annotations

import operator
import os
import sys
from dataclasses import dataclass
from datetime import timedelta
from typing import NoReturn

import torch
import torch.distributed as dist

from . import ops, reference
from .errors import ShardingError

__all__ = [
    "CatalogShard",
    "DistributedContext",
    "ShardingError",
    "exit_without_teardown",
    "init_process_group_from_env",
    "rank_and_world_size",
    "shard_catalog",
    "shard_range",
    "sharded_catalog_xent",
    "sharded_seed_lse",
    "sharded_seed_topk",
    "sharded_target_rank",
]


# ----------------------------------------------------------------------------- shards


def shard_range(num_items: int, rank: int, world_size: int) -> tuple[int, int]:
    """Items [start, stop) of `rank`'s shard of a catalog of `num_items` items.

    Rule: contiguous, balanced, in rank order. With V = q * P + r (0 <= r < P), ranks 0 .. r - 1
    hold q + 1 items and ranks r .. P - 1 hold q, so shard sizes differ by at most one and
    start = rank * q + min(rank, r). Every shard must hold at least one item (V >= P), because
    the ops need a non-empty weight.
    """
    num_items, rank, world_size = operator.index(num_items), operator.index(rank), operator.index(world_size)
    if world_size < 1:
        raise ValueError(f"world_size = {world_size} must be >= 1")
    if not 0 <= rank < world_size:
        raise ValueError(f"rank = {rank} must be in [0, world_size = {world_size})")
    if num_items < world_size:
        raise ValueError(f"a catalog of {num_items} items cannot be cut into {world_size} non-empty shards")
    size, larger = divmod(num_items, world_size)
    start = rank * size + min(rank, larger)
    return start, start + size + (1 if rank < larger else 0)


@dataclass(frozen=True)
class CatalogShard:
    """One rank's slice of the item layer: rows [start, stop) of weight (and bias)."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    start: int
    stop: int


def shard_catalog(weight: torch.Tensor, bias: torch.Tensor | None = None, group=None,
                  rank: int | None = None, world_size: int | None = None) -> CatalogShard:
    """This rank's slice (views, no copy) of a full item layer, cut with `shard_range`.

    rank and world_size default to this process's place in `group` (the default group if None).
    For training, copy the slice into its own parameter (`nn.Parameter(shard.weight.clone())`),
    so that the full layer can be freed.
    """
    if rank is None or world_size is None:
        rank, world_size = _rank_and_size(group)
    start, stop = shard_range(weight.shape[0], rank, world_size)
    return CatalogShard(weight[start:stop], None if bias is None else bias[start:stop], start, stop)


# ----------------------------------------------------------------------------- process group


@dataclass(frozen=True)
class DistributedContext:
    rank: int
    world_size: int
    local_rank: int
    backend: str
    device: torch.device


def init_process_group_from_env(backend: str | None = None,
                                timeout: timedelta | None = None) -> DistributedContext:
    """Join the default process group from the variables torchrun sets (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT).

    backend: "gloo" or "nccl"; by default nccl when CUDA is available, else gloo. With nccl each
    process uses GPU LOCAL_RANK (made the current device). If the default group already exists,
    it is reused. Tear down with `torch.distributed.destroy_process_group()`.
    """
    if not dist.is_available():
        raise RuntimeError("this PyTorch build has no torch.distributed")
    missing = [name for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing and not dist.is_initialized():
        raise RuntimeError(
            f"environment variables {', '.join(missing)} are not set: launch with torchrun, e.g. "
            "`torchrun --nproc_per_node=2 script.py` (or set them by hand)"
        )
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend is None:
        if dist.is_initialized():
            backend = dist.get_backend()
        else:
            backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        if not torch.cuda.is_available():
            raise RuntimeError("backend nccl needs CUDA, which is not available; use gloo")
        if local_rank >= torch.cuda.device_count():
            raise RuntimeError(f"LOCAL_RANK = {local_rank} but only {torch.cuda.device_count()} GPUs are visible")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)  # collectives and all_gather_object use the current device
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        kwargs = {"backend": backend, "init_method": "env://"}
        if timeout is not None:
            kwargs["timeout"] = timeout
        if backend == "nccl":
            kwargs["device_id"] = device  # binds the communicator to this GPU up front
        dist.init_process_group(**kwargs)
    return DistributedContext(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(), device)


def exit_without_teardown(code: int = 0) -> NoReturn:
    """End this process now with exit status `code`: destroy the default process group (if any),
    flush stdout and stderr, then `os._exit`, skipping the interpreter's teardown.

    Why: once a DistributedDataParallel has been built, torch 2.14 keeps the process group alive
    after destroy_process_group() (its Gloo worker threads keep running), and a worker thread that
    releases a collective's tensors while the interpreter shuts down needs the GIL and aborts the
    process ("terminate called without an active exception", SIGABRT; seen in about 1 of 10
    two-process test runs, after every result had been written). Call it last, once files are
    closed; `diffrec train` under torchrun does."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_and_world_size() -> tuple[int, int]:
    """(rank, world size) of this process in the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _rank_and_size(group) -> tuple[int, int]:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "torch.distributed is not initialised: launch with torchrun and call "
            "diffrec_ext.distributed.init_process_group_from_env() (or dist.init_process_group) first"
        )
    return dist.get_rank(group), dist.get_world_size(group)


# ----------------------------------------------------------------------------- collective checks


_DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.bfloat16: 2, torch.float16: 3}
# Names of the facts each call checks to be equal on every rank (the order of the exchanged row).
_SEED_FACTS = ("B", "d", "dtype", "has bias", "S")
_EXCLUSION_FACTS = ("has exclusions", "exclusion count")


@dataclass(frozen=True)
class _Layout:
    """What every rank learnt about the group from the first exchange of a call."""

    rank: int
    world_size: int
    starts: tuple[int, ...]  # by rank
    stops: tuple[int, ...]
    num_items: int  # V, the whole catalog

    @property
    def start(self) -> int:
        return self.starts[self.rank]

    @property
    def local_items(self) -> int:
        return self.stops[self.rank] - self.starts[self.rank]

    @property
    def ranks_by_start(self) -> list[int]:
        return sorted(range(self.world_size), key=lambda r: self.starts[r])


def _gather(tensor: torch.Tensor, group, world_size: int) -> torch.Tensor:
    """all_gather of equal-shaped tensors, stacked by rank: [P, *tensor.shape]."""
    parts = [torch.empty_like(tensor) for _ in range(world_size)]
    dist.all_gather(parts, tensor.contiguous(), group=group)
    return torch.stack(parts)


def _raise_if_any_rank_failed(failed: torch.Tensor, local_error: str | None, group, world_size: int,
                              what: str) -> None:
    """Every rank sees the same `failed` flags (one per rank), so all take the same branch: the
    messages are gathered only when some rank failed, then every rank raises the same error."""
    if not bool(failed.any()):
        return
    messages: list[str | None] = [None] * world_size
    dist.all_gather_object(messages, local_error, group=group)
    details = "; ".join(f"rank {r}: {m}" for r, m in enumerate(messages) if m)
    raise ShardingError(f"{what}: {details}")


def _exchange_layout(what: str, group, device: torch.device, start: int, stop: int, names: tuple[str, ...],
                     facts: dict[str, int] | None, local_error: str | None) -> _Layout:
    """One all_gather of [failed, start, stop, *facts] per rank; raises on every rank when a rank
    failed its local checks, when a fact differs across ranks (replicated inputs must agree), or
    when the shards do not tile [0, V) exactly (contiguous, no overlap, no gap)."""
    rank, world_size = _rank_and_size(group)
    values = [0] * len(names) if facts is None else [facts[name] for name in names]  # same length everywhere
    row = torch.tensor([int(local_error is not None), start, stop, *values], dtype=torch.int64)
    table = _gather(row.to(device), group, world_size).cpu()
    _raise_if_any_rank_failed(table[:, 0] != 0, local_error, group, world_size, what)
    for column, name in enumerate(names, start=3):
        values = table[:, column]
        if bool((values != values[0]).any()):
            raise ShardingError(
                f"{what}: {name} differs across ranks ({values.tolist()}, by rank); the user-side "
                "inputs must be the same on every rank"
            )
    starts, stops = tuple(table[:, 1].tolist()), tuple(table[:, 2].tolist())
    expected = 0
    for r in sorted(range(world_size), key=lambda r: starts[r]):
        if starts[r] != expected:
            shards = ", ".join(f"rank {q}: [{starts[q]}, {stops[q]})" for q in range(world_size))
            kind = "overlap" if starts[r] < expected else "leave a gap"
            raise ShardingError(
                f"{what}: the shards {kind} at item {min(expected, starts[r])} ({shards}); the "
                "shards of the ranks must be contiguous, disjoint and cover [0, V) (see shard_range)"
            )
        expected = stops[r]
    return _Layout(rank, world_size, starts, stops, expected)


def _local_checks(fn) -> tuple[dict[str, int] | None, str | None]:
    """Run a rank's own checks, turning a ValueError into a message for the collective check."""
    try:
        return fn(), None
    except (ValueError, TypeError) as error:
        return None, str(error)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"{value.dtype} tensor of shape {list(value.shape)} on {value.device}"
    return type(value).__name__


def _check_tensor(name: str, value, shape: list[int], dtype: torch.dtype, device: torch.device,
                  shape_name: str) -> None:
    """`value` is a tensor of exactly this shape, dtype and device (shape_name, e.g. "[V_r, d]",
    goes into the message)."""
    wanted = f"{shape_name} = {shape} {dtype} on {device}"
    _require(isinstance(value, torch.Tensor) and list(value.shape) == shape and value.dtype == dtype
             and value.device == device, f"{name} must be {wanted}, got {_describe(value)}")


def _check_item_layer(hidden, weight_shard, bias_shard, shard_start, seeded: bool) -> dict[str, int]:
    shape_name = "[B, S, d]" if seeded else "[B, d]"
    _require(isinstance(hidden, torch.Tensor) and hidden.dtype in _DTYPE_CODES
             and hidden.dim() == (3 if seeded else 2) and hidden.numel() > 0,
             f"hidden must be a non-empty {shape_name} float32, float64, bfloat16 or float16 tensor, "
             f"got {_describe(hidden)}")
    dim = hidden.shape[-1]
    _require(isinstance(weight_shard, torch.Tensor) and weight_shard.dim() == 2 and weight_shard.shape[1] == dim,
             f"weight_shard must be [V_r, d] with d = {dim}, got {_describe(weight_shard)}")
    local_items = weight_shard.shape[0]
    _require(local_items > 0, "weight_shard must hold at least one item (V_r > 0)")
    _check_tensor("weight_shard", weight_shard, [local_items, dim], hidden.dtype, hidden.device, "[V_r, d]")
    if bias_shard is not None:
        _check_tensor("bias_shard", bias_shard, [local_items], hidden.dtype, hidden.device, "[V_r]")
    _require(_is_int(shard_start) and shard_start >= 0, f"shard_start must be an int >= 0, got {shard_start!r}")
    facts = {"B": hidden.shape[0], "d": dim, "dtype": _DTYPE_CODES[hidden.dtype],
             "has bias": int(bias_shard is not None)}
    if seeded:
        facts["S"] = hidden.shape[1]
    return facts


def _check_targets(targets, hidden) -> None:
    _check_tensor("targets", targets, [hidden.shape[0]], torch.int64, hidden.device, "[B]")


def _is_int(value) -> bool:
    try:
        operator.index(value)
        return not isinstance(value, bool)
    except TypeError:
        return False


def _check_exclusion_structure(exclude_offsets, exclude_ids, batch: int, device) -> dict[str, int]:
    """The CSR layout of an exclusion list; the id range needs V and is checked later."""
    _require((exclude_offsets is None) == (exclude_ids is None),
             "exclude_offsets and exclude_ids must be given together")
    if exclude_offsets is None:
        return {"has exclusions": 0, "exclusion count": 0}
    _require(isinstance(exclude_ids, torch.Tensor) and exclude_ids.dim() == 1,
             f"exclude_ids must be a 1-D tensor, got {_describe(exclude_ids)}")
    nnz = exclude_ids.shape[0]
    _check_tensor("exclude_ids", exclude_ids, [nnz], torch.int64, device, "[nnz]")
    _check_tensor("exclude_offsets", exclude_offsets, [batch + 1], torch.int64, device, "[B + 1]")
    _require(int(exclude_offsets[0]) == 0, f"exclude_offsets[0] = {int(exclude_offsets[0])} must be 0")
    _require(int(exclude_offsets[-1]) == nnz,
             f"exclude_offsets[{batch}] = {int(exclude_offsets[-1])} must equal len(exclude_ids) = {nnz}")
    _require(not bool((exclude_offsets[1:] < exclude_offsets[:-1]).any()),
             "exclude_offsets must be non-decreasing")
    return {"has exclusions": 1, "exclusion count": nnz}


def _check_ids_in_catalog(ids: torch.Tensor, num_items: int, name: str) -> str | None:
    bad = (ids < 0) | (ids >= num_items)
    if not bool(bad.any()):
        return None
    position = int(bad.nonzero()[0, 0])
    return f"{name}[{position}] = {int(ids[position])} is out of the catalog [0, {num_items - 1}]"


def _unique_exclusions(exclude_offsets, exclude_ids, batch: int, num_items: int):
    """(users, items) of the de-duplicated exclusion pairs, sorted by user then item."""
    counts = exclude_offsets[1:] - exclude_offsets[:-1]
    users = torch.repeat_interleave(torch.arange(batch, device=exclude_ids.device), counts)
    keys = torch.unique(users * num_items + exclude_ids)  # sorted
    return keys // num_items, keys % num_items


def _csr(users: torch.Tensor, items: torch.Tensor, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CSR of (user, item) pairs already grouped by user (users non-decreasing)."""
    offsets = torch.zeros(batch + 1, dtype=torch.int64, device=items.device)
    offsets[1:] = torch.cumsum(torch.bincount(users, minlength=batch), 0)
    return offsets, items


# ----------------------------------------------------------------------------- global lse


def _local_lse(hidden_rows: torch.Tensor, weight_shard, bias_shard) -> torch.Tensor:
    """Log-sum-exp of each row over this shard (accumulation dtype), by the tiled pass of
    catalog_xent with no target in the shard; no [rows, V_r] tensor is formed."""
    absent = torch.full((hidden_rows.shape[0],), -1, dtype=torch.int64, device=hidden_rows.device)
    with torch.no_grad():
        _, lse = ops.catalog_xent(hidden_rows, weight_shard, bias_shard, absent)
    return lse


def _gather_with_flag(local: torch.Tensor, failed: bool, group, world_size: int):
    """all_gather of a flat float tensor with this rank's failure flag appended (one collective
    instead of two): ([P, n], failed flags [P])."""
    flag = torch.tensor([1.0 if failed else 0.0], dtype=local.dtype, device=local.device)
    table = _gather(torch.cat([local.reshape(-1), flag]), group, world_size)
    return table[:, :-1], table[:, -1] != 0


def _seed_lse(what, hidden, weight_shard, bias_shard, layout: _Layout, global_error, group):
    """Global [B, S] log-normaliser; raises on every rank if any rank reports `global_error`."""
    batch, seeds, dim = hidden.shape
    local = _local_lse(hidden.reshape(batch * seeds, dim), weight_shard, bias_shard)
    gathered, failed = _gather_with_flag(local, global_error is not None, group, layout.world_size)
    _raise_if_any_rank_failed(failed.cpu(), global_error, group, layout.world_size, what)
    # Max-shifted combination of the per-shard values, in the same order on every rank.
    return torch.logsumexp(gathered, dim=0).view(batch, seeds)


def sharded_seed_lse(hidden: torch.Tensor, weight_shard: torch.Tensor, bias_shard: torch.Tensor | None,
                     shard_start: int, group=None) -> torch.Tensor:
    """Log-normaliser [B, S] (accumulation dtype) of each (user, seed) softmax over the whole
    sharded catalog, the same on every rank. Pass it as `lse` to the seed ops on a shard."""
    what = "sharded_seed_lse"
    facts, error = _local_checks(
        lambda: _check_item_layer(hidden, weight_shard, bias_shard, shard_start, seeded=True))
    layout = _exchange_layout(what, group, _device_of(hidden), *_span(shard_start, weight_shard, error),
                              _SEED_FACTS, facts, error)
    return _seed_lse(what, hidden, weight_shard, bias_shard, layout, None, group)


def _device_of(hidden) -> torch.device:
    return hidden.device if isinstance(hidden, torch.Tensor) else torch.device("cpu")


def _span(shard_start, weight_shard, error) -> tuple[int, int]:
    if error is not None:
        return 0, 0
    start = operator.index(shard_start)
    return start, start + weight_shard.shape[0]


# ----------------------------------------------------------------------------- seed top-k


def sharded_seed_topk(hidden: torch.Tensor, weight_shard: torch.Tensor, bias_shard: torch.Tensor | None,
                      k: int, shard_start: int, exclude_offsets: torch.Tensor | None = None,
                      exclude_ids: torch.Tensor | None = None, group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of the seed-averaged probability over a catalog sharded across the ranks.

    hidden [B, S, d] (replicated); weight_shard [V_r, d] and bias_shard [V_r] or None: items
    [shard_start, shard_start + V_r) of the catalog; k in [1, V]; exclusions: CSR with GLOBAL item
    ids (replicated), as in ops.seed_topk. Returns (values [B, k] in the accumulation dtype,
    global item ids [B, k] int64), sorted by value descending, ties by smaller id: the same on
    every rank, and equal to ops.seed_topk on the whole catalog up to float rounding (the global
    lse is combined from per-shard values). Collective: every rank of `group` must call it.
    """
    what = "sharded_seed_topk"

    def checks():
        facts = _check_item_layer(hidden, weight_shard, bias_shard, shard_start, seeded=True)
        _require(_is_int(k), f"k must be an int, got {k!r}")
        facts["k"] = operator.index(k)
        facts.update(_check_exclusion_structure(exclude_offsets, exclude_ids, hidden.shape[0], hidden.device))
        return facts

    facts, error = _local_checks(checks)
    names = (*_SEED_FACTS, "k", *_EXCLUSION_FACTS)
    layout = _exchange_layout(what, group, _device_of(hidden), *_span(shard_start, weight_shard, error),
                              names, facts, error)
    batch, num_items = hidden.shape[0], layout.num_items

    # Checks that need V, on replicated inputs: every rank should agree, and the flag travels with
    # the lse gather so that ranks fed different exclusion lists still fail together.
    global_error, excluded_users, excluded_items = None, None, None
    if not 1 <= k <= num_items:
        global_error = f"k = {k} must be in [1, V = {num_items}]"
    elif exclude_ids is not None:
        global_error = _check_ids_in_catalog(exclude_ids, num_items, "exclude_ids")
        if global_error is None:
            excluded_users, excluded_items = _unique_exclusions(exclude_offsets, exclude_ids, batch, num_items)
            left = num_items - torch.bincount(excluded_users, minlength=batch)
            if bool((left < k).any()):
                user = int((left < k).nonzero()[0, 0])
                global_error = (f"k = {k} exceeds the {int(left[user])} items left for user {user} after "
                                f"excluding {num_items - int(left[user])} of V = {num_items}")
    lse = _seed_lse(what, hidden, weight_shard, bias_shard, layout, global_error, group)

    with torch.no_grad():
        values, ids = _local_topk(hidden, weight_shard, bias_shard, k, lse, layout, excluded_users, excluded_items)
    # Pad to a common width (shard sizes may differ by one); padding ranks last.
    width = min(k, max(stop - start for start, stop in zip(layout.starts, layout.stops)))
    pad = width - values.shape[1]
    if pad:
        values = torch.cat([values, values.new_full((batch, pad), float("-inf"))], dim=1)
        ids = torch.cat([ids, ids.new_full((batch, pad), torch.iinfo(torch.int64).max)], dim=1)
    all_values = _gather(values, group, layout.world_size)
    all_ids = _gather(ids, group, layout.world_size)
    # Candidates in shard order: within a shard they are sorted (value desc, id asc) and shards
    # hold increasing ids, so equal values appear by increasing id and a stable sort by value
    # alone yields the op's order. Each shard contributed its min(k, items left) best, which
    # contains its share of the global top-k, so the merge is exact.
    order = layout.ranks_by_start
    merged_values = all_values[order].permute(1, 0, 2).reshape(batch, -1)
    merged_ids = all_ids[order].permute(1, 0, 2).reshape(batch, -1)
    merged_values, position = torch.sort(merged_values, dim=1, descending=True, stable=True)
    return merged_values[:, :k].contiguous(), merged_ids.gather(1, position[:, :k])


def _local_topk(hidden, weight_shard, bias_shard, k, lse, layout: _Layout, excluded_users, excluded_items):
    """This shard's best min(k, items left) per user, with global ids; slots beyond a user's items
    left hold value -inf.

    ops.seed_topk takes one k for all users and refuses k > items left for any user. A user with
    fewer than k_local items left here gets some of its excluded items re-admitted to the op (just
    enough to reach k_local), and those are then struck from the answer (value -inf)."""
    batch = hidden.shape[0]
    start, local_items = layout.start, layout.local_items
    k_local = min(k, local_items)
    offsets = ids = readmitted = None
    if excluded_items is not None:
        here = (excluded_items >= start) & (excluded_items < start + local_items)
        users, items = excluded_users[here], excluded_items[here] - start  # sorted by (user, item)
        group_start = torch.zeros(batch + 1, dtype=torch.int64, device=items.device)
        group_start[1:] = torch.cumsum(torch.bincount(users, minlength=batch), 0)
        rank_in_user = torch.arange(items.shape[0], device=items.device) - group_start[users]
        kept = rank_in_user < local_items - k_local  # at most V_r - k_local excluded per user
        offsets, ids = _csr(users[kept], items[kept], batch)
        if not bool(kept.all()):
            readmitted = users[~kept] * local_items + items[~kept]  # sorted keys
    values, local_ids = ops.seed_topk(hidden, weight_shard, bias_shard, k_local, offsets, ids, lse=lse)
    if readmitted is not None:
        keys = torch.arange(batch, device=local_ids.device)[:, None] * local_items + local_ids
        slot = torch.searchsorted(readmitted, keys).clamp_max(readmitted.shape[0] - 1)
        values = values.masked_fill(readmitted[slot] == keys, float("-inf"))
    return values, local_ids + start


# ----------------------------------------------------------------------------- target rank


# Users per call of the local count: the call excludes, for each user, the other users' target
# rows appended to the shard, which is chunk^2 exclusion entries.
_RANK_CHUNK = 256


def sharded_target_rank(hidden: torch.Tensor, weight_shard: torch.Tensor, bias_shard: torch.Tensor | None,
                        targets: torch.Tensor, shard_start: int, exclude_offsets: torch.Tensor | None = None,
                        exclude_ids: torch.Tensor | None = None, group=None) -> torch.Tensor:
    """0-based pessimistic rank [B] int64 of each (global) target under the seed-averaged
    probability over the sharded catalog, as ops.seed_target_rank: the number of other,
    non-excluded items whose score is >= the target's. The same on every rank. Collective.

    The target's item row is sent from its owning rank to every rank and appended to each shard;
    each rank counts with ops.seed_target_rank on its shard plus those rows (the other users'
    appended rows and the target's own row in the shard excluded), so every comparison uses the
    op's own score and tie rule; the counts are summed across ranks.
    """
    what = "sharded_target_rank"

    def checks():
        facts = _check_item_layer(hidden, weight_shard, bias_shard, shard_start, seeded=True)
        _check_targets(targets, hidden)
        facts.update(_check_exclusion_structure(exclude_offsets, exclude_ids, hidden.shape[0], hidden.device))
        return facts

    facts, error = _local_checks(checks)
    names = (*_SEED_FACTS, *_EXCLUSION_FACTS)
    layout = _exchange_layout(what, group, _device_of(hidden), *_span(shard_start, weight_shard, error),
                              names, facts, error)
    batch, num_items = hidden.shape[0], layout.num_items
    global_error = _check_ids_in_catalog(targets, num_items, "targets")
    excluded_users = excluded_items = None
    if global_error is None and exclude_ids is not None:
        global_error = _check_ids_in_catalog(exclude_ids, num_items, "exclude_ids")
        if global_error is None:
            excluded_users, excluded_items = _unique_exclusions(exclude_offsets, exclude_ids, batch, num_items)
    lse = _seed_lse(what, hidden, weight_shard, bias_shard, layout, global_error, group)

    start, local_items = layout.start, layout.local_items
    owned = (targets >= start) & (targets < start + local_items)
    local_target = (targets - start).clamp(0, local_items - 1)
    target_rows = torch.where(owned[:, None], weight_shard.detach()[local_target], 0)
    target_rows = _copy_from_owners(target_rows, group)
    target_bias = None
    if bias_shard is not None:
        target_bias = _copy_from_owners(torch.where(owned, bias_shard.detach()[local_target], 0), group)

    owned_local = torch.where(owned, targets - start, -1)
    counts = torch.empty(batch, dtype=torch.int64, device=hidden.device)
    with torch.no_grad():
        for first in range(0, batch, _RANK_CHUNK):
            users = slice(first, min(first + _RANK_CHUNK, batch))
            counts[users] = _count_beating_targets(
                hidden[users], weight_shard, bias_shard, target_rows[users],
                None if target_bias is None else target_bias[users], lse[users],
                owned_local[users], excluded_users, excluded_items, first,
                start, local_items)
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return counts


def _copy_from_owners(values: torch.Tensor, group) -> torch.Tensor:
    """Rows filled on their owning rank and zero elsewhere, made whole on every rank. The sum runs
    on the bytes (a uint8 view, which every backend reduces): x + 0 + ... + 0 gives x's exact
    bits, whatever the float dtype."""
    bits = values.contiguous().view(torch.uint8)
    dist.all_reduce(bits, op=dist.ReduceOp.SUM, group=group)
    return bits.view(values.dtype)


def _count_beating_targets(hidden, weight_shard, bias_shard, target_rows, target_bias, lse, owned_local,
                           excluded_users, excluded_items, first_user, start, local_items):
    """For users [first_user, first_user + C): how many of this shard's non-excluded items score
    >= the user's target, by ops.seed_target_rank on [shard; the C target rows]."""
    chunk = hidden.shape[0]
    device = hidden.device
    weight = torch.cat([weight_shard.detach(), target_rows])
    bias = None if bias_shard is None else torch.cat([bias_shard.detach(), target_bias])
    appended = local_items + torch.arange(chunk, device=device)  # user j's target sits at appended[j]
    users_parts, items_parts = [], []
    # The other users' appended target rows are not items of this catalog.
    others = ~torch.eye(chunk, dtype=torch.bool, device=device)
    users_parts.append(torch.arange(chunk, device=device).repeat_interleave(chunk - 1))
    items_parts.append(appended.expand(chunk, chunk)[others])
    # The target's own row in this shard would be counted as a tie with its appended copy.
    mine = owned_local >= 0
    users_parts.append(torch.arange(chunk, device=device)[mine])
    items_parts.append(owned_local[mine])
    if excluded_items is not None:
        here = ((excluded_items >= start) & (excluded_items < start + local_items)
                & (excluded_users >= first_user) & (excluded_users < first_user + chunk))
        users_parts.append(excluded_users[here] - first_user)
        items_parts.append(excluded_items[here] - start)
    users, items = torch.cat(users_parts), torch.cat(items_parts)
    order = torch.argsort(users, stable=True)
    offsets, ids = _csr(users[order], items[order], chunk)
    return ops.seed_target_rank(hidden, weight, bias, appended, offsets, ids, lse=lse)


# ----------------------------------------------------------------------------- cross-entropy


def sharded_catalog_xent(hidden: torch.Tensor, weight_shard: torch.Tensor, bias_shard: torch.Tensor | None,
                         targets: torch.Tensor, shard_start: int, group=None) -> torch.Tensor:
    """Per-row catalog cross-entropy -log softmax(hidden @ W.T + b)[target] [B] (accumulation
    dtype) with the item layer sharded across the ranks; differentiable. Collective.

    hidden [B, d] and targets [B] (GLOBAL ids in [0, V)) are replicated; weight_shard [V_r, d] and
    bias_shard [V_r] are this rank's items [shard_start, shard_start + V_r).

    Gradients: each rank gets the gradient of its own weight/bias shard (they stay local, since
    the shard is owned by one rank: do not average them across ranks, e.g. keep them out of DDP);
    the gradient of `hidden` is summed over the shards with an all-reduce in backward, so every
    rank gets the full, identical gradient. This assumes every rank back-propagates the same
    upstream gradient (the same loss reduction of the same replicated loss); backward is
    collective too. For data parallelism on top, give each data-parallel replica its own
    catalog-sharding `group`.
    """
    what = "sharded_catalog_xent"

    def checks():
        facts = _check_item_layer(hidden, weight_shard, bias_shard, shard_start, seeded=False)
        _check_targets(targets, hidden)
        # backward all-reduces the hidden gradient, so all ranks must agree on computing it
        facts["hidden requires grad"] = int(hidden.requires_grad and torch.is_grad_enabled())
        return facts

    facts, error = _local_checks(checks)
    names = ("B", "d", "dtype", "has bias", "hidden requires grad")
    layout = _exchange_layout(what, group, _device_of(hidden), *_span(shard_start, weight_shard, error),
                              names, facts, error)
    global_error = _check_ids_in_catalog(targets, layout.num_items, "targets")
    return _ShardedCatalogXent.apply(hidden, weight_shard, bias_shard, targets, layout, global_error, group)


class _ShardedCatalogXent(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight_shard, bias_shard, targets, layout: _Layout, global_error, group):
        start, local_items = layout.start, layout.local_items
        owned = (targets >= start) & (targets < start + local_items)
        local_targets = torch.where(owned, targets - start, -1)  # -1: the target is in another shard
        loss_here, lse_here = ops.catalog_xent(hidden, weight_shard, bias_shard, local_targets)
        # On the owning rank lse_here - loss_here is the target's logit; 0 on the other ranks.
        target_logit_here = torch.where(owned, lse_here - loss_here, 0)
        # One gather carries both (and the error flag): [P, 2 * B].
        gathered, failed = _gather_with_flag(torch.cat([lse_here, target_logit_here]), global_error is not None,
                                             group, layout.world_size)
        _raise_if_any_rank_failed(failed.cpu(), global_error, group, layout.world_size, "sharded_catalog_xent")
        batch = hidden.shape[0]
        lse = torch.logsumexp(gathered[:, :batch], dim=0)  # max-shifted, same order on every rank
        target_logit = gathered[:, batch:].sum(0)  # exact: one non-zero term per row
        ctx.save_for_backward(hidden, weight_shard, bias_shard, local_targets, lse)
        ctx.group = group
        return lse - target_logit

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight_shard, bias_shard, local_targets, lse = ctx.saved_tensors
        backward_op = (torch.ops.diffrec_ext.catalog_xent_backward if ops.HAVE_EXTENSION
                       else reference.catalog_xent_backward)
        # With the global lse, the op gives this shard's exact slice of the full gradient.
        grad_hidden, grad_weight, grad_bias = backward_op(
            grad_loss.contiguous(), hidden.contiguous(), weight_shard.contiguous(),
            None if bias_shard is None else bias_shard.contiguous(), local_targets, lse)
        if ctx.needs_input_grad[0]:
            # hidden is replicated: its gradient is the sum of every shard's part (summed in the
            # accumulation dtype, so bfloat16/float16 partials are rounded once, not per rank).
            summed = grad_hidden.to(reference.acc_dtype(grad_hidden.dtype))
            dist.all_reduce(summed, op=dist.ReduceOp.SUM, group=ctx.group)
            grad_hidden = summed.to(hidden.dtype)
        return (grad_hidden if ctx.needs_input_grad[0] else None,
                grad_weight if ctx.needs_input_grad[1] else None,
                grad_bias if bias_shard is not None and ctx.needs_input_grad[2] else None,
                None, None, None, None)
