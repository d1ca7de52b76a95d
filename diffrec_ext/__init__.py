"""diffrec-ext: DiffRec (Du et al., 2023) with fused C++/CUDA kernels."""

from . import ops, reference
from .ops import BUILD_INFO, HAVE_EXTENSION
from .schedules import NoiseSchedule

__version__ = "0.1.0"

__all__ = ["ops", "reference", "NoiseSchedule", "BUILD_INFO", "HAVE_EXTENSION", "__version__"]
