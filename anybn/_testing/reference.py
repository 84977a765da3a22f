"""A plain float64 NumPy batch norm, independent of the core.

Written as directly as possible (channel axis moved last, columns reduced with
NumPy's own ``mean``/``var``), so it shares no code and no algorithm with
:mod:`anybn._api`. The report and the tests compare against it.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["ReferenceBackward", "ReferenceForward", "reference_backward", "reference_forward"]


class ReferenceForward(NamedTuple):
    y: np.ndarray
    mean: np.ndarray
    invstd: np.ndarray
    running_mean: np.ndarray | None
    running_var: np.ndarray | None


class ReferenceBackward(NamedTuple):
    dx: np.ndarray
    dweight: np.ndarray
    dbias: np.ndarray


def _f64(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


def _columns(x: np.ndarray, axis: int) -> np.ndarray:
    """x with the channel axis last, flattened to (values, C)."""
    xm = np.moveaxis(x, axis, -1)
    return xm.reshape(-1, xm.shape[-1])


def _uncolumns(cols: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    shape = np.moveaxis(x, axis, -1).shape
    return np.moveaxis(cols.reshape(shape), -1, axis)


def reference_forward(
    x: np.ndarray,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    weight: np.ndarray | None = None,
    bias: np.ndarray | None = None,
    *,
    training: bool,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
) -> ReferenceForward:
    """Forward pass in float64, PyTorch's semantics."""
    x = np.asarray(x, dtype=np.float64)
    cols = _columns(x, axis)
    _n, c = cols.shape
    w = np.ones(c) if weight is None else _f64(weight)
    b = np.zeros(c) if bias is None else _f64(bias)
    rm, rv = _f64(running_mean), _f64(running_var)
    if training:
        mean = cols.mean(axis=0)
        var = cols.var(axis=0)
        if rm is not None and rv is not None:
            rm = (1 - momentum) * rm + momentum * mean
            rv = (1 - momentum) * rv + momentum * cols.var(axis=0, ddof=1)
    else:
        assert rm is not None and rv is not None
        mean, var = rm, rv
    invstd = 1.0 / np.sqrt(var + eps)
    y = (cols - mean) * invstd * w + b
    return ReferenceForward(_uncolumns(y, x, axis), mean, invstd, rm, rv)


def reference_backward(
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    *,
    training: bool,
    running_mean: np.ndarray | None = None,
    running_var: np.ndarray | None = None,
    eps: float = 1e-5,
    axis: int = 1,
) -> ReferenceBackward:
    """Backward pass in float64, from the textbook formulas.

    In training the statistics are recomputed from ``x`` in float64; in eval
    they are the running statistics.
    """
    x = np.asarray(x, dtype=np.float64)
    g = _columns(np.asarray(dy, dtype=np.float64), axis)
    cols = _columns(x, axis)
    n, c = cols.shape
    w = np.ones(c) if weight is None else _f64(weight)
    if training:
        mean, var = cols.mean(axis=0), cols.var(axis=0)
    else:
        mean, var = _f64(running_mean), _f64(running_var)
    invstd = 1.0 / np.sqrt(var + eps)
    xhat = (cols - mean) * invstd
    dbias = g.sum(axis=0)
    dweight = (g * xhat).sum(axis=0)
    if training:
        dx = w * invstd / n * (n * g - dbias - xhat * dweight)
    else:
        dx = w * invstd * g
    return ReferenceBackward(_uncolumns(dx, x, axis), dweight, dbias)
