"""Full-ranking metrics from 0-based ranks, and the popularity-ranking baseline.

A rank r is the number of candidate items ranked at or above the target other than the target
itself (ties count against the target). HR@K = [r < K]; NDCG@K = 1 / log2(r + 2) if r < K
(one relevant item per user, so the ideal DCG is 1). Both are averaged over users.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

KS = (5, 10, 20)


def _as_numpy_ranks(ranks) -> np.ndarray:
    if isinstance(ranks, torch.Tensor):
        ranks = ranks.detach().cpu().numpy()
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"ranks must be 1-D, got shape {ranks.shape}")
    if ranks.size and (not np.issubdtype(ranks.dtype, np.integer) or ranks.min() < 0):
        raise ValueError("ranks must be non-negative integers (0 = first)")
    return ranks.astype(np.int64)


def hit_ratio(ranks, k: int) -> float:
    ranks = _as_numpy_ranks(ranks)
    return float(np.mean(ranks < k)) if ranks.size else float("nan")


def ndcg(ranks, k: int) -> float:
    ranks = _as_numpy_ranks(ranks)
    if not ranks.size:
        return float("nan")
    gains = np.where(ranks < k, 1.0 / np.log2(ranks.astype(np.float64) + 2.0), 0.0)
    return float(np.mean(gains))


def ranking_metrics(ranks, ks: Sequence[int] = KS) -> dict[str, float]:
    """{"HR@5": .., "NDCG@5": .., "HR@10": .., ...} averaged over users."""
    ranks = _as_numpy_ranks(ranks)
    out: dict[str, float] = {}
    for k in ks:
        if int(k) < 1:
            raise ValueError(f"K must be >= 1, got {k}")
        out[f"HR@{k}"] = hit_ratio(ranks, k)
        out[f"NDCG@{k}"] = ndcg(ranks, k)
    return out


def item_counts(sequences: Iterable[Sequence[int]], catalog_size: int) -> np.ndarray:
    """Interaction counts per dense item id, [catalog_size] int64 (id 0 = padding, never counted)."""
    counts = np.zeros(catalog_size, dtype=np.int64)
    for seq in sequences:
        seq = np.asarray(seq, dtype=np.int64)
        seq = seq[seq > 0]
        if seq.size and seq.max() >= catalog_size:
            raise ValueError(f"item id {seq.max()} out of range for catalog size {catalog_size}")
        np.add.at(counts, seq, 1)
    return counts


def popularity_ranks(counts, targets, exclude_offsets=None, exclude_ids=None) -> np.ndarray:
    """0-based rank of each target when the catalog (ids 1..V-1) is ranked by `counts`, ties
    against the target (pessimistic), padding id 0 never a candidate, and each user's CSR exclusion
    list removed from the candidates (the target itself is never removed)."""
    counts = np.asarray(counts.cpu() if isinstance(counts, torch.Tensor) else counts, dtype=np.int64)
    targets = np.asarray(targets.cpu() if isinstance(targets, torch.Tensor) else targets, dtype=np.int64)
    size = counts.shape[0]
    if targets.size and (targets.min() < 1 or targets.max() >= size):
        raise ValueError(f"targets must be item ids in [1, {size - 1}]")
    candidates = counts[1:]
    sorted_counts = np.sort(candidates)
    target_counts = counts[targets]
    # items (other than padding) whose count >= the target's, minus the target itself
    ranks = candidates.size - np.searchsorted(sorted_counts, target_counts, side="left") - 1
    if exclude_offsets is not None:
        offsets = np.asarray(exclude_offsets.cpu() if isinstance(exclude_offsets, torch.Tensor) else exclude_offsets, dtype=np.int64)
        ids = np.asarray(exclude_ids.cpu() if isinstance(exclude_ids, torch.Tensor) else exclude_ids, dtype=np.int64)
        if offsets.shape != (targets.size + 1,):
            raise ValueError(f"exclude_offsets must have {targets.size + 1} entries, got {offsets.shape}")
        rows = np.repeat(np.arange(targets.size), np.diff(offsets))
        # duplicates in a list are removed once
        pairs = np.unique(np.stack([rows, ids]), axis=1) if ids.size else np.zeros((2, 0), dtype=np.int64)
        rows, ids = pairs[0], pairs[1]
        beats = (ids != 0) & (ids != targets[rows]) & (counts[ids] >= target_counts[rows])
        ranks = ranks - np.bincount(rows[beats], minlength=targets.size)
    return ranks.astype(np.int64)


def format_table(rows: dict[str, dict[str, float]], ks: Sequence[int] = KS) -> str:
    """A fixed-width table, one row per method, HR@K and NDCG@K columns."""
    columns = [f"{m}@{k}" for k in ks for m in ("HR", "NDCG")]
    name_width = max([len("method")] + [len(name) for name in rows])
    lines = ["  ".join([f"{'method':<{name_width}}"] + [f"{c:>8}" for c in columns])]
    for name, metrics in rows.items():
        lines.append("  ".join([f"{name:<{name_width}}"] + [f"{metrics.get(c, float('nan')):>8.4f}" for c in columns]))
    return "\n".join(lines)
