"""Typed call sites that must pass mypy (``python .ci/check_typing.py``).

Not a test module: pytest does not collect ``tests/typecheck`` (see the repository's
``conftest.py``); the functions are never called, mypy only reads them.
"""

from __future__ import annotations

from typing import Any, assert_type

import array_api_strict as xps
import numpy as np
import numpy.typing as npt
import torch

import anybn


def numpy_calls(x: npt.NDArray[np.float32]) -> None:
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    out = anybn.batch_norm(x, rm, rv, None, None, training=True, momentum=0.1, eps=1e-5)
    assert_type(out, anybn.BatchNormOutput)
    grads = anybn.batch_norm_backward(np.ones_like(x), x, None, out.mean, out.invstd)
    assert_type(grads, anybn.BatchNormGrads)
    bn = anybn.BatchNorm(3)
    y = bn(x)
    assert_type(y, npt.NDArray[np.float32])  # the layer returns the input's array type
    assert_type(bn.forward(x), npt.NDArray[np.float32])
    bn.backward(np.ones_like(y))
    merged = anybn.chan_merge(3, x.mean(axis=0), x.var(axis=0), 2.0, rm, rv)
    # the synchronisation options: a deadline (seconds or a timedelta), a JAX axis name
    import datetime

    anybn.batch_norm(x, training=True, comm="mpi", timeout=30.0)
    anybn.batch_norm(x, training=True, comm="mpi", timeout=datetime.timedelta(seconds=30))
    anybn.batch_norm_backward(x, x, None, out.mean, out.invstd, comm="mpi", timeout=5)
    anybn.batch_norm(x, training=True, axis_name="batch", axis_index_groups=[[0, 1], [2, 3]])
    anybn.BatchNorm(3, comm="mpi", timeout=60.0)
    assert_type(merged[1], Any)  # the statistics stay in the input's library, untyped
    # batch renormalization: the result type follows renorm=
    rn = anybn.batch_norm(
        x, rm, rv, training=True, renorm=True, renorm_mean=rm, renorm_std=rv,
        renorm_clipping={"rmax": 3.0, "dmax": 5.0}, renorm_momentum=0.01,
    )  # fmt: skip
    assert_type(rn, anybn.RenormOutput)
    anybn.batch_norm_backward(x, x, None, rn.mean, rn.invstd, renorm_r=rn.r, renorm_d=rn.d)
    flag: bool = bool(x.size)
    either = anybn.batch_norm(x, rm, rv, renorm=flag)
    assert_type(either, anybn.BatchNormOutput | anybn.RenormOutput)
    assert_type(anybn.batch_norm(x, training=True, virtual_batch_size=4), anybn.BatchNormOutput)
    anybn.BatchNorm(3, renorm=True, renorm_clipping={"rmax": 3.0}, virtual_batch_size=4)


def torch_calls(t: torch.Tensor) -> None:
    out = anybn.batch_norm(t, torch.zeros(3), torch.ones(3), training=True)
    anybn.batch_norm_backward(torch.ones_like(t), t, None, out.mean, out.invstd)
    assert_type(anybn.BatchNorm(3)(t), torch.Tensor)


def array_api_calls() -> None:
    x = xps.asarray([[1.0, 2.0], [3.0, 4.0]])
    anybn.batch_norm(x, training=True)


def user_code(x: anybn.AnyArray) -> anybn.AnyArray:
    """Code that accepts any array anybn accepts, annotated with the public protocol."""
    return anybn.batch_norm(x, training=True).y
