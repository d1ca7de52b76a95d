"""Inference building blocks below the engine (engine.py, the one implementation of Alg. 2 / Alg. 3
scoring, top-k and target ranks): the input of every pass, the reverse process's posterior, the
validators every layer calls (k, the items left after exclusion, num_samples, histories, target-rank
arguments), the exclusion lists, and `predict_h0`, the plain reference of both algorithms that the
tests compare the engine with.

Input of every inference pass: the user's history (dense ids), its last T - 1 items, then the
[unk] slot (section 4.5.2). Both algorithms produce S predictions of h0 per user, [B, S, d]; the S
softmax distributions softmax(W h0 + b) are averaged and ranked by the fused ops:
`ops.seed_topk` (top-k) and `ops.seed_target_rank` (rank of a target).

- Alg. 3: for each of S seeds, draw eps, noise the slot at step N and predict h0 = f(h_N, N) in
  one pass.
- Alg. 2: h_N = sqrt(abar_N) E[unk] + sqrt(1 - abar_N) eps, then for n = N..2
  h_{n-1} = coef_h0[n] f(h_n, n) + coef_hn[n] h_n + sqrt(var[n]) z (posterior of Eq. 3, tables of
  NoiseSchedule), and h0 = f(h_1, 1). (With the model's input_scale b != 1 the chain runs on
  b h0: b E[unk] and b f(h_n, n) take the place of E[unk] and f(h_n, n).) With `stride` > 1 it
  visits the steps N, N - s, ..., and uses the posterior q(h_s | h_t, h_0) between consecutive
  visited steps (t > s), computed from abar_t and abar_s (it equals the tables when s = t - 1).
- SASRec: deterministic, one prediction per user (S = 1).

Padding id 0 is never recommended nor counted in a rank; `exclude_seen` also removes each user's
history from the candidates.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from . import ops
from ._deprecation import NUM_SAMPLES_RENAME, renamed_keywords
from .config import METHODS
from .errors import ItemsLeftError
from .model import DSR

def _check_method(method: str):
    if method not in METHODS:
        raise ValueError(f"inference method must be one of {METHODS}, got {method!r}")


def reverse_steps(num_steps: int, stride: int = 1) -> list[int]:
    """Visited steps of Alg. 2, descending: N, N - stride, ..., down to >= 1."""
    if not isinstance(stride, int) or not 1 <= stride <= num_steps:
        raise ValueError(f"stride must be an int in [1, N = {num_steps}], got {stride!r}")
    return list(range(num_steps, 0, -stride))


def posterior(model: DSR, t: int, s: int) -> tuple[float, float, float]:
    """(coef_h0, coef_hn, variance) of q(h_s | h_t, h_0), t > s >= 1."""
    schedule = model.schedule
    if s == t - 1:
        return (float(schedule.posterior_coef_h0[t]), float(schedule.posterior_coef_hn[t]),
                float(schedule.posterior_variance[t]))
    abar_t, abar_s = float(schedule.abar[t]), float(schedule.abar[s])
    beta = 1.0 - abar_t / abar_s
    denom = 1.0 - abar_t
    return (abar_s**0.5 * beta / denom, (1.0 - beta) ** 0.5 * (1.0 - abar_s) / denom,
            beta * (1.0 - abar_s) / denom)


@renamed_keywords(**NUM_SAMPLES_RENAME)
def predict_h0(model: DSR, ids: torch.Tensor, num_samples: int = 10, method: str = "alg3",
               generator: torch.Generator | None = None, stride: int = 1,
               noise: torch.Tensor | None = None) -> torch.Tensor:
    """Predictions of h0 for inference inputs `ids` [B, T] (ending with the [unk] slot): [B, S, d].

    `noise` fixes the Gaussian draws: Alg. 3 [B, S, K, d]; Alg. 2 [m, B, S, d] with m = number of
    visited steps (eps for h_N first, then one z per transition)."""
    _check_method(method)
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
    batch = ids.shape[0]
    device = ids.device
    if not model.diffusion:
        return model(ids)[:, None]
    dtype = model.item_emb.weight.dtype
    rep = ids.repeat_interleave(num_samples, dim=0)
    dim = model.dim
    if method == "alg3":
        k = model.noised_positions
        if noise is None:
            noise = torch.randn(batch, num_samples, k, dim, generator=generator, device=device, dtype=dtype)
        if noise.shape != (batch, num_samples, k, dim):
            raise ValueError(f"noise must be [B, S, K, d] = {(batch, num_samples, k, dim)}, got {tuple(noise.shape)}")
        h0 = model(rep, model.num_steps, noise.reshape(batch * num_samples, k, dim))
        return h0.reshape(batch, num_samples, dim)
    if model.noised_positions != 1:
        raise ValueError("Alg. 2 is defined for target-only noising (noised_positions = 1)")
    visited = reverse_steps(model.num_steps, stride)
    if noise is None:
        noise = torch.randn(len(visited), batch, num_samples, dim, generator=generator, device=device, dtype=dtype)
    if noise.shape != (len(visited), batch, num_samples, dim):
        raise ValueError(f"noise must be [m, B, S, d] = {(len(visited), batch, num_samples, dim)}, "
                         f"got {tuple(noise.shape)}")
    noise = noise.reshape(len(visited), batch * num_samples, dim)
    n = model.num_steps
    unk = model.item_vectors(torch.tensor(model.unk_id, device=device))
    scale = model.input_scale  # the process runs on input_scale * h0 (model.DSR)
    h = float(model.schedule.sqrt_abar[n]) * scale * unk + float(model.schedule.sqrt_one_minus_abar[n]) * noise[0]
    for index, t in enumerate(visited):
        f = model.forward_from_hidden(rep, t, h)
        if index + 1 == len(visited):
            h = f  # the last visited step predicts h0 directly
            break
        s = visited[index + 1]
        coef_h0, coef_hn, variance = posterior(model, t, s)
        h = coef_h0 * scale * f + coef_hn * h + variance**0.5 * noise[index + 1]
    return h.reshape(batch, num_samples, dim)


def history_items(history, name: str = "history") -> list:
    """One history as a list of item ids, checked where it enters the Python API (Recommender and
    the engines): a list, tuple, 1-D numpy array or 1-D integer tensor of ints, or of strs for
    original ids. A string, a number, a bool or nested sequences are a ValueError naming `name`."""
    if isinstance(history, torch.Tensor):
        if history.dim() != 1 or history.dtype.is_floating_point or history.dtype.is_complex \
                or history.dtype == torch.bool:
            raise ValueError(f"{name} must be a 1-D integer tensor of item ids, got a {history.dtype} tensor "
                             f"of shape {tuple(history.shape)}")
        return history.tolist()
    if isinstance(history, np.ndarray):
        if history.ndim != 1:
            raise ValueError(f"{name} must be a 1-D array of item ids, got shape {history.shape}")
        history = history.tolist()
    elif not isinstance(history, (list, tuple)):
        raise ValueError(f"{name} must be a list, tuple, 1-D array or 1-D integer tensor of item ids, "
                         f"got {type(history).__name__} {history!r:.60}")
    for position, item in enumerate(history):
        if isinstance(item, (bool, np.bool_)) or not isinstance(item, (int, np.integer, str)):
            raise ValueError(f"{name}[{position}] = {item!r:.60} is not an item id (an int, or a str for "
                             f"original ids)")
    return list(history)


def check_k(k, num_items: int) -> None:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= num_items:
        raise ValueError(f"k must be an int in [1, num_items = {num_items}], got {k!r}")


def check_room(k: int, num_items: int, histories, names=None) -> None:
    """The rule behind every seen-item exclusion (the engine, Recommender, serve, score): each
    history must leave at least k of the num_items items once its own items are excluded.
    ItemsLeftError names the first that does not (names[row], else "history {row}")."""
    for row, history in enumerate(histories):
        if len(history) > num_items - k:  # only then can fewer than k items be left
            left = num_items - len(np.unique(np.asarray(history)))
            if left < k:
                raise ItemsLeftError(k, left, row, None if names is None else names[row])


def check_seed(seed) -> None:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")


def check_flag(name: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(f"{name} must be True or False, got {value!r}")


def _dense_id(value, row: int, position: int, num_items: int) -> int:
    """One dense item id of a history list, checked: an integer in [0, num_items] (0 = padding)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"histories[{row}][{position}] = {value!r} is not an integer item id")
    item = int(value)
    if not 0 <= item <= num_items:
        raise ValueError(f"histories[{row}][{position}] = {item} is out of range: dense item ids lie in "
                         f"[1, {num_items}] (0 = padding)")
    return item


