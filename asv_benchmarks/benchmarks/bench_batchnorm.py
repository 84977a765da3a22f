"""anybn's functional core on every backend: forward (train, eval), backward, both, memory.

GPU timings synchronize the device before the clock stops, so they time the
kernels, not their launches.
"""

from __future__ import annotations

import tracemalloc
from typing import Any

import anybn

from .common import (
    BACKENDS,
    DTYPES,
    SHAPE_NAMES,
    SHAPES,
    make_data,
    require,
    set_threads,
    timing,
)


@timing
class BatchNorm:
    """``anybn.batch_norm`` and ``anybn.batch_norm_backward`` (the default fast paths)."""

    params = (BACKENDS, SHAPE_NAMES, list(DTYPES))
    param_names = ("backend", "shape", "dtype")
    timeout = 300

    def setup(self, backend: str, shape: str, dtype: str) -> None:
        self.backend = require(backend, dtype)
        set_threads()
        self.data = make_data(self.backend, SHAPES[shape], dtype)
        out = self._forward(training=True)  # warm up (and compile CuPy kernels)
        self.mean, self.invstd = out.mean, out.invstd
        self._backward()
        self.backend.synchronize()

    def _forward(self, training: bool) -> anybn.BatchNormOutput:
        d = self.data
        return anybn.batch_norm(
            d.x, d.running_mean, d.running_var, d.weight, d.bias,
            training=training, axis=d.axis,
        )  # fmt: skip

    def _backward(self, mean: Any = None, invstd: Any = None) -> anybn.BatchNormGrads:
        d = self.data
        return anybn.batch_norm_backward(
            d.dy, d.x, d.weight,
            self.mean if mean is None else mean,
            self.invstd if invstd is None else invstd,
            training=True, axis=d.axis,
        )  # fmt: skip

    def time_forward_train(self, *_: str) -> None:
        self._forward(training=True)
        self.backend.synchronize()

    def time_forward_eval(self, *_: str) -> None:
        self._forward(training=False)
        self.backend.synchronize()

    def time_backward(self, *_: str) -> None:
        self._backward()
        self.backend.synchronize()

    def time_forward_backward(self, *_: str) -> None:
        out = self._forward(training=True)
        self._backward(out.mean, out.invstd)
        self.backend.synchronize()

    def peakmem_forward_backward(self, *_: str) -> None:
        out = self._forward(training=True)
        self._backward(out.mean, out.invstd)
        self.backend.synchronize()


@timing
class NumPyTemporaryMemory:
    """Peak temporary memory of a NumPy forward+backward, in units of x's size.

    tracemalloc sees NumPy's allocations. Counted: everything allocated during
    the two calls beyond the two results that must exist, y and dx (the small
    per-channel outputs are included). The target is at most 1.
    """

    params = (SHAPE_NAMES, list(DTYPES))
    param_names = ("shape", "dtype")
    unit = "x sizes"

    def setup(self, shape: str, dtype: str) -> None:
        if "numpy" not in BACKENDS:
            raise NotImplementedError("numpy is not among ANYBN_BENCH_BACKENDS")
        self.backend = require("numpy", dtype)
        set_threads()
        self.data = make_data(self.backend, SHAPES[shape], dtype)
        self.track_temporary_memory()  # warm up: lazy imports, the thread pool

    def track_temporary_memory(self, *_: str) -> float:
        d = self.data
        tracemalloc.start()
        try:
            tracemalloc.reset_peak()
            out = anybn.batch_norm(
                d.x, d.running_mean, d.running_var, d.weight, d.bias, training=True, axis=d.axis
            )
            grads = anybn.batch_norm_backward(
                d.dy, d.x, d.weight, out.mean, out.invstd, training=True, axis=d.axis
            )
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        return (peak - out.y.nbytes - grads.dx.nbytes) / d.x.nbytes


class Engine:
    """Which engine served the NumPy benchmarks (recorded beside the times, for the docs)."""

    def track_compiled_kernels(self) -> float:
        """1 where Numba's compiled kernels serve NumPy arrays (``anybn[numba]``), else 0."""
        import numpy as np

        from anybn import _kernels

        return float(_kernels.engine(np.ones((4, 3), np.float32)).startswith("compiled"))

    track_compiled_kernels.unit = "boolean"  # type: ignore[attr-defined]
