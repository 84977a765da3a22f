"""The generic kernel: batch norm written once against the Python array API standard.

Every formula of the forward and the backward is here, once: the statistics
(through :mod:`anybn._core.stats`), the normalisation with its folded rounding
correction, the running-statistics update, the empty batch and dx, dweight,
dbias. Every other kernel is tested against these functions, and the Dask
kernel reuses them with its own out-of-core moments and sums (the ``moments``
and ``sums`` hooks). They take a resolved call (:class:`anybn._call.Call`)
and never validate. Notation, per channel over the ``n`` values ``x_i``::

    mean   = (1/n) sum_i x_i
    var    = (1/n) sum_i (x_i - mean)^2                 (biased)
    invstd = 1 / sqrt(var + eps)
    xhat_i = (x_i - mean) * invstd
    y_i    = weight * xhat_i + bias
"""

from __future__ import annotations

from collections.abc import Callable
from types import ModuleType
from typing import TYPE_CHECKING, NamedTuple

import array_api_compat as compat

from .._xp import (
    Array,
    channel_shape,
    compute_dtype,
    is_concrete,
    param_shape,
    reduction_axes,
    stop_gradient,
    writeable,
)
from .outputs import BatchNormGrads, BatchNormOutput
from .stats import (
    centered_moments,
    channel_dot,
    channel_sum,
    masked_centered_moments,
    reaching_loss,
)

if TYPE_CHECKING:
    from .._call import Call

__all__ = [
    "Moments",
    "Sums",
    "backward",
    "batch_moments",
    "batch_sums",
    "counted_values",
    "empty_backward",
    "empty_forward",
    "forward",
]


def as_dtype(xp: ModuleType, a: Array, dtype: object) -> Array:
    """``a`` in ``dtype``, without a copy when it already is."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


_as = as_dtype


def _affine(xp: ModuleType, centered: Array, scale: Array, shift: Array | None) -> Array:
    """``centered * scale + shift``, updating the temporary in place where allowed."""
    if writeable(xp, centered):
        centered *= scale
        if shift is not None:
            centered += shift
        return centered
    out = centered * scale
    return out if shift is None else out + shift


# --- the empty batch -----------------------------------------------------------------------


def empty_forward(
    call: Call, x: Array, running_mean: Array | None, running_var: Array | None
) -> BatchNormOutput:
    """Training on a batch with no values: an empty y, NaN statistics, running ones kept.

    As PyTorch does: the running statistics are left as they are (returned as
    copies), and the backward gives zero dweight and dbias.
    """
    xp = call.xp
    nan = xp.full(
        param_shape(tuple(x.shape), call.axis),
        float("nan"),
        dtype=compute_dtype(xp, x.dtype),
        device=compat.device(x),
    )
    rm = None if running_mean is None else xp.asarray(running_mean, copy=True)
    rv = None if running_var is None else xp.asarray(running_var, copy=True)
    return BatchNormOutput(x * 0.0, nan, xp.asarray(nan, copy=True), rm, rv)


def empty_backward(call: Call, dy: Array, x: Array) -> BatchNormGrads:
    """The backward of an empty batch: an empty dx, zero dweight and dbias."""
    xp = call.xp
    zeros = xp.zeros(
        param_shape(tuple(x.shape), call.axis),
        dtype=compute_dtype(xp, x.dtype),
        device=compat.device(x),
    )
    return BatchNormGrads(_as(xp, dy * 0.0, x.dtype), zeros, xp.asarray(zeros, copy=True))


# --- the statistics ------------------------------------------------------------------------


def counted_values(
    xp: ModuleType, weights: Array, axes: tuple[int, ...], shape: tuple[int, ...]
) -> Array:
    """The number of counted values per channel (the sum of the 0/1 ``weights``).

    Training needs at least 2 per channel; an eager array is checked here (a
    ValueError, as without a mask), a lazy one (JAX under a transform, Dask)
    cannot be inspected without computing it and gives NaN statistics instead.
    """
    n = channel_sum(xp, weights, axes)
    if is_concrete(n) and bool(xp.any(n < 2)):
        raise ValueError(
            "Expected more than 1 counted value per channel when training, got input size "
            f"{shape} with a mask that leaves {int(xp.min(n))} value(s) in a channel"
        )
    return n


def _traced_padding(xp: ModuleType, x: Array, mask: Array) -> Array | None:
    """Torch tensors with a mask: where the mask is False and x is NaN or inf; else None.

    Autograd differentiates the generic forward on torch tensors, and a NaN in the
    graph poisons every gradient (``dscale = sum(dy * (x - mean))`` meets ``0 * nan``
    where the loss ignores the padding). There the graph computes y from 0, and the
    value at those positions is put back cut from the graph. Other libraries run
    anybn's own backward (JAX through its custom VJP), which selects such terms away.
    """
    if not compat.is_torch_array(x):
        return None
    return xp.logical_and(xp.logical_not(mask), xp.logical_not(xp.isfinite(x)))


class Moments(NamedTuple):
    """A batch's training statistics, broadcast-shaped, in the compute dtype."""

    n: Array | int  #: counted values per channel (an int without a mask)
    mean: Array
    m2: Array  #: sum of squared deviations from ``mean``
    centered: Array  #: ``x - mean`` (a temporary the forward may overwrite)
    correction: Array | None  #: the rounding error of ``mean``, folded into the shift
    padding: Array | None  #: see :func:`_traced_padding`