def _check_history_tensor(history: torch.Tensor, num_items: int) -> None:
    if history.dim() != 2:
        raise ValueError(f"histories must be a [B, H] tensor of item ids, got shape {tuple(history.shape)}")
    if history.dtype.is_floating_point or history.dtype.is_complex or history.dtype == torch.bool:
        raise ValueError(f"histories must hold integer item ids, got dtype {history.dtype}")
    if history.numel():
        bad = (history < 0) | (history > num_items)
        if bad.any():
            row, position = (int(i) for i in bad.nonzero()[0])
            raise ValueError(f"histories[{row}][{position}] = {int(history[row, position])} is out of range: "
                             f"dense item ids lie in [1, {num_items}] (0 = padding)")


def inference_input(model: DSR, histories: Sequence[Sequence[int]] | torch.Tensor, device=None) -> torch.Tensor:
    """[B, T] inputs from histories: dense-id lists (oldest first) or a left-padded [B, H] tensor.
    Histories longer than T - 1 keep their most recent T - 1 items; an empty one is all padding."""
    if isinstance(histories, torch.Tensor):
        _check_history_tensor(histories, model.num_items)
        history = histories.to(device=device, dtype=torch.int64)
    else:
        keep = model.max_len - 1
        history = torch.zeros(len(histories), keep, dtype=torch.int64)
        for row, items in enumerate(histories):
            items = [_dense_id(i, row, position, model.num_items) for position, i in enumerate(items)][-keep:]
            if items:
                history[row, keep - len(items):] = torch.tensor(items, dtype=torch.int64)
        history = history.to(device)
    return model.build_input(history)


