"""The generic path's reductions (anybn._core.stats): float32 within 2e-6 relative of float64.

A float32 running sum along a non-contiguous axis loses about ``n * eps``; the
generic path is what JAX, array-api-strict, Dask and tracked torch tensors get,
so its sums accumulate in float64 where the namespace has it (issue 11).
"""

from __future__ import annotations

import array_api_compat as compat
import numpy as np
import pytest

import anybn
from anybn._core.stats import channel_dot, channel_sum
from anybn._kernels import fast_paths
from anybn._testing.backends import Backend
from anybn._testing.reference import reference_backward, reference_forward

#: (shape, axis): channels-last with 100k values per channel (the case that lost 1.6e-5),
#: NC planes, and 2-D (N, C).
LAYOUTS = [((32, 56, 56, 32), -1), ((16, 8, 56, 56), 1), ((65536, 16), 1)]


def _rel(got: object, expected: np.ndarray, backend: Backend) -> float:
    g = backend.to_numpy(got).astype(np.float64).reshape(expected.shape)
    return float(np.max(np.abs(g - expected)) / np.max(np.abs(expected)))


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS, ids=["channels-last", "planes", "2d"])
def test_channel_sums_float32_within_2e_6(backend: Backend, shape: tuple, axis: int) -> None:
    if "float32" not in backend.dtypes:
        pytest.skip("no float32")
    rng = np.random.default_rng(17)
    a = (rng.standard_normal(shape) + 3).astype(np.float32)
    b = rng.standard_normal(shape).astype(np.float32)
    ax = axis % len(shape)
    axes = tuple(i for i in range(len(shape)) if i != ax)
    xa, xb = backend.asarray(a, "float32"), backend.asarray(b, "float32")
    xp = compat.array_namespace(xa)
    s = channel_sum(xp, xa, axes)
    d = channel_dot(xp, xa, xb, axes)
    assert s.dtype == xa.dtype and d.dtype == xa.dtype
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert _rel(s, a64.sum(axes, keepdims=True), backend) <= 2e-6
    assert _rel(d, (a64 * b64).sum(axes, keepdims=True), backend) <= 2e-6


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS[:1] + LAYOUTS[2:], ids=["channels-last", "2d"])
def test_generic_path_float32_statistics_and_grads(
    backend: Backend, shape: tuple, axis: int
) -> None:
    """The generic path end to end: mean, running_var, dweight and dbias within 2e-6."""
    if "float32" not in backend.dtypes:
        pytest.skip("no float32")
    rng = np.random.default_rng(23)
    x = (rng.standard_normal(shape) + 3).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    with fast_paths(False):
        out = anybn.batch_norm(
            backend.asarray(x, "float32"), backend.asarray(rm, "float32"),
            backend.asarray(rv, "float32"), training=True, axis=axis,
        )  # fmt: skip
        g = anybn.batch_norm_backward(
            backend.asarray(dy, "float32"), backend.asarray(x, "float32"), None,
            out.mean, out.invstd, axis=axis,
        )  # fmt: skip
    ref = reference_forward(x, rm, rv, training=True, axis=axis)
    refb = reference_backward(dy, x, None, training=True, axis=axis)
    assert _rel(out.mean, ref.mean, backend) <= 2e-6
    assert _rel(out.new_running_var, ref.running_var, backend) <= 2e-6
    assert _rel(g.dweight, refb.dweight, backend) <= 2e-6
    assert _rel(g.dbias, refb.dbias, backend) <= 2e-6
