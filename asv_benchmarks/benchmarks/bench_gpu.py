"""GPU targets: bandwidth against a device copy, and the ratio to torch CUDA.

Shapes (32, 64, 56, 56), (128, 64, 112, 112), (4096, 1024) and channels-last,
float32. Skipped without a GPU. ``python -m anybn gpu-check`` measures the same
targets (and float16, accuracy) in one command; this is the asv view of them.

The fractions count the minimum memory traffic (DESIGN.md): the forward (train)
reads x twice and writes y (3 x-sized transfers), the backward reads x and dy
twice and writes dx (5); a device-to-device copy moves 2. A fraction of 1.0 means
anybn moves its bytes as fast as the copy does.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import anybn

from .common import BACKENDS, Shape, make_data, require

SHAPES = {
    "32x64x56x56": Shape((32, 64, 56, 56)),
    "128x64x112x112": Shape((128, 64, 112, 112)),
    "4096x1024": Shape((4096, 1024)),
    "32x64x56x56-cl": Shape((32, 64, 56, 56), channels_last=True),
}


def _best(fn: Callable[[], Any], sync: Callable[[], None], repeat: int = 20) -> float:
    """The fastest of ``repeat`` synchronized runs, in seconds."""
    fn()
    sync()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - start)
    return best


class GPUBandwidth:
    """anybn's fused kernels on the GPU: copy-bandwidth fractions and ratio to torch."""

    params = ([b for b in BACKENDS if b in ("cupy", "torch:cuda")] or ["cupy"], list(SHAPES))
    param_names = ("backend", "shape")
    timeout = 600
    unit = "fraction"

    def setup(self, backend: str, shape: str) -> None:
        if backend not in BACKENDS:
            raise NotImplementedError(f"{backend} is not among ANYBN_BENCH_BACKENDS")
        self.backend = require(backend, "float32")
        self.d = make_data(self.backend, SHAPES[shape], "float32")
        sync = self.backend.synchronize
        x = self.d.x
        copy = (lambda: x.copy()) if backend == "cupy" else (lambda: x.clone())
        self.bytes = x.nbytes if backend == "cupy" else x.numel() * x.element_size()
        self.copy_s = _best(copy, sync)
        d = self.d
        self.fwd = lambda: anybn.batch_norm(
            d.x, d.running_mean, d.running_var, d.weight, d.bias, training=True
        )
        out = self.fwd()
        self.bwd = lambda: anybn.batch_norm_backward(d.dy, d.x, d.weight, out.mean, out.invstd)
        self.fwd_s = _best(self.fwd, sync)
        self.bwd_s = _best(self.bwd, sync)

    def track_forward_copy_bandwidth_fraction(self, *_: str) -> float:
        return (3 * self.bytes / self.fwd_s) / (2 * self.bytes / self.copy_s)

    def track_backward_copy_bandwidth_fraction(self, *_: str) -> float:
        return (5 * self.bytes / self.bwd_s) / (2 * self.bytes / self.copy_s)

    def track_forward_backward_ratio_to_torch_native(self, *_: str) -> float:
        """anybn forward+backward time / torch's F.batch_norm + autograd on the same data."""
        torch_backend = require("torch:cuda", "float32")
        import torch

        d = self.d
        as_torch = (lambda a: torch.from_dlpack(a)) if self.backend.module == "cupy" else None
        x, dy, w, b, rm, rv = (
            a if as_torch is None else as_torch(a)
            for a in (d.x, d.dy, d.weight, d.bias, d.running_mean, d.running_var)
        )
        w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
        rm, rv = rm.clone(), rv.clone()

        def native() -> None:
            xi = x.detach().requires_grad_()
            torch.nn.functional.batch_norm(xi, rm, rv, w, b, training=True).backward(dy)

        def ours() -> None:
            self.bwd_from(self.fwd())

        native_s = _best(native, torch_backend.synchronize)
        ours_s = _best(ours, self.backend.synchronize)
        return ours_s / native_s

    def bwd_from(self, out: anybn.BatchNormOutput) -> anybn.BatchNormGrads:
        d = self.d
        return anybn.batch_norm_backward(d.dy, d.x, d.weight, out.mean, out.invstd)