def check_finite_predictions(hidden: torch.Tensor, rows) -> None:
    """The seed ops refuse NaN/Inf inputs without saying whose (see docs/reliability.md); checked
    before them, this names the histories of [B, S, d] predictions by their `rows` numbers [B]."""
    finite_rows = torch.isfinite(hidden).flatten(1).all(1).cpu()
    if not bool(finite_rows.all()):
        bad = torch.nonzero(~finite_rows)[:, 0]
        names = np.asarray(rows)[bad.numpy()].tolist()
        raise FloatingPointError(f"the model predicts NaN/Inf for histories {names[:10]}: check its weights")


def check_item_layer_finite(weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and not bool(torch.isfinite(tensor).all()):
            raise FloatingPointError(f"the model's output {name} holds NaN/Inf: scores and ranks would be meaningless")


def exclusion(histories: Sequence[Sequence[int]] | None, batch: int, exclude_seen: bool, device=None):
    """CSR exclusion lists: padding id 0 always, plus each user's seen items when exclude_seen."""
    lists = []
    for row in range(batch):
        seen = [int(i) for i in histories[row] if int(i) > 0] if (exclude_seen and histories is not None) else []
        lists.append([0] + sorted(set(seen)))
    return ops.exclusion_csr(lists, device=device)


def _history_lists(histories, num_items: int) -> list[list[int]]:
    if isinstance(histories, torch.Tensor):
        return [[int(i) for i in row if int(i) > 0] for row in histories.cpu()]
    rows = [history_items(row, f"histories[{index}]") for index, row in enumerate(histories)]
    return [[item for position, value in enumerate(row) if (item := _dense_id(value, index, position, num_items)) > 0]
            for index, row in enumerate(rows)]


def check_rank_inputs(num_items: int, histories, targets, *, exclude_seen, seed, seen_offsets, seen_items,
                      shard: tuple[int, int]):
    """The arguments of a target-rank call (InferenceEngine.target_ranks), checked: (the histories
    as int64 arrays without padding, targets [U] int64, seen_offsets [U + 1] or None, seen_items
    or None). `histories`: a left-padded [U, H] tensor or array, or lists of dense ids; `targets`
    [U] dense ids; the CSR `seen_offsets` / `seen_items` (both or neither) lists each user's seen
    items."""
    targets = torch.as_tensor(targets, dtype=torch.int64)
    count = targets.shape[0] if targets.dim() else 0
    if len(histories) != count:
        raise ValueError(f"{len(histories)} histories for {count} targets")
    if targets.dim() != 1:
        raise ValueError(f"targets must be 1-D, got shape {tuple(targets.shape)}")
    if count and (targets.min() < 1 or targets.max() > num_items):
        row = int(((targets < 1) | (targets > num_items)).nonzero()[0, 0])
        raise ValueError(f"targets[{row}] = {int(targets[row])} is out of range: targets must be item ids in "
                         f"[1, {num_items}]")
    if (seen_offsets is None) != (seen_items is None):
        raise ValueError("give both seen_offsets and seen_items, or neither")
    check_flag("exclude_seen", exclude_seen)
    check_seed(seed)
    if seen_offsets is not None:
        seen_offsets = torch.as_tensor(seen_offsets, dtype=torch.int64)
        seen_items = torch.as_tensor(seen_items, dtype=torch.int64)
        if seen_offsets.shape != (count + 1,):
            raise ValueError(f"seen_offsets must have {count + 1} entries, got {tuple(seen_offsets.shape)}")
        if seen_items.dim() != 1:
            raise ValueError(f"seen_items must be 1-D, got shape {tuple(seen_items.shape)}")
        if int(seen_offsets[0]) != 0 or int(seen_offsets[-1]) != len(seen_items) \
                or bool((seen_offsets[1:] < seen_offsets[:-1]).any()):
            shown = f"{seen_offsets[:6].tolist()}{' ...' if count > 5 else ''}"
            raise ValueError(f"seen_offsets must rise from 0 to len(seen_items) = {len(seen_items)}, got {shown} "
                             f"ending at {int(seen_offsets[-1])}")
        bad = (seen_items < 1) | (seen_items > num_items)
        if bad.any():
            position = int(bad.nonzero()[0, 0])
            raise ValueError(f"seen_items[{position}] = {int(seen_items[position])} is out of range: seen items "
                             f"must be item ids in [1, {num_items}]")
    if isinstance(histories, np.ndarray):
        histories = torch.from_numpy(histories)
    if isinstance(histories, torch.Tensor):
        _check_history_tensor(histories, num_items)
        arrays = [row[row != 0] for row in histories.to(torch.int64).cpu().numpy()]
    else:  # checks every id, naming its row and position
        arrays = [np.asarray(row, dtype=np.int64) for row in _history_lists(histories, num_items)]
    shard_rank, shard_count = shard
    if not 0 <= shard_rank < shard_count:
        raise ValueError(f"shard = {shard} must be (r, P) with 0 <= r < P")
    return arrays, targets, seen_offsets, seen_items


def seen_exclusion(seen_offsets: torch.Tensor, seen_items: torch.Tensor, start: int, stop: int):
    """The exclusion CSR (offsets [rows + 1], ids) of users start..stop-1 from the CSR of their seen
    items: padding (0) first in every row, then the user's seen items."""
    lo, hi = int(seen_offsets[start]), int(seen_offsets[stop])
    offsets = seen_offsets[start:stop + 1] - lo
    counts = offsets[1:] - offsets[:-1] + 1
    csr_offsets = torch.zeros(stop - start + 1, dtype=torch.int64)
    csr_offsets[1:] = torch.cumsum(counts, 0)
    csr_ids = torch.zeros(int(csr_offsets[-1]), dtype=torch.int64)
    body = torch.ones(int(csr_offsets[-1]), dtype=torch.bool)
    body[csr_offsets[:-1]] = False
    csr_ids[body] = seen_items[lo:hi]
    return csr_offsets, csr_ids


def batch_seed(seed: int, batch_index: int) -> int:
    """The noise seed of batch `batch_index` of a target-rank call with `seed` (distinct for
    every (seed, batch) pair below a million batches)."""
    return (seed * 1_000_003 + batch_index) % 2**63


def shard_starts(count: int, batch_size: int, shard: tuple[int, int]) -> range:
    """First user of each batch of `shard = (r, P)`: batches r, r + P, ..."""
    shard_rank, shard_count = shard
    return range(shard_rank * batch_size, count, shard_count * batch_size)


def shard_users(count: int, batch_size: int, shard: tuple[int, int]) -> np.ndarray:
    """Positions [U_r] int64 of the users whose ranks `InferenceEngine.target_ranks(..., shard=shard)`
    returns."""
    starts = shard_starts(count, batch_size, shard)
    return np.concatenate([np.arange(start, min(start + batch_size, count)) for start in starts] or
                          [np.zeros(0, dtype=np.int64)])
