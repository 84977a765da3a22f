"""The peers anybn is measured against, in the same run so that ratios are like for like.

* ``TorchNative``: ``torch.nn.functional.batch_norm`` forward and its autograd
  backward (what a PyTorch user runs), on the CPU and on CUDA.
* ``TextbookNumPy``: batch norm the way people write it by hand in NumPy
  (``x.mean``, ``x.var``, ``xhat``, and the three-sum backward), no upcasting.
* ``TorchModule``: the ``anybn.torch`` drop-in modules against ``nn.BatchNorm1d/2d``
  (forward and ``backward()``, training mode), what a PyTorch user swaps.
* ``JaxJit``: ``jax.jit`` of a plain ``jax.numpy`` batch norm and its ``jax.vjp``
  (CPU), where JAX is installed.

The methods and parameters mirror :class:`bench_batchnorm.BatchNorm`, so the
plotting script pairs them by (shape, dtype).
"""

from __future__ import annotations

from typing import Any

import numpy as np

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

EPS = 1e-5
MOMENTUM = 0.1


@timing
class TorchNative:
    """``F.batch_norm`` + autograd, torch's own fused kernels (CPU and CUDA)."""

    # The CPU row is every CPU backend's yardstick: it runs wherever torch is installed,
    # whatever ANYBN_BENCH_BACKENDS names; the CUDA row where torch:cuda is named.
    params = (["torch", *(["torch:cuda"] if "torch:cuda" in BACKENDS else [])], SHAPE_NAMES,
              list(DTYPES))  # fmt: skip
    param_names = ("backend", "shape", "dtype")
    timeout = 300

    def setup(self, backend: str, shape: str, dtype: str) -> None:
        self.backend = require(backend, dtype)  # skipped where torch is not installed
        import torch

        self.torch = torch
        set_threads()
        d = make_data(self.backend, SHAPES[shape], dtype)
        self.x, self.dy = d.x, d.dy
        self.rm, self.rv = d.running_mean, d.running_var
        self.w = d.weight.detach().requires_grad_()
        self.b = d.bias.detach().requires_grad_()
        self.x_leaf = d.x.detach().requires_grad_()
        # A graph to time the backward alone (retain_graph: it runs again and again).
        self.y = self._forward(self.x_leaf, training=True)
        self.y.backward(self.dy, retain_graph=True)
        self.backend.synchronize()

    def _forward(self, x: Any, training: bool) -> Any:
        return self.torch.nn.functional.batch_norm(
            x, self.rm, self.rv, self.w, self.b, training=training, momentum=MOMENTUM, eps=EPS
        )

    def time_forward_train(self, *_: str) -> None:
        with self.torch.no_grad():
            self._forward(self.x, training=True)
        self.backend.synchronize()

    def time_forward_eval(self, *_: str) -> None:
        with self.torch.no_grad():
            self._forward(self.x, training=False)
        self.backend.synchronize()

    def time_backward(self, *_: str) -> None:
        self.y.backward(self.dy, retain_graph=True)
        self.backend.synchronize()

    def time_forward_backward(self, *_: str) -> None:
        x = self.x.detach().requires_grad_()
        self._forward(x, training=True).backward(self.dy)
        self.backend.synchronize()

    def peakmem_forward_backward(self, *_: str) -> None:
        x = self.x.detach().requires_grad_()
        self._forward(x, training=True).backward(self.dy)
        self.backend.synchronize()


def textbook_forward(
    x: np.ndarray,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    axis: int,
    training: bool,
) -> tuple[np.ndarray, tuple[Any, ...]]:
    """The hand-written NumPy batch norm (cs231n style): y and a cache for the backward."""
    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    w, b = weight.reshape(shape), bias.reshape(shape)
    if training:
        mean = x.mean(axis=axes, keepdims=True)
        var = x.var(axis=axes, keepdims=True)
        n = x.size // x.shape[axis]
        running_mean = (1 - MOMENTUM) * running_mean + MOMENTUM * mean.reshape(-1)
        unbiased = var.reshape(-1).astype(running_var.dtype) * (n / (n - 1))
        running_var = (1 - MOMENTUM) * running_var + MOMENTUM * unbiased
    else:
        mean, var = running_mean.reshape(shape), running_var.reshape(shape)
    invstd = 1.0 / np.sqrt(var + EPS)
    xhat = (x - mean) * invstd
    y = w * xhat + b
    return y, (xhat, invstd, w, axes, running_mean, running_var)


