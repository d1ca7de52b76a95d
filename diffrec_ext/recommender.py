"""The user-facing facade: a trained model and its item id map, recommending in the dataset's own
item ids (with titles where given). Every call goes through one `InferenceEngine`, the package's
one implementation of Alg. 2 / Alg. 3 scoring."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._deprecation import NUM_SAMPLES_RENAME, renamed_keywords
from .checkpoint import load_model
from .engine import InferenceEngine
from .errors import UnknownItemsError
from .inference import history_items
from .model import DSR


@dataclass
class Recommendation:
    item: object  # original item id
    score: float  # the seed-averaged probability
    title: str | None = None


class Recommender:
    """A trained model plus its item id map: recommendations in original item ids.

    `engine_options` go to the InferenceEngine (device, dtype, batch_size, ...); by default it runs
    the model where it is, at its own dtype."""

    def __init__(self, model: DSR, item_ids: Sequence, config=None, meta: dict | None = None, **engine_options):
        engine_options.setdefault("dtype", model.pos_emb.dtype)
        self.engine = InferenceEngine(model, item_ids, config=config, meta=meta, **engine_options)

    @classmethod
    def from_checkpoint(cls, path, device="cpu", which: str = "best", **engine_options) -> Recommender:
        model, config, items, meta = load_model(path, device=device, which=which)
        return cls(model, items, config, meta, **engine_options)

    @property
    def model(self) -> DSR:
        return self.engine.model

    @property
    def item_ids(self) -> list:
        return self.engine.item_ids

    @property
    def config(self):
        return self.engine.config

    @property
    def meta(self) -> dict:
        return self.engine.meta

    def to_dense(self, original_items: Sequence) -> tuple[list[int], list]:
        """(dense ids, unknown original ids) of a history given in original item ids."""
        return self.engine.lookup(original_items)

    @renamed_keywords(method="algorithm", **NUM_SAMPLES_RENAME)
    def recommend_dense(self, histories: Sequence[Sequence[int]], k: int = 10, exclude_seen: bool = True,
                        titles: dict | None = None, **options) -> list[list[Recommendation]]:
        """Top-k of each dense-id history, as Recommendations in original ids. `options`: the
        engine's num_samples, algorithm, stride and seed (defaults: the checkpoint's)."""
        ids, scores = self.engine.recommend_dense(histories, k=k, exclude_seen=exclude_seen, **options)
        out = []
        for row_ids, row_scores in zip(ids.tolist(), scores.tolist()):
            row = []
            for dense, score in zip(row_ids, row_scores):
                original = self.item_ids[dense - 1]
                title = None if titles is None else titles.get(original, titles.get(str(original)))
                row.append(Recommendation(original, float(score), title))
            out.append(row)
        return out

    @renamed_keywords(method="algorithm", **NUM_SAMPLES_RENAME)
    def recommend(self, history: Sequence, k: int = 10, exclude_seen: bool = True, titles: dict | None = None,
                  **options) -> list[Recommendation]:
        """Top-k for one history of original item ids (see history_items for what a history may be);
        UnknownItemsError names the ids the model does not know."""
        dense, unknown = self.to_dense(history_items(history))
        if unknown:
            raise UnknownItemsError(0, unknown, "history")
        return self.recommend_dense([dense], k=k, exclude_seen=exclude_seen, titles=titles, **options)[0]
