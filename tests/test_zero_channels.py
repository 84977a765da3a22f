"""Inputs with no channels: empty results on every backend, kernel and entry point.

A tensor of shape ``(N, 0, ...)`` has values per channel but no channel: the
forward and backward return empty results of the right shapes and dtypes (as
NumPy, JAX and Dask always did, and as ``torch.nn.functional.batch_norm`` does),
whichever fast path or kernel would otherwise serve the call. The oracle is
``torch.nn.functional.batch_norm`` in float64 with autograd where torch is
installed, and the shapes NumPy broadcasting gives in any case.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from _helpers import TRAIN_EVAL, assert_like, batch_norm, batch_norm_backward, compute_dtype_name

from anybn import _kernels as _fastpaths
from anybn._kernels import numba_cpu
from anybn._testing.backends import Backend

#: (shape, channel axis): channels first, 2-D, no values at all, channels-last, 4-D.
ZERO_CHANNEL_DIMS = [
    pytest.param(((4, 0, 5), 1), id="NCL"),
    pytest.param(((4, 0), 1), id="NC"),
    pytest.param(((0, 0, 5), 1), id="empty-batch"),
    pytest.param(((2, 3, 4, 0), -1), id="NHWC"),
    pytest.param(((4, 0, 3, 3), 1), id="NCHW"),
]


@pytest.fixture(params=["fast", "no-numba", "generic"])
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Which kernels may serve the call: every fast path, all but Numba's, or none."""
    if request.param == "no-numba":
        monkeypatch.setattr(numba_cpu, "AVAILABLE", False)  # as with ANYBN_NUMBA=0
    with _fastpaths.fast_paths(request.param != "generic"):
        yield request.param


def _torch_oracle(shape: tuple[int, ...], axis: int, training: bool) -> dict[str, tuple[int, ...]]:
    """The result shapes of ``torch.nn.functional.batch_norm`` and autograd, in float64."""
    torch = pytest.importorskip("torch")
    x = torch.ones(np.moveaxis(np.empty(shape), axis, 1).shape, dtype=torch.float64)
    x.requires_grad_(True)
    rm, rv = torch.zeros(0, dtype=torch.float64), torch.ones(0, dtype=torch.float64)
    y = torch.nn.functional.batch_norm(x, rm, rv, training=training)
    (dx,) = torch.autograd.grad(y, x, torch.ones_like(y), allow_unused=True)
    moved = tuple(np.moveaxis(np.empty(tuple(y.shape)), 1, axis).shape)
    return {"y": moved, "dx": moved, "running_mean": tuple(rm.shape), "dims": tuple(dx.shape)}


@pytest.mark.parametrize("dims", ZERO_CHANNEL_DIMS)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@TRAIN_EVAL
def test_zero_channels_give_empty_results(
    backend: Backend,
    dtype: str,
    training: bool,
    affine: bool,
    dims: tuple[tuple[int, ...], int],
    kernels: str,
) -> None:
    """Forward and backward on ``(N, 0, ...)``: no exception, empty results like torch's."""
    if kernels != "fast" and backend.id.split(":")[0] not in ("numpy", "torch"):
        pytest.skip("only NumPy arrays and torch tensors have several kernels")
    shape, axis = dims
    x = backend.asarray(np.ones(shape), dtype)
    dy = backend.asarray(np.ones(shape), dtype)
    vector = lambda value: backend.asarray(np.full(0, value), dtype)  # noqa: E731
    weight, bias = (vector(1.0), vector(0.0)) if affine else (None, None)
    rm, rv = vector(0.0), vector(1.0)

    out = batch_norm(x, rm, rv, weight, bias, training=training, axis=axis)
    grads = batch_norm_backward(dy, x, weight, out.mean, out.invstd, training=training, axis=axis)

    stats = compute_dtype_name(dtype)
    for name, got, want in (
        ("y", out.y, dtype),
        ("mean", out.mean, stats),
        ("invstd", out.invstd, stats),
        ("new_running_mean", out.new_running_mean, dtype),
        ("new_running_var", out.new_running_var, dtype),
        ("dx", grads.dx, dtype),
        ("dweight", grads.dweight, stats),
        ("dbias", grads.dbias, stats),
    ):
        assert_like(got, x, want, name)
    assert tuple(out.y.shape) == tuple(grads.dx.shape) == shape
    for v in (out.mean, out.invstd, out.new_running_mean, out.new_running_var):
        assert tuple(v.shape) == (0,)
    assert tuple(grads.dweight.shape) == tuple(grads.dbias.shape) == (0,)
    oracle = _torch_oracle(shape, axis, training)
    assert tuple(out.y.shape) == oracle["y"] and tuple(grads.dx.shape) == oracle["dx"]
    assert tuple(out.new_running_mean.shape) == oracle["running_mean"]


