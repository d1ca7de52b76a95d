"""diffrec-ext: DiffRec (Du et al., 2023) with fused C++/CUDA kernels.

The data path, one module each: file -> `data.load_dataset` (or `synthetic.synthetic_dataset`)
-> `data.training_sequences` / `data.evaluation_batch` (batches) -> `model.DSR` trained by
`train.train` -> scores (`recommender.Recommender` over `engine.InferenceEngine`, `ops.seed_topk`, `ops.seed_target_rank`)
-> `metrics`.
"""

from . import ops, reference
from ._version import __version__
from .config import TrainConfig
from .data import SequenceDataset, load_dataset
from .recommender import Recommender
from .ops import BUILD_INFO, HAVE_EXTENSION
from .schedules import NoiseSchedule
from .synthetic import synthetic_dataset
from .train import train

__all__ = [
    "ops", "reference", "NoiseSchedule", "BUILD_INFO", "HAVE_EXTENSION", "__version__",
    "SequenceDataset", "load_dataset", "synthetic_dataset", "TrainConfig", "train", "Recommender",
]
