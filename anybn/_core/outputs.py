"""What the forward and backward return: two NamedTuples, the public result types."""

from __future__ import annotations

from typing import NamedTuple

from .._xp import Array

__all__ = ["BatchNormGrads", "BatchNormOutput"]


class BatchNormOutput(NamedTuple):
    """What :func:`anybn.batch_norm` returns.

    Attributes
    ----------
    y : array
        The normalized output, with x's shape and dtype.
    mean : array
        The per-channel mean used (the batch mean in training, the running mean
        in eval), shape ``(C,)``, float32 for half-precision input.
    invstd : array
        The per-channel ``1 / sqrt(var + eps)`` used, shape ``(C,)``.
    new_running_mean : array or None
        The updated running mean (training), the given one (eval), or None.
    new_running_var : array or None
        The updated running variance (training), the given one (eval), or None.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> y, mean, invstd, new_rm, new_rv = anybn.batch_norm(
    ...     x, np.zeros(2), np.ones(2), training=True)
    >>> new_rm, new_rv
    (array([0.2, 2. ]), array([ 1.1, 20.9]))
    """

    y: Array
    mean: Array
    invstd: Array
    new_running_mean: Array | None
    new_running_var: Array | None


class BatchNormGrads(NamedTuple):
    """What :func:`anybn.batch_norm_backward` returns.

    Attributes
    ----------
    dx : array
        The gradient with respect to x, with x's shape and dtype.
    dweight : array
        ``sum(dy * xhat)`` per channel, shape ``(C,)``.
    dbias : array
        ``sum(dy)`` per channel, shape ``(C,)``.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    >>> out = anybn.batch_norm(x, training=True)
    >>> dx, dweight, dbias = anybn.batch_norm_backward(x, x, None, out.mean, out.invstd)
    >>> dbias
    array([ 9., 60.])
    """

    dx: Array
    dweight: Array
    dbias: Array