# --- torch entry points -----------------------------------------------------------------------

TORCH_DTYPES = ["float32", "float64", "float16", "bfloat16"]


def _torch_dtype(name: str) -> Any:
    torch = pytest.importorskip("torch")
    return getattr(torch, name)


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@TRAIN_EVAL
def test_zero_channels_torch_autograd(dtype: str, training: bool) -> None:
    """The core on tensors that require grad: autograd through an empty result, like torch's."""
    torch = pytest.importorskip("torch")
    import anybn

    dt = _torch_dtype(dtype)
    results = []
    for fn in (
        lambda x, rm, rv: anybn.batch_norm(x, rm, rv, training=training).y,
        lambda x, rm, rv: torch.nn.functional.batch_norm(x, rm, rv, training=training),
    ):
        x = torch.ones(4, 0, 5, dtype=dt, requires_grad=True)
        y = fn(x, torch.zeros(0, dtype=dt), torch.ones(0, dtype=dt))
        (dx,) = torch.autograd.grad(y, x, torch.ones_like(y))
        results.append((y.shape, y.dtype, dx.shape, dx.dtype))
    assert results[0] == results[1]


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noaffine"])
@pytest.mark.parametrize("dim", [1, 2, 3])
@TRAIN_EVAL
def test_zero_channels_torch_drop_ins(dtype: str, affine: bool, dim: int, training: bool) -> None:
    """``BatchNorm{1,2,3}d(0)`` give torch's empty result (``nn`` raises IndexError with
    weight or bias, a torch bug: its ``affine=False`` result is the oracle there)."""
    torch = pytest.importorskip("torch")
    import anybn.torch as abt

    dt = _torch_dtype(dtype)
    params = torch.float32 if dt in (torch.float16, torch.bfloat16) else dt
    shape = {1: (4, 0, 5), 2: (4, 0, 3, 3), 3: (4, 0, 2, 3, 3)}[dim]
    drop_in = getattr(abt, f"BatchNorm{dim}d")(0, affine=affine, dtype=params)
    reference = getattr(torch.nn, f"BatchNorm{dim}d")(0, affine=False, dtype=params)
    results = []
    for m in (drop_in, reference):
        m.train(training)
        x = torch.ones(shape, dtype=dt, requires_grad=True)
        y = m(x)
        y.sum().backward()
        assert x.grad is not None
        results.append((y.shape, y.dtype, x.grad.shape, int(m.num_batches_tracked)))
        if m is drop_in and affine:
            assert m.weight.grad is not None and m.weight.grad.shape == (0,)
            assert m.bias.grad is not None and m.bias.grad.shape == (0,)
    assert results[0] == results[1]
    if dim == 2:  # channels_last input
        x = torch.ones(shape, dtype=dt).to(memory_format=torch.channels_last)
        assert drop_in(x).shape == shape


@pytest.mark.parametrize("dtype", TORCH_DTYPES)
@TRAIN_EVAL
def test_zero_channels_torch_functional(dtype: str, training: bool) -> None:
    """``anybn.torch.batch_norm`` with zero channels, against ``F.batch_norm``."""
    torch = pytest.importorskip("torch")
    import anybn.torch as abt

    dt = _torch_dtype(dtype)
    x = torch.ones(4, 0, 5, dtype=dt)
    rm, rv = torch.zeros(0, dtype=dt), torch.ones(0, dtype=dt)
    want = torch.nn.functional.batch_norm(x, rm, rv, training=training)
    for weight, bias in ((None, None), (torch.ones(0, dtype=dt), torch.zeros(0, dtype=dt))):
        got = abt.batch_norm(x, rm.clone(), rv.clone(), weight, bias, training=training)
        assert (got.shape, got.dtype) == (want.shape, want.dtype)


@pytest.mark.parametrize("library", ["numpy", "torch"])
def test_zero_channels_lazy_layer(library: str) -> None:
    """``anybn.BatchNorm(None)`` takes its channel count (0) from a zero-channel batch."""
    import anybn

    if library == "torch":
        torch = pytest.importorskip("torch")
        x: Any = torch.ones(4, 0, 5)
    else:
        x = np.ones((4, 0, 5))
    bn = anybn.BatchNorm(None)
    assert tuple(bn(x).shape) == (4, 0, 5)
    assert bn.num_batches_tracked == 1