def textbook_backward(dy: np.ndarray, cache: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    """dx, dweight, dbias from the cache, by the textbook formula."""
    xhat, invstd, w, axes, _, _ = cache
    n = xhat.size // invstd.size
    dxhat = dy * w
    dx = (
        invstd
        / n
        * (
            n * dxhat
            - dxhat.sum(axis=axes, keepdims=True)
            - xhat * (dxhat * xhat).sum(axis=axes, keepdims=True)
        )
    )
    return dx, (dy * xhat).sum(axis=axes), dy.sum(axis=axes)


@timing
class TextbookNumPy:
    """The NumPy batch norm people write by hand, for the '2x faster than NumPy' ratio."""

    params = (["numpy"], SHAPE_NAMES, list(DTYPES))
    param_names = ("backend", "shape", "dtype")
    timeout = 300

    def setup(self, backend: str, shape: str, dtype: str) -> None:
        if backend not in BACKENDS:
            raise NotImplementedError(f"{backend} is not among ANYBN_BENCH_BACKENDS")
        self.backend = require(backend, dtype)
        set_threads()
        self.d = make_data(self.backend, SHAPES[shape], dtype)
        _, self.cache = self._forward(training=True)

    def _forward(self, training: bool) -> tuple[np.ndarray, tuple[Any, ...]]:
        d = self.d
        return textbook_forward(
            d.x, d.running_mean, d.running_var, d.weight, d.bias, d.axis, training
        )

    def time_forward_train(self, *_: str) -> None:
        self._forward(training=True)

    def time_forward_eval(self, *_: str) -> None:
        self._forward(training=False)

    def time_backward(self, *_: str) -> None:
        textbook_backward(self.d.dy, self.cache)

    def time_forward_backward(self, *_: str) -> None:
        _, cache = self._forward(training=True)
        textbook_backward(self.d.dy, cache)

    def peakmem_forward_backward(self, *_: str) -> None:
        _, cache = self._forward(training=True)
        textbook_backward(self.d.dy, cache)


@timing
class TorchModule:
    """``anybn.torch.BatchNorm1d/2d`` against ``nn.BatchNorm1d/2d``: forward + ``backward()``."""

    params = (["anybn", "torch"], SHAPE_NAMES, list(DTYPES))
    param_names = ("module", "shape", "dtype")
    timeout = 300

    def setup(self, module: str, shape: str, dtype: str) -> None:
        backend = require("torch", dtype)  # skipped where torch is not installed
        import torch
        set_threads()
        spec = SHAPES[shape]
        d = make_data(backend, spec, dtype)
        if module == "anybn":
            import anybn.torch as abt

            classes = {2: abt.BatchNorm1d, 4: abt.BatchNorm2d}
        else:
            classes = {2: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d}
        self.m = classes[len(spec.dims)](spec.channels).to(d.x.dtype)
        self.x, self.dy = d.x, d.dy
        self.time_forward_backward()

    def time_forward_backward(self, *_: str) -> None:
        x = self.x.detach().requires_grad_()
        self.m(x).backward(self.dy)

    def time_forward_train(self, *_: str) -> None:
        import torch

        with torch.no_grad():
            self.m(self.x)


def jax_batch_norm(x: Any, weight: Any, bias: Any, axis: int) -> Any:
    """The plain jax.numpy batch norm (training): y, and the batch mean and variance."""
    import jax.numpy as jnp

    axes = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    xf = x.astype(jnp.float32)
    mean = xf.mean(axis=axes, keepdims=True)
    var = xf.var(axis=axes, keepdims=True)
    y = (xf - mean) * (weight.reshape(shape) / jnp.sqrt(var + EPS)) + bias.reshape(shape)
    return y.astype(x.dtype)


@timing
class JaxJit:
    """``jax.jit`` of :func:`jax_batch_norm` and of its VJP (forward + backward), on the CPU."""

    params = (SHAPE_NAMES, list(DTYPES))
    param_names = ("shape", "dtype")
    timeout = 300

    def setup(self, shape: str, dtype: str) -> None:
        try:
            import jax
            import jax.numpy as jnp
        except ImportError as e:
            raise NotImplementedError(f"jax is not installed ({e})") from e
        self.jax = jax
        backend = require("numpy", dtype)
        d = make_data(backend, SHAPES[shape], dtype)
        axis = d.axis
        to = jax.device_put
        self.x, self.dy = to(d.x), to(d.dy)
        self.w, self.b = to(d.weight), to(d.bias)

        def fwd(x: Any, w: Any, b: Any) -> Any:
            return jax_batch_norm(x, w, b, axis)

        def fwd_bwd(x: Any, w: Any, b: Any, dy: Any) -> Any:
            y, vjp = jax.vjp(fwd, x, w, b)
            return y, vjp(dy)

        self.fwd = jax.jit(fwd)
        self.fwd_bwd = jax.jit(fwd_bwd)
        jax.block_until_ready(self.fwd(self.x, self.w, self.b))
        jax.block_until_ready(self.fwd_bwd(self.x, self.w, self.b, self.dy))
        del jnp

    def time_forward_train(self, *_: str) -> None:
        self.jax.block_until_ready(self.fwd(self.x, self.w, self.b))

    def time_forward_backward(self, *_: str) -> None:
        self.jax.block_until_ready(self.fwd_bwd(self.x, self.w, self.b, self.dy))