def batch_moments(call: Call, x: Array, xc: Array) -> Moments:
    """The statistics of an in-memory batch: the corrected two-pass moments."""
    xp = call.xp
    axes = reduction_axes(x.ndim, call.axis)
    mask = call.mask
    if mask is None:
        m = centered_moments(xp, xc, axes, call.n)
        return Moments(call.n, m.mean, m.m2, m.centered, m.correction, None)
    cdt = xc.dtype
    n = counted_values(xp, xp.astype(mask, cdt), axes, tuple(x.shape))
    padding = _traced_padding(xp, xc, mask)
    zero = xp.zeros((), dtype=cdt, device=compat.device(x))
    xs = xc if padding is None else xp.where(padding, zero, xc)
    m = masked_centered_moments(xp, xs, mask, axes, n)
    return Moments(n, m.mean, m.m2, m.centered, m.correction, padding)


# --- the forward ---------------------------------------------------------------------------


def running_update(
    call: Call,
    running_mean: Array,
    running_var: Array,
    mean: Array,
    m2: Array,
    n: Array | int,
    channels: tuple[int, ...],
) -> tuple[Array, Array]:
    """``(1 - momentum) * running + momentum * batch``, the variance by ``var_estimator``.

    ``mean`` per channel, ``m2`` broadcast-shaped; the results in the running
    statistics' own dtypes.
    """
    xp, momentum = call.xp, call.momentum
    cdt = mean.dtype
    denominator = n - 1 if call.var_estimator == "unbiased" else n
    batch_var = xp.reshape(m2 / denominator, channels)
    new_mean = _as(
        xp, (1.0 - momentum) * _as(xp, running_mean, cdt) + momentum * mean, running_mean.dtype
    )
    new_var = _as(
        xp, (1.0 - momentum) * _as(xp, running_var, cdt) + momentum * batch_var, running_var.dtype
    )
    return new_mean, new_var


def forward(
    call: Call,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    moments: Callable[[Call, Array, Array], Moments] = batch_moments,
) -> BatchNormOutput:
    """The forward of a resolved call, every value on every library."""
    xp, axis, eps = call.xp, call.axis, call.eps
    channels = param_shape(tuple(x.shape), axis)
    cdt = compute_dtype(xp, x.dtype)
    bshape = channel_shape(x.ndim, axis, channels)
    xc = _as(xp, x, cdt)

    padding = None
    if call.training:
        stats = moments(call, x, xc)
        n, mean_b, m2 = stats.n, stats.mean, stats.m2
        centered, corr = stats.centered, stats.correction
        padding = stats.padding
        var = m2 / n
        if call.mask is not None:
            # Fewer than 2 counted values: eager arrays raised above; lazy ones get NaN
            nan = xp.asarray(float("nan"), dtype=cdt, device=compat.device(x))
            var = xp.where(n < 2, nan, var)
        invstd_b = 1.0 / xp.sqrt(var + eps)
        mean = xp.reshape(mean_b, channels)
        invstd = xp.reshape(invstd_b, channels)
    else:
        assert running_mean is not None and running_var is not None
        mean = _as(xp, running_mean, cdt)
        invstd = 1.0 / xp.sqrt(_as(xp, running_var, cdt) + eps)
        invstd_b = xp.reshape(invstd, bshape)
        centered = xc - xp.reshape(mean, bshape)
        corr = None

    scale = invstd_b if weight is None else invstd_b * xp.reshape(_as(xp, weight, cdt), bshape)
    shift = None if bias is None else xp.reshape(_as(xp, bias, cdt), bshape)
    if corr is not None:
        # y = (centered - corr) * scale + bias, with the correction folded into the shift
        shift = -corr * scale if shift is None else shift - corr * scale
    y = _affine(xp, centered, scale, shift)
    if padding is not None:
        # the formula's value at a NaN or inf padding value, cut from the graph (see
        # _traced_padding): x * scale there is (x - mean) * scale + shift exactly
        y = xp.where(padding, stop_gradient(xc * scale), y)
    y = _as(xp, y, x.dtype)

    new_running_mean, new_running_var = running_mean, running_var
    if call.training and running_mean is not None and running_var is not None:
        new_running_mean, new_running_var = running_update(
            call, running_mean, running_var, mean, m2, n, channels
        )
    return BatchNormOutput(y, mean, invstd, new_running_mean, new_running_var)


