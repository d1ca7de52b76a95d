"""The built-in default dataset: synthetic sequences with planted, learnable sequential structure.

The generative story, deterministic for a seed:
- items fall into `num_clusters` groups and have a Zipf popularity (in a random order);
- every item has `successors_per_item` likely successors in its own group, with decaying weights;
- every user has a taste cluster; the first item comes from that cluster (by popularity);
- each next item is, with probability `transition_prob`, a successor of the previous item; with
  probability `taste_prob`, an item of the user's cluster (by popularity); otherwise an item drawn
  from the global popularity (noise).

A model that reads the last item can put its successors at the top and reach HR@10 near
`transition_prob`; the popularity ranking cannot, so the gap shows whether a model learns order.
Compare against `diffrec_ext.data.popularity_ranking_metrics(dataset)`.

The defaults (2,500 users, 800 items, sequences of 20 to 60, about 100,000 actions) let a small model
train on a 2-core CPU in about a minute.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .data import SequenceDataset, preprocess

__all__ = ["SyntheticConfig", "synthetic_interactions", "synthetic_dataset", "write_synthetic"]


@dataclass(frozen=True)
class SyntheticConfig:
    num_users: int = 2500
    num_items: int = 800
    num_clusters: int = 10
    min_length: int = 20
    max_length: int = 60
    successors_per_item: int = 3
    successor_decay: float = 0.5  # successor j has weight decay**j (normalised): 0.57, 0.29, 0.14
    transition_prob: float = 0.7
    taste_prob: float = 0.2
    popularity_exponent: float = 1.0  # Zipf exponent of item popularity
    seed: int = 0

    def __post_init__(self):
        if not 1 <= self.num_clusters <= self.num_items:
            raise ValueError(f"num_clusters must lie in 1..num_items, got {self.num_clusters}")
        if self.num_items // self.num_clusters <= self.successors_per_item:
            raise ValueError("every cluster needs more items than successors_per_item")
        if not 3 <= self.min_length <= self.max_length:
            raise ValueError("need 3 <= min_length <= max_length (leave-one-out needs 3 items)")
        if self.num_users < 1 or self.successors_per_item < 1:
            raise ValueError("num_users and successors_per_item must be positive")
        if not (0 <= self.transition_prob and 0 <= self.taste_prob and self.transition_prob + self.taste_prob <= 1):
            raise ValueError("transition_prob and taste_prob must be >= 0 with a sum <= 1")


def _config(config: SyntheticConfig | None, overrides) -> SyntheticConfig:
    return replace(config or SyntheticConfig(), **overrides)


class _ClusterSampler:
    """Draws items of given clusters by popularity, vectorised over users: the items of all clusters
    sit in one array, cluster c's cumulative popularity spans [c, c + 1), and one searchsorted picks
    an item of each requested cluster."""

    def __init__(self, cluster_of_item: np.ndarray, popularity: np.ndarray):
        self.items = np.lexsort((np.arange(len(cluster_of_item)), cluster_of_item))
        clusters = cluster_of_item[self.items]
        weights = popularity[self.items]
        totals = np.bincount(clusters, weights=weights)
        cumulative = np.cumsum(weights) - np.concatenate(([0.0], np.cumsum(totals)[:-1]))[clusters]
        self.bounds = clusters + cumulative / totals[clusters]
        last_of_cluster = np.r_[clusters[1:] != clusters[:-1], True]
        self.bounds[last_of_cluster] = clusters[last_of_cluster] + 1.0  # no rounding spill into the next

    def sample(self, clusters: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return self.items[np.searchsorted(self.bounds, clusters + rng.random(len(clusters)), side="right")]


def synthetic_interactions(config: SyntheticConfig | None = None, **overrides) -> pd.DataFrame:
    """The interaction table (user, item, timestamp = position) of the synthetic dataset; original
    ids run from 1. Keyword arguments override fields of `config`."""
    config = _config(config, overrides)
    rng = np.random.default_rng(config.seed)
    num_items, num_users = config.num_items, config.num_users
    cluster_of_item = rng.permutation(np.arange(num_items) % config.num_clusters)
    popularity = 1.0 / (1.0 + rng.permutation(num_items)) ** config.popularity_exponent
    popularity /= popularity.sum()
    sampler = _ClusterSampler(cluster_of_item, popularity)

    # Successors: distinct items of the same cluster, other than the item itself, in random order.
    successors = np.empty((num_items, config.successors_per_item), dtype=np.int64)
    for cluster in range(config.num_clusters):
        members = np.flatnonzero(cluster_of_item == cluster)
        keys = rng.random((len(members), len(members)))
        keys[np.arange(len(members)), np.arange(len(members))] = np.inf  # never its own successor
        successors[members] = members[np.argsort(keys, axis=1)[:, :config.successors_per_item]]
    successor_weights = config.successor_decay ** np.arange(config.successors_per_item)
    successor_weights /= successor_weights.sum()

    taste = rng.integers(config.num_clusters, size=num_users)
    lengths = rng.integers(config.min_length, config.max_length + 1, size=num_users)
    sequences = np.empty((num_users, config.max_length), dtype=np.int64)
    sequences[:, 0] = sampler.sample(taste, rng)
    for step in range(1, config.max_length):  # one vectorised draw per position, over all users
        choice = rng.random(num_users)
        follow = successors[sequences[:, step - 1],
                            rng.choice(config.successors_per_item, size=num_users, p=successor_weights)]
        from_taste = sampler.sample(taste, rng)
        noise = rng.choice(num_items, size=num_users, p=popularity)
        sequences[:, step] = np.where(choice < config.transition_prob, follow,
                                      np.where(choice < config.transition_prob + config.taste_prob,
                                               from_taste, noise))

    present = np.arange(config.max_length)[None, :] < lengths[:, None]
    table = pd.DataFrame({
        "user": np.repeat(np.arange(1, num_users + 1), lengths),
        "item": sequences[present] + 1,
        "timestamp": np.nonzero(present)[1],
    })
    table.attrs["source"] = f"the synthetic generator ({config})"
    return table


def synthetic_dataset(config: SyntheticConfig | None = None, *, k_core: int = 5, item_k_core: int | None = None,
                      **overrides) -> SequenceDataset:
    """The synthetic dataset through the same preprocessing as real data (k-core filter included)."""
    config = _config(config, overrides)
    return preprocess(synthetic_interactions(config), name=f"synthetic-seed{config.seed}", k_core=k_core,
                      item_k_core=item_k_core)


def write_synthetic(path, config: SyntheticConfig | None = None, **overrides) -> Path:
    """Writes the synthetic interactions as a sequence text file (`user item item ...`, oldest first;
    gzipped when the name ends in .gz) that `read_interactions` reads back."""
    path = Path(path)
    table = synthetic_interactions(config, **overrides)
    starts = np.flatnonzero(np.r_[True, table["user"].to_numpy()[1:] != table["user"].to_numpy()[:-1]])
    items = table["item"].to_numpy().astype(str)
    users = table["user"].to_numpy()[starts].astype(str)
    text = "".join(f"{user} {' '.join(line)}\n" for user, line in zip(users, np.split(items, starts[1:])))
    data = text.encode("utf-8")
    path.write_bytes(gzip.compress(data, mtime=0) if path.suffix == ".gz" else data)  # mtime=0: same bytes per seed
    return path
