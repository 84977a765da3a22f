"""The compiled CPU kernels (:mod:`anybn._kernels.numba_cpu`): accuracy, layouts, threads, fallback.

Compared against the float64 reference (:mod:`anybn._testing.reference`) on data offset by up to
1e5, in every layout the kernels see, and against themselves on one and on two threads
(the partial sums have fixed places, so the bits must not change). Without Numba (or with
``ANYBN_NUMBA=0``) only the fallback test runs: the dispatcher then serves NumPy arrays with
:mod:`anybn._kernels.numpy_blocks`.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from _helpers import backward64

import anybn
from anybn._kernels import numba_cpu as cpu
from anybn._kernels import numpy_blocks as _numpy_kernels
from anybn._kernels import torch_cpu
from anybn._testing.reference import reference_forward

needs_numba = pytest.mark.skipif(not cpu.AVAILABLE, reason="Numba not installed or ANYBN_NUMBA=0")

LAYOUTS = {
    "(N,C)": ((64, 24), 1, None),
    "(N,C,H,W)": ((4, 6, 5, 7), 1, None),
    "channels-last": ((4, 5, 7, 6), 3, None),
    "transposed": ((24, 64), 0, "T"),
    "strided": ((16, 6, 5, 7), 1, "slice"),
    "long planes": ((2, 3, 40000), 1, None),  # several chunks per plane
}


def _data(shape, axis, how, dtype, offset):
    rng = np.random.default_rng(4)
    x = rng.standard_normal(shape) + offset
    dy = rng.standard_normal(shape)
    if how == "T":
        x, dy = x.T, dy.T
        axis = 1 - axis
    elif how == "slice":
        x, dy = x[::2], dy[::2]
    c = x.shape[axis]
    w = rng.uniform(0.5, 1.5, c)
    b = rng.standard_normal(c)
    return x.astype(dtype), dy.astype(dtype), w.astype(dtype), b.astype(dtype), axis


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("offset", [0.0, 1e2, 1e5])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_compiled_kernels_match_float64_reference(layout, offset, dtype):
    x, dy, w, b, axis = _data(*LAYOUTS[layout], dtype, offset)
    c = x.shape[axis]
    rm, rv = np.zeros(c, dtype), np.ones(c, dtype)
    y, mean, invstd, _, nrv = cpu.forward(
        x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis
    )
    ref = reference_forward(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis)
    # float64: the reference's own mean of values near 1e5 is off by a few ulps of 1e5
    tol = 3e-6 if dtype == "float32" else 1e-12 * max(1.0, offset / 10)
    assert y.dtype == x.dtype and y.strides == np.empty_like(x).strides  # layout kept
    np.testing.assert_allclose(y, ref.y, rtol=0, atol=tol * 8)
    np.testing.assert_allclose(mean, ref.mean, rtol=tol)
    np.testing.assert_allclose(invstd, ref.invstd, rtol=tol)
    np.testing.assert_allclose(nrv, ref.running_var, rtol=tol)
    dx, dw, db = cpu.backward(dy, x, w, mean, invstd, training=True, axis=axis)
    # The backward takes the statistics it is given (rounded to x's dtype): so does this one.
    gdx, gdw, gdb = backward64(dy, x, w, mean, invstd, axis)
    scale = np.max(np.abs(gdx))
    np.testing.assert_allclose(dx, gdx, rtol=0, atol=tol * 8 * scale)
    np.testing.assert_allclose(dw, gdw, rtol=tol * 8, atol=tol * 8 * np.sqrt(dy.size))
    np.testing.assert_allclose(db, gdb, rtol=tol * 8, atol=tol * 8 * np.sqrt(dy.size))
    # eval
    y_eval, *_ = cpu.forward(x, rm, rv, w, b, training=False, momentum=0.1, eps=1e-5, axis=axis)
    ref_eval = reference_forward(x, rm, rv, w, b, training=False, eps=1e-5, axis=axis)
    np.testing.assert_allclose(y_eval, ref_eval.y, rtol=tol * 8, atol=tol)
    dx_eval, _, _ = cpu.backward(dy, x, None, mean, invstd, training=False, axis=axis)
    np.testing.assert_allclose(dx_eval, dy * np.expand_dims(invstd, tuple(
        i for i in range(x.ndim) if i != axis)), rtol=tol)  # fmt: skip


@needs_numba
@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("layout", ["(N,C)", "(N,C,H,W)", "channels-last"])
def test_compiled_kernels_do_not_depend_on_threads(layout, dtype, monkeypatch):
    shape, axis, how = LAYOUTS[layout]
    shape = (shape[0] * 512, *shape[1:])  # above PARALLEL_MIN
    x, dy, w, b, axis = _data(shape, axis, how, dtype, 1e3)
    assert x.size >= cpu.PARALLEL_MIN
    outs = []
    for threads in (1, 2):
        previous = _numpy_kernels.set_num_threads(threads)
        try:
            f = cpu.forward(x, None, None, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis)
            g = cpu.backward(dy, x, w, f[1], f[2], training=True, axis=axis)
        finally:
            _numpy_kernels.set_num_threads(previous)
        outs.append((*f[:3], *g))
    for a, b_ in zip(*outs, strict=True):
        np.testing.assert_array_equal(a, b_)


@needs_numba
def test_non_finite_values_stay_in_their_channel():
    x = np.random.default_rng(1).standard_normal((300, 4)).astype(np.float32)
    x[5, 1] = np.inf
    x[7, 2] = np.nan
    y, mean, _, _, _ = cpu.forward(
        x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1
    )
    assert np.isfinite(y[:, [0, 3]]).all() and np.isfinite(mean[[0, 3]]).all()
    assert not np.isfinite(mean[1]) and not np.isfinite(mean[2])


@needs_numba
def test_dispatcher_uses_compiled_kernels_for_numpy_and_torch_cpu():
    x = np.ones((4, 3), np.float32)
    assert torch_cpu._numpy_module(x) is cpu
    assert torch_cpu._numpy_module(x.astype(np.float16)) is cpu
    torch = pytest.importorskip("torch")
    t = torch.randn(64, 5, dtype=torch.float32) + 1e4
    out = anybn.batch_norm(t, training=True)
    ref = reference_forward(t.double().numpy(), None, None, None, None, training=True, axis=1)
    np.testing.assert_allclose(out.y.numpy(), ref.y, atol=2e-5)


def test_without_numba_the_numpy_kernels_serve():
    code = (
        "import numpy as np, anybn; from anybn._kernels import numpy_blocks, torch_cpu\n"
        "x = np.random.default_rng(0).standard_normal((64, 3)).astype(np.float32)\n"
        "assert torch_cpu._cpu_kernels() is None\n"
        "assert torch_cpu._numpy_module(x) is numpy_blocks\n"
        "out = anybn.batch_norm(x, training=True)\n"
        "assert abs(float(out.y.mean())) < 1e-5\n"
    )
    env = {**os.environ, "ANYBN_NUMBA": "0"}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, cwd=os.getcwd())
