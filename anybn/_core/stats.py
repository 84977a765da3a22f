"""Per-channel statistics: sums, centred moments and the Chan merge.

The batch variance is never computed as ``E[x^2] - E[x]^2``, which cancels
catastrophically when the mean is large compared with the spread
(pytorch/pytorch#5410, google/flax#1491). Instead :func:`centered_moments`
uses the two-pass algorithm with a mean correction (Chan, Golub & LeVeque,
1983): centre on the first-pass mean ``m1``, then

    corr = mean(x - m1)            # the first pass's rounding error
    M2   = sum((x - m1)^2) - n * corr^2
    mean = m1 + corr
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as compat

from .._typing import AnyArray
from .._xp import Array

__all__ = [
    "CenteredMoments",
    "centered_moments",
    "chan_merge",
    "channel_dot",
    "channel_sum",
    "masked_centered_moments",
    "reaching_loss",
]


def _wide_dtype(xp: ModuleType, a: Array) -> object | None:
    """float64 for float32 ``a`` where its namespace and device compute in float64, else None.

    A float32 sum along a non-contiguous axis (channels-last, ``(N, C)``) is a
    plain running sum in NumPy and array-api-strict: its error grows like
    ``n * eps`` (1.6e-5 relative for dweight on channels-last (32, 56, 56, 32)).
    Accumulating in float64 (``sum(..., dtype=float64)``, which casts on load and
    allocates nothing of x's size) keeps it at float32's own rounding. JAX without
    ``jax_enable_x64`` and torch on MPS have no float64: they keep their own sums.
    """
    if a.dtype != xp.float32:
        return None
    if compat.is_jax_array(a):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return None
    if compat.is_torch_array(a) and a.device.type == "mps":
        return None
    return xp.float64


def channel_sum(xp: ModuleType, a: Array, axes: tuple[int, ...]) -> Array:
    """Sum over ``axes``, keeping them as length-1 dimensions.

    float32 input accumulates in float64 where the namespace has it
    (see :func:`_wide_dtype`); the result has ``a``'s dtype.
    """
    wide = _wide_dtype(xp, a)
    if wide is None:
        return xp.sum(a, axis=axes, keepdims=True)
    return xp.astype(xp.sum(a, axis=axes, keepdims=True, dtype=wide), a.dtype)


def _einsum_subscripts(ndim: int, axes: tuple[int, ...]) -> str:
    letters = "abcdefghijklmnopqrstuvwxyz"[:ndim]
    kept = "".join(c for i, c in enumerate(letters) if i not in axes)
    return f"{letters},{letters}->{kept}"


def channel_dot(xp: ModuleType, a: Array, b: Array, axes: tuple[int, ...]) -> Array:
    """``sum(a * b)`` over ``axes``, keeping them as length-1 dimensions.

    On NumPy this is a fused multiply-reduce (``einsum``) that never
    materialises ``a * b``; elsewhere it is the plain array-API expression.
    float32 input accumulates in float64 where the namespace has it, as in
    :func:`channel_sum`; the result has ``a``'s dtype.
    """
    wide: Any = _wide_dtype(xp, a)
    if compat.is_numpy_array(a) and a.ndim <= 26:
        import numpy as np

        out = np.einsum(_einsum_subscripts(a.ndim, axes), a, b, dtype=wide)
        return np.expand_dims(out.astype(a.dtype, copy=False), axes)
    if wide is None:
        return xp.sum(a * b, axis=axes, keepdims=True)
    return xp.astype(xp.sum(a * b, axis=axes, keepdims=True, dtype=wide), a.dtype)


class CenteredMoments(NamedTuple):
    """Per-channel moments of ``x``, kept broadcastable against ``x``.

    Attributes
    ----------
    mean : array
        The batch mean, ``m1 + corr``.
    m2 : array
        The sum of squared deviations from ``mean``.
    centered : array
        ``x - m1``, a fresh array of x's shape that callers may reuse.
    correction : array
        ``mean(x - m1)``: subtract it from ``centered`` to centre exactly on ``mean``.
    first_pass_mean : array
        ``m1`` itself: ``m1 + correction`` is the mean to more digits than ``mean``
        holds (the synchronized forward merges that pair across ranks).
    """

    mean: Array
    m2: Array
    centered: Array
    correction: Array
    first_pass_mean: Array


def centered_moments(
    xp: ModuleType, x: Array, axes: tuple[int, ...], count: int
) -> CenteredMoments:
    """Mean and M2 of ``x`` over ``axes`` by the corrected two-pass algorithm.

    Parameters
    ----------
    xp : module
        The array namespace of ``x``.
    x : array
        The data, in the dtype to accumulate in.
    axes : tuple of int
        The axes to reduce over.
    count : int
        The number of values reduced per channel (the product of ``axes`` extents).

    Returns
    -------
    CenteredMoments
    """
    m1 = channel_sum(xp, x, axes) / count
    centered = x - m1
    correction = channel_sum(xp, centered, axes) / count
    m2 = channel_dot(xp, centered, centered, axes) - count * correction * correction
    return CenteredMoments(m1 + correction, m2, centered, correction, m1)


def masked_centered_moments(
    xp: ModuleType, x: Array, mask: Array, axes: tuple[int, ...], count: Array
) -> CenteredMoments:
    """:func:`centered_moments` over the values where the boolean ``mask`` is True.

    The same corrected two-pass algorithm, each sum over the counted values only::

        m1   = sum_{mask} x / n
        corr = sum_{mask} (x - m1) / n
        M2   = sum_{mask} (x - m1)^2 - n * corr^2

    The values left out are *selected* away (``where(mask, x, 0)``), never
    multiplied by 0: a NaN or inf there (padding) does not reach the statistics,
    where ``0 * nan`` would. ``count`` (``n``, per channel, broadcastable against
    ``x``) is the number of True values. ``centered`` is ``x - m1`` at every
    position, masked or not.
    """
    zero = xp.zeros((), dtype=x.dtype, device=compat.device(x))
    m1 = channel_sum(xp, xp.where(mask, x, zero), axes) / count
    centered = x - m1
    kept = xp.where(mask, centered, zero)
    correction = channel_sum(xp, kept, axes) / count
    m2 = channel_dot(xp, kept, kept, axes) - count * correction * correction
    return CenteredMoments(m1 + correction, m2, centered, correction, m1)


def reaching_loss(xp: ModuleType, centered: Array, mask: Array, dy: Array) -> Array:
    """``centered`` where a position reaches the loss, 0 elsewhere: the backward's factor.

    With a mask the backward's sums still run over every position (``y`` is
    computed everywhere, and everywhere depends on the statistics), but a
    masked-out position whose ``dy`` is 0 adds nothing to ``sum(dy * (x - mean))``
    whatever its ``x``: padding may hold NaN or inf, and ``0 * nan`` is NaN. Such
    terms are selected away, never multiplied by 0.
    """
    zero = xp.zeros((), dtype=centered.dtype, device=compat.device(centered))
    return xp.where(xp.logical_or(mask, dy != 0), centered, zero)


def chan_merge(
    count_a: AnyArray | float,
    mean_a: AnyArray,
    m2_a: AnyArray,
    count_b: AnyArray | float,
    mean_b: AnyArray,
    m2_b: AnyArray,
) -> tuple[Array | float, Array, Array]:
    """Merge the (count, mean, M2) statistics of two disjoint batches.

    The pairwise update of Chan, Golub & LeVeque::

        n     = n_a + n_b
        delta = mean_b - mean_a
        mean  = mean_a + delta * n_b / n
        M2    = M2_a + M2_b + delta^2 * n_a * n_b / n

    Parameters
    ----------
    count_a, mean_a, m2_a : scalar or array
        Count, mean and sum of squared deviations of the first batch.
    count_b, mean_b, m2_b : scalar or array
        The same for the second batch.

    Returns
    -------
    tuple
        ``(count, mean, m2)`` of the union of both batches.

    Examples
    --------
    >>> import numpy as np
    >>> a, b = np.array([1.0, 2.0, 3.0]), np.array([10.0, 20.0])
    >>> n, mean, m2 = chan_merge(3, a.mean(), ((a - a.mean())**2).sum(),
    ...                          2, b.mean(), ((b - b.mean())**2).sum())
    >>> both = np.concatenate([a, b])
    >>> bool(np.isclose(mean, both.mean()) and np.isclose(m2 / n, both.var()))
    True
    """
    count = count_a + count_b
    delta = mean_b - mean_a
    mean = mean_a + delta * (count_b / count)
    m2 = m2_a + m2_b + delta * delta * (count_a * count_b / count)
    return count, mean, m2
