"""The layer-shape sweep: every batch-norm layer of ResNet-18 and MobileNetV2 at batch 32.

Shapes (:data:`SWEEP`): each distinct ``(N, C, H, W)`` of the batch-norm layers of ResNet-18
and MobileNetV2 on 224x224 images at batch 32, in NCHW and in channels-last, and four more:
an MLP layer ``(256,512)``, a late conv layer at batch 8 ``(8,256,14,14)``, and two wide
``(N, C)`` inputs ``(64,4096)`` and ``(4096,1024)``. Implementations (:data:`IMPLEMENTATIONS`):

* ``numpy``: ``anybn.batch_norm`` and ``anybn.batch_norm_backward`` on NumPy arrays
  (channels-last: ``(N, H, W, C)`` arrays, ``axis=-1``);
* ``tensors``: the same functions on torch CPU tensors (channels-last: ``torch.channels_last``
  tensors, ``axis=1``);
* ``torch``: ``torch.nn.functional.batch_norm`` and its autograd backward, the peer of both;
* ``module`` and ``nn``: ``anybn.torch.BatchNorm1d/2d`` and ``nn.BatchNorm1d/2d``, forward
  and ``backward()``.

``docs/scripts/sweep.py`` builds the same cases (:func:`build`) and times them in rotation
in one process, which is what the ratios on the benchmarks page are; asv times each
implementation on its own. Training mode throughout, weight and bias, running statistics.
The shapes are many and large (up to 38.5M values): select some with
``ANYBN_BENCH_SWEEP`` (names separated by commas outside parentheses); the quick profile
(``ANYBN_BENCH_PROFILE=quick``) takes ``(256,512)`` in float32 only.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .common import QUICK, Shape, make_data, require, set_threads, split_names, timing

#: ResNet-18's and MobileNetV2's batch-norm inputs at batch 32, 224x224.
NETWORK_SHAPES = (
    (32, 64, 112, 112), (32, 64, 56, 56), (32, 128, 28, 28), (32, 256, 14, 14),
    (32, 512, 7, 7), (32, 32, 112, 112), (32, 96, 112, 112), (32, 144, 56, 56),
    (32, 192, 28, 28), (32, 384, 14, 14), (32, 960, 7, 7),
)  # fmt: skip
#: The other inputs of the sweep (row-major only).
EXTRA_SHAPES = ((256, 512), (8, 256, 14, 14), (64, 4096), (4096, 1024))


def _name(dims: tuple[int, ...], channels_last: bool = False) -> str:
    return "(" + ",".join(map(str, dims)) + ")" + ("-channels-last" if channels_last else "")


#: Every input of the sweep by name: ``"(32,64,56,56)"``, ``"(32,64,56,56)-channels-last"``.
SWEEP: dict[str, Shape] = {
    **{_name(d, cl): Shape(d, cl) for d in NETWORK_SHAPES for cl in (False, True)},
    **{_name(d): Shape(d) for d in EXTRA_SHAPES},
}
IMPLEMENTATIONS = ("numpy", "tensors", "torch", "module", "nn")
SWEEP_DTYPES = ("float32", "float16", "bfloat16")


#: The quick profile's sweep (``ANYBN_BENCH_PROFILE=quick``, what CI runs): one mid size,
#: float32.
QUICK_SWEEP = ("(256,512)",)


def _selected() -> list[str]:
    value = os.environ.get("ANYBN_BENCH_SWEEP", "").strip()
    if not value:
        return list(QUICK_SWEEP if QUICK else SWEEP)
    names = split_names(value)
    unknown = sorted(set(names) - set(SWEEP))
    if unknown:
        raise ValueError(f"ANYBN_BENCH_SWEEP: unknown {unknown}; known: {list(SWEEP)}")
    return names


@dataclass
class Case:
    """One implementation on one input: forward, backward (of a kept forward), both."""

    forward: Callable[[], object]
    backward: Callable[[], object]
    forward_backward: Callable[[], object]
    size: int  #: values in x


def build(implementation: str, shape: str, dtype: str) -> Case:
    """The callables of one implementation on one sweep input (``NotImplementedError``: a
    dtype the implementation has no arrays for, such as bfloat16 NumPy arrays)."""
    spec = SWEEP[shape]
    backend = require("numpy" if implementation == "numpy" else "torch", dtype)
    d = make_data(backend, spec, dtype)
    if implementation in ("numpy", "tensors"):
        return _anybn_case(d)
    import torch

    if implementation == "torch":
        return _native_case(torch, d)
    if implementation in ("module", "nn"):
        if implementation == "module":
            import anybn.torch as abt

            classes: dict[int, Any] = {2: abt.BatchNorm1d, 4: abt.BatchNorm2d}
        else:
            classes = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
        m = classes[len(spec.dims)](spec.channels).to(d.x.dtype)
        return _module_case(m, d)
    raise ValueError(f"unknown implementation {implementation!r}; known: {IMPLEMENTATIONS}")


def _anybn_case(d: Any) -> Case:
    import anybn

    def forward() -> Any:
        return anybn.batch_norm(
            d.x, d.running_mean, d.running_var, d.weight, d.bias, training=True, axis=d.axis
        )

    kept = forward()

    def backward() -> Any:
        return anybn.batch_norm_backward(
            d.dy, d.x, d.weight, kept.mean, kept.invstd, training=True, axis=d.axis
        )

    def forward_backward() -> Any:
        out = forward()
        return anybn.batch_norm_backward(
            d.dy, d.x, d.weight, out.mean, out.invstd, training=True, axis=d.axis
        )

    return Case(forward, backward, forward_backward, math.prod(d.x.shape))


def _native_case(torch: Any, d: Any) -> Case:
    f = torch.nn.functional.batch_norm
    w, b = d.weight.detach().requires_grad_(), d.bias.detach().requires_grad_()

    def forward() -> Any:
        with torch.no_grad():
            return f(d.x, d.running_mean, d.running_var, w, b, training=True)

    x_leaf = d.x.detach().requires_grad_()
    y = f(x_leaf, d.running_mean, d.running_var, w, b, training=True)

    def backward() -> Any:
        y.backward(d.dy, retain_graph=True)

    def forward_backward() -> Any:
        x = d.x.detach().requires_grad_()
        f(x, d.running_mean, d.running_var, w, b, training=True).backward(d.dy)

    return Case(forward, backward, forward_backward, math.prod(d.x.shape))


def _module_case(m: Any, d: Any) -> Case:
    def forward() -> Any:
        return m(d.x.detach().requires_grad_())

    y = forward()

    def backward() -> Any:
        y.backward(d.dy, retain_graph=True)

    def forward_backward() -> Any:
        m(d.x.detach().requires_grad_()).backward(d.dy)

    return Case(forward, backward, forward_backward, math.prod(d.x.shape))


@timing
class LayerSweep:
    """Each implementation on each sweep input: forward, backward, both, and peak memory."""

    params = (list(IMPLEMENTATIONS), _selected(), ["float32"] if QUICK else list(SWEEP_DTYPES))
    param_names = ("implementation", "shape", "dtype")
    timeout = 600

    def setup(self, implementation: str, shape: str, dtype: str) -> None:
        set_threads()
        self.case = build(implementation, shape, dtype)
        self.case.forward_backward()

    def time_forward(self, *_: str) -> None:
        self.case.forward()

    def time_backward(self, *_: str) -> None:
        self.case.backward()

    def time_forward_backward(self, *_: str) -> None:
        self.case.forward_backward()

    def peakmem_forward_backward(self, *_: str) -> None:
        self.case.forward_backward()
