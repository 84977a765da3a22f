"""anybn: one batch-normalization core for every array library.

Forward, backward and running statistics written once against the Python
array API standard, dispatched through array-api-compat to NumPy, CuPy,
PyTorch, array-api-strict and any other conforming library.
"""

from . import convert
from ._after.fold import FoldedWeights, fold
from ._after.recalibrate import recalibrate
from ._api import BatchNormGrads, BatchNormOutput, RenormOutput, batch_norm, batch_norm_backward
from ._core.stats import chan_merge
from ._layer import BatchNorm
from ._settings import fast_paths, get_num_threads, set_fast_paths, set_num_threads
from ._typing import AnyArray

__version__ = "0.1.0"

__all__ = [
    "AnyArray",
    "BatchNorm",
    "BatchNormGrads",
    "BatchNormOutput",
    "FoldedWeights",
    "RenormOutput",
    "__version__",
    "batch_norm",
    "batch_norm_backward",
    "chan_merge",
    "convert",
    "fast_paths",
    "fold",
    "get_num_threads",
    "recalibrate",
    "set_fast_paths",
    "set_num_threads",
]