# --- the backward --------------------------------------------------------------------------


class Sums(NamedTuple):
    """The backward's per-channel sums (broadcast-shaped) and the arrays dx is made from."""

    sum_dy: Array
    sum_dy_centered: Array  #: ``sum(dy * (x - mean))``, masked-out padding excluded
    centered: Array  #: ``x - mean`` in the compute dtype
    dy: Array  #: dy in the compute dtype
    mask: Array | None


def batch_sums(
    call: Call, dy: Array, dyc: Array, x: Array, centered: Array, mean_b: Array
) -> Sums:
    """The sums of an in-memory batch."""
    xp = call.xp
    axes = reduction_axes(x.ndim, call.axis)
    sum_dy = channel_sum(xp, dyc, axes)
    mask = call.mask
    if call.training and mask is not None:
        sum_dy_centered = channel_dot(xp, dyc, reaching_loss(xp, centered, mask, dyc), axes)
    else:
        sum_dy_centered = channel_dot(xp, dyc, centered, axes)
    return Sums(sum_dy, sum_dy_centered, centered, dyc, mask)


def backward(
    call: Call,
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    sums: Callable[[Call, Array, Array, Array, Array, Array], Sums] = batch_sums,
) -> BatchNormGrads:
    """dx, dweight and dbias of a resolved call, on every library.

    In training, with ``xhat = (x - mean) * invstd``::

        dx = weight * invstd * (dy - sum(dy)/n - xhat * sum(dy * xhat)/n)

    and with a mask ``m`` (0/1, ``n`` the counted values) the second and third
    terms times ``m``; in eval ``dx = weight * invstd * dy``.
    """
    xp, axis, count = call.xp, call.axis, call.n
    channels = param_shape(tuple(x.shape), axis)
    cdt = compute_dtype(xp, x.dtype)
    axes = reduction_axes(x.ndim, axis)
    bshape = channel_shape(x.ndim, axis, channels)
    dyc = _as(xp, dy, cdt)
    invstd = _as(xp, invstd, cdt)
    invstd_b = xp.reshape(invstd, bshape)
    mean_b = xp.reshape(_as(xp, mean, cdt), bshape)
    centered = _as(xp, x, cdt) - mean_b

    s = sums(call, dy, dyc, x, centered, mean_b)
    sum_dy, centered, dyc, mask = s.sum_dy, s.centered, s.dy, s.mask
    sum_dy_xhat = invstd_b * s.sum_dy_centered
    scale = invstd_b if weight is None else invstd_b * xp.reshape(_as(xp, weight, cdt), bshape)

    if call.training and mask is not None:
        # dx = scale * (dy - m * (sum_dy + xhat * sum_dy_xhat) / n), m the mask: the second
        # term selected (not multiplied) away where m is False, whatever x reads there
        n = channel_sum(xp, xp.astype(mask, cdt), axes)
        through_stats = (sum_dy + centered * (invstd_b * sum_dy_xhat)) / n
        zero = xp.zeros((), dtype=cdt, device=compat.device(x))
        dx = scale * (dyc - xp.where(mask, through_stats, zero))
    elif call.training:
        # dx = scale * (dy - sum_dy/n - xhat * sum_dy_xhat/n), with xhat = centered * invstd
        dx = _affine(xp, centered, -(scale * invstd_b * sum_dy_xhat / count), None)
        dx = dx + scale * (dyc - sum_dy / count)
    else:
        dx = dyc * scale
    return BatchNormGrads(
        _as(xp, dx, x.dtype),
        xp.reshape(sum_dy_xhat, channels),
        xp.reshape(sum_dy, channels),
    )
