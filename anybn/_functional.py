"""The functional core: batch-normalization forward and backward.

Pure functions written once against the Python array API standard. They never
mutate an input and return new arrays in the input's namespace and on its
device. Notation, per channel ``c`` over the ``n`` values ``x_i`` of that channel:

    mean   = (1/n) sum_i x_i
    var    = (1/n) sum_i (x_i - mean)^2                 (biased)
    invstd = 1 / sqrt(var + eps)
    xhat_i = (x_i - mean) * invstd
    y_i    = weight * xhat_i + bias
"""

from __future__ import annotations

import math
import sys
from types import ModuleType
from typing import Any, NamedTuple, cast

import array_api_compat as compat
import numpy as _np

from . import _fastpaths
from ._stats import (
    centered_moments,
    channel_dot,
    channel_sum,
    masked_centered_moments,
    reaching_loss,
)
from ._typing import AnyArray
from ._validation import (
    check_channel_vector,
    check_eps,
    check_input,
    check_mask,
    check_momentum,
    check_training,
    check_var_estimator,
)
from ._xp import (
    Array,
    adopt,
    channel_shape,
    check_floating,
    compute_dtype,
    is_concrete,
    normalize_axes,
    param_shape,
    reduction_axes,
    resolve_namespace,
    stop_gradient,
    values_per_channel,
    writeable,
)

__all__ = [
    "BatchNormGrads",
    "BatchNormOutput",
    "backward",
    "batch_norm",
    "batch_norm_backward",
    "forward",
]


class BatchNormOutput(NamedTuple):
    """What :func:`batch_norm` returns.

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
    """What :func:`batch_norm_backward` returns.

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


def _as(xp: ModuleType, a: Array, dtype: object) -> Array:
    """``a`` in ``dtype``, without a copy when it already is."""
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _affine(xp: ModuleType, centered: Array, scale: Array, shift: Array | None) -> Array:
    """``centered * scale + shift``, updating the temporary in place where allowed."""
    if writeable(xp, centered):
        centered *= scale
        if shift is not None:
            centered += shift
        return centered
    out = centered * scale
    return out if shift is None else out + shift


# --- the lean lane: plain calls on NumPy arrays and torch tensors, validated in a few checks ----
#
# Most calls are plain: x a NumPy array or torch tensor, per-channel vectors of x's type, dtype,
# device and shape (C,), Python bools and floats for the options, one int axis. For those a
# handful of type/shape comparisons establish everything the full validation would, at a
# fraction of its cost (it resolves namespaces and devices generically: ~30 us a call, more than
# the whole kernel on small inputs). Anything else -- including every call that must raise --
# takes the full validation, so errors and their messages are the same on both lanes.

#: type(x) -> (namespace, {x dtype: the dtypes its per-channel vectors may have})
_LEAN: dict[type, tuple[ModuleType, dict[Any, tuple[Any, ...]]]] = {
    _np.ndarray: (
        compat.array_namespace(_np.empty(0)),
        {
            _np.dtype(_np.float16): (_np.dtype(_np.float16), _np.dtype(_np.float32)),
            _np.dtype(_np.float32): (_np.dtype(_np.float32),),
            _np.dtype(_np.float64): (_np.dtype(_np.float64),),
        },
    )
}


def _lean_entry(t: type) -> tuple[ModuleType, dict[Any, tuple[Any, ...]]] | None:
    """The lean lane's entry for arrays of type ``t`` (torch's registered on first use)."""
    entry = _LEAN.get(t)
    if entry is None:
        torch = sys.modules.get("torch")
        if torch is not None and t is getattr(torch, "Tensor", None):
            f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
            entry = _LEAN[t] = (
                compat.array_namespace(torch.empty(0)),
                {f16: (f16, f32), bf16: (bf16, f32), f32: (f32,), f64: (f64,)},
            )
    return entry


def _lean(
    x: Array, vectors: tuple[Array | None, ...], axis: object
) -> tuple[ModuleType, int, int] | None:
    """``(namespace, axis, values per channel)`` if the arrays of a call are plain, else None.

    Plain: ``x`` exactly a NumPy array or torch tensor of a floating dtype with at
    least 2 dimensions and ``axis`` an int in range; every vector None or of x's
    exact type, shape ``(C,)``, an allowed dtype and (torch) x's device.
    """
    entry = _lean_entry(type(x))
    if entry is None or type(axis) is not int:
        return None
    xp, dtypes = entry
    allowed = dtypes.get(x.dtype)
    shape = x.shape
    ndim = len(shape)
    if allowed is None or ndim < 2 or not -ndim <= axis < ndim:
        return None
    axis %= ndim
    channels = shape[axis]
    if channels == 0:
        return None
    t = type(x)
    device = None if t is _np.ndarray else x.device
    for a in vectors:
        if a is None:
            continue
        if type(a) is not t or a.dtype not in allowed or a.shape != (channels,):
            return None
        if device is not None and a.device != device:
            return None
    return xp, axis, math.prod(shape) // channels


#: The running-variance estimators a plain call may name (the lean lane passes them on).
_ESTIMATORS = ("unbiased", "biased")


def _plain_options(training: object, momentum: object, eps: object) -> bool:
    """Whether the options are a Python bool and floats that need no further checks."""
    return (
        type(training) is bool
        and type(momentum) is float
        and type(eps) is float
        and 0.0 <= momentum <= 1.0
        and 0.0 < eps < math.inf
    )


def batch_norm(
    x: AnyArray,
    running_mean: AnyArray | None = None,
    running_var: AnyArray | None = None,
    weight: AnyArray | None = None,
    bias: AnyArray | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = 1,
    mask: AnyArray | None = None,
    var_estimator: str = "unbiased",
    comm: object = None,
    xp: ModuleType | None = None,
) -> BatchNormOutput:
    r"""Batch normalization over every axis of ``x`` but the channel ``axis``.

    With ``training=True`` the batch statistics are used and, if running
    statistics are given, updated copies are returned::

        y                = (x - mean) / sqrt(var + eps) * weight + bias
        new_running_mean = (1 - momentum) * running_mean + momentum * mean
        new_running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)

    where ``var`` is the biased batch variance and ``n`` the number of values
    per channel (``var_estimator="biased"`` stores ``var`` itself, as Keras and
    Flax do). With ``mask``, ``mean``, ``var`` and ``n`` are those of the values
    where the mask is True; ``y`` is still computed at every position. With
    ``training=False`` the running statistics are used in place of ``mean`` and
    ``var`` and are returned unchanged. This matches
    :func:`torch.nn.functional.batch_norm`.

    Parameters
    ----------
    x : array
        Input of shape ``(N, C, ...)`` (or with the channels on ``axis``), any
        real floating dtype. float16 and bfloat16 accumulate in float32.
    running_mean, running_var : array or None, optional
        Running statistics of shape ``(C,)``. Required when ``training=False``;
        give both or neither. Never modified: updated copies are returned.
    weight, bias : array or None, optional
        Affine parameters of shape ``(C,)``; ``None`` means 1 and 0.
    training : bool, optional
        Normalize with batch statistics (True) or running statistics (False).
    momentum : float, optional
        Weight of the batch statistic in the running update, in [0, 1].
    eps : float, optional
        Added to the variance for stability; must be > 0.
    axis : int or tuple of int, optional
        The channel axis; negative values count from the end (-1 for channels-last).
        A tuple names several channel axes (Keras' list ``axis``, Chainer's
        ``param_shape``): the per-channel arrays then have the shape of those
        axes, in increasing axis order (``x.shape[1], x.shape[2]`` for ``(1, 2)``).
    mask : array or None, optional
        A boolean array broadcastable to ``x``, True where a value counts for
        the batch statistics (Keras' and Flax' ``mask``; padding is False). Values
        where it is False never reach the statistics, even NaN or inf.
        Training with fewer than 2 counted values in a channel raises (lazy
        arrays, which cannot be inspected, give NaN for that channel). Ignored
        for the statistics in eval. None: every value counts.
    var_estimator : {"unbiased", "biased"}, optional
        What ``new_running_var`` accumulates: the unbiased batch variance
        (``n / (n - 1)`` times the biased one; PyTorch, Chainer) or the biased
        one (Keras, Flax).
    comm : optional
        Synchronize over processes: a ``torch.distributed`` ProcessGroup, an
        mpi4py communicator, ``"torch"`` (the default process group), ``"mpi"``
        (``COMM_WORLD``) or an :class:`anybn.distributed.Communicator`. In
        training every rank must call with its shard of the batch; the batch
        statistics (and the running-statistics update) are then those of the
        concatenated batch, on every rank. Ignored in eval. None: local.
        See :mod:`anybn.distributed`. In training not combinable with ``mask``,
        several channel axes or ``var_estimator="biased"`` (ValueError on every
        rank: every check runs before the ranks communicate); torch tensors that
        require grad differentiate through the global statistics.
    xp : module, optional
        The array namespace; resolved from ``x`` when omitted.

    Returns
    -------
    BatchNormOutput
        ``(y, mean, invstd, new_running_mean, new_running_var)``.

    Raises
    ------
    TypeError
        Non-floating dtypes, arrays from different libraries, wrong argument types.
    ValueError
        Bad shapes or axis, ``eps <= 0``, ``momentum`` outside [0, 1], arrays on
        different devices, one value per channel in training, eval without
        running statistics, or only one of them given.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> out = anybn.batch_norm(x, training=True)
    >>> out.y
    array([[-0.99999...,  -0.99999...],
           [ 0.99999...,  0.99999...]])
    >>> out.mean
    array([ 2., 20.])
    """
    if comm is not None:
        from . import _sync

        return _sync.batch_norm(
            x, running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=eps, axis=axis, mask=mask,
            var_estimator=var_estimator, xp=xp, comm=comm,
        )  # fmt: skip
    if xp is None and mask is None and type(var_estimator) is str and var_estimator in _ESTIMATORS:
        lean = _lean(x, (running_mean, running_var, weight, bias), axis)
        if (
            lean is not None
            and _plain_options(training, momentum, eps)
            and (running_mean is None) == (running_var is None)
            and (lean[2] != 1 if training else running_mean is not None)
        ):
            return forward(
                lean[0], x, running_mean, running_var, weight, bias,
                training=training, momentum=momentum, eps=eps, axis=lean[1], count=lean[2],
                var_estimator=var_estimator,
            )  # fmt: skip
    xp = resolve_namespace(
        x,
        {
            "running_mean": running_mean,
            "running_var": running_var,
            "weight": weight,
            "bias": bias,
            "mask": mask,
        },
        xp=xp,
    )
    check_input(xp, x)
    running_mean, running_var, weight, bias, mask = (
        adopt(xp, x, a) for a in (running_mean, running_var, weight, bias, mask)
    )
    axes = normalize_axes(axis, x.ndim)
    count = values_per_channel(tuple(x.shape), axes)
    channels: Any = param_shape(tuple(x.shape), axes)
    if len(axes) == 1:
        channels = channels[0]
    for name, a in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        check_channel_vector(xp, a, name, channels, x.dtype)
    training = check_training(training)
    momentum = check_momentum(momentum)
    eps = check_eps(eps)
    var_estimator = check_var_estimator(var_estimator)
    mask = check_mask(xp, mask, x)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together, got only "
            + ("running_mean" if running_var is None else "running_var")
        )
    if training and count == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var are required when training=False "
            "(or pass training=True to normalize with batch statistics)"
        )
    if compat.is_jax_array(x) and training:
        from . import _jax  # the adapter: gradients by anybn's backward (jax.custom_vjp)

        return _jax.forward(
            xp, x, running_mean, running_var, weight, bias,
            momentum=momentum, eps=eps, axis=_unwrap(axes), count=count, mask=mask,
            var_estimator=var_estimator,
        )  # fmt: skip
    return forward(
        xp, x, running_mean, running_var, weight, bias,
        training=training, momentum=momentum, eps=eps, axis=_unwrap(axes), count=count,
        mask=mask, var_estimator=var_estimator,
    )  # fmt: skip


def _unwrap(axes: tuple[int, ...]) -> int | tuple[int, ...]:
    """One channel axis as an int (what the fast paths and adapters take), several as a tuple."""
    return axes[0] if len(axes) == 1 else axes


def forward(
    xp: ModuleType,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int | tuple[int, ...],
    count: int,
    mask: Array | None = None,
    var_estimator: str = "unbiased",
) -> BatchNormOutput:
    """:func:`batch_norm` on validated arguments: the entry point of the adapters.

    ``axis`` is non-negative (or a sorted tuple of several such axes), ``count``
    the number of values per channel (before masking), ``mask`` None or boolean
    of x's shape. The fast paths see neither masks nor several channel axes:
    those run the generic path (both estimators run on the fast paths). The
    adapters check arguments by their own rules (``anybn.torch`` by PyTorch's,
    which allow momentum outside [0, 1] and ``eps=0`` in eval) and call this.

    The running statistics returned are never differentiable (cut from any
    autograd graph), and ``mean`` never aliases ``running_mean``: a later
    in-place update of the buffers cannot reach what a caller saved.
    """
    fast = None
    if training and count == 0:
        out = _empty_batch(xp, x, running_mean, running_var, axis)
    else:
        if _fastpaths.enabled() and _plain(axis, mask):
            fast = _fastpaths.batch_norm(
                xp, x, running_mean, running_var, weight, bias,
                training=training, momentum=momentum, eps=eps, axis=cast(int, axis),
                var_estimator=var_estimator,
            )  # fmt: skip
        if fast is not None:
            out = BatchNormOutput(*fast)
        else:
            out = _generic_forward(
                xp, x, running_mean, running_var, weight, bias,
                training=training, momentum=momentum, eps=eps, axis=axis, count=count,
                mask=mask, var_estimator=var_estimator,
            )  # fmt: skip
    mean = out.mean
    if mean is running_mean:
        mean = xp.asarray(mean, copy=True)
    # Fast paths compute on untracked arrays: only the others' statistics need the cut.
    if fast is None and training and running_mean is not None:
        return out._replace(
            mean=mean,
            new_running_mean=stop_gradient(out.new_running_mean),
            new_running_var=stop_gradient(out.new_running_var),
        )
    return out if mean is out.mean else out._replace(mean=mean)


def _plain(axis: int | tuple[int, ...], mask: Array | None) -> bool:
    """Whether a call is one the fast paths know: one channel axis and no mask."""
    return isinstance(axis, int) and mask is None


def _empty_batch(
    xp: ModuleType,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    axis: int | tuple[int, ...],
) -> BatchNormOutput:
    """Training on a batch with no values: an empty y, NaN statistics, running ones kept.

    As PyTorch does: the running statistics are left as they are (returned as
    copies), and the backward gives zero dweight and dbias.
    """
    nan = xp.full(
        param_shape(tuple(x.shape), axis),
        float("nan"),
        dtype=compute_dtype(xp, x.dtype),
        device=compat.device(x),
    )
    rm = None if running_mean is None else xp.asarray(running_mean, copy=True)
    rv = None if running_var is None else xp.asarray(running_var, copy=True)
    return BatchNormOutput(x * 0.0, nan, xp.asarray(nan, copy=True), rm, rv)


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


def _generic_forward(
    xp: ModuleType,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int | tuple[int, ...],
    count: int,
    mask: Array | None = None,
    var_estimator: str = "unbiased",
) -> BatchNormOutput:
    """The array-API implementation every fast path is tested against."""
    channels = param_shape(tuple(x.shape), axis)
    cdt = compute_dtype(xp, x.dtype)
    axes = reduction_axes(x.ndim, axis)
    bshape = channel_shape(x.ndim, axis, channels)
    xc = _as(xp, x, cdt)

    n: Array | int = count
    padding = None
    if training:
        if compat.is_dask_array(x):
            # Out of core: per-chunk moments merged in a tree, y from a clone of x's graph
            from . import _dask

            n64, mean64, m2_64 = _dask.moments(xp, xc, mask, axis)
            n = count if mask is None else _as(xp, n64, cdt)
            mean_b, m2 = _as(xp, mean64, cdt), _as(xp, m2_64, cdt)
            # centre on the rounded mean, fold its rounding error into the shift (as below)
            corr = _as(xp, mean64 - _as(xp, mean_b, mean64.dtype), cdt)
            centered = _dask.clone(xc) - mean_b
        else:
            if mask is None:
                moments = centered_moments(xp, xc, axes, count)
            else:
                n = counted_values(xp, xp.astype(mask, cdt), axes, tuple(x.shape))
                padding = _traced_padding(xp, xc, mask)
                zero = xp.zeros((), dtype=cdt, device=compat.device(x))
                xs = xc if padding is None else xp.where(padding, zero, xc)
                moments = masked_centered_moments(xp, xs, mask, axes, n)
            mean_b, m2 = moments.mean, moments.m2
            centered, corr = moments.centered, moments.correction
        var = m2 / n
        if mask is not None:
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
    if training and running_mean is not None and running_var is not None:
        denominator = n - 1 if var_estimator == "unbiased" else n
        batch_var = xp.reshape(m2 / denominator, channels)
        new_running_mean = _as(
            xp,
            (1.0 - momentum) * _as(xp, running_mean, cdt) + momentum * mean,
            running_mean.dtype,
        )
        new_running_var = _as(
            xp,
            (1.0 - momentum) * _as(xp, running_var, cdt) + momentum * batch_var,
            running_var.dtype,
        )
    return BatchNormOutput(y, mean, invstd, new_running_mean, new_running_var)


def batch_norm_backward(
    dy: AnyArray,
    x: AnyArray,
    weight: AnyArray | None,
    mean: AnyArray,
    invstd: AnyArray,
    *,
    training: bool = True,
    axis: int | tuple[int, ...] = 1,
    mask: AnyArray | None = None,
    comm: object = None,
    xp: ModuleType | None = None,
) -> BatchNormGrads:
    r"""Gradients of :func:`batch_norm` with respect to x, weight and bias.

    With ``xhat = (x - mean) * invstd`` and per-channel sums over the ``n``
    values of each channel::

        sum_dy      = sum(dy)
        sum_dy_xhat = sum(dy * xhat)
        dbias       = sum_dy
        dweight     = sum_dy_xhat
        dx          = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)   (training)
        dx          = weight * invstd * dy                                           (eval)

    In training the batch statistics depend on x and the gradient flows through
    them; in eval ``mean`` and ``invstd`` are constants. With a ``mask`` the sums
    still run over every position (every output depends on the statistics), and
    with ``m`` the mask as 0/1 and ``n`` the counted values per channel::

        dx = weight * invstd * (dy - m * (sum_dy + xhat * sum_dy_xhat) / n)         (training)

    A masked-out position whose ``dy`` is 0 adds nothing to the sums, even where its
    ``x`` is NaN or inf (padding), and ``dx`` there is ``weight * invstd * dy``.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to ``y``; same shape as ``x``.
    x : array
        The forward input.
    weight : array or None
        The forward weight, shape ``(C,)``; ``None`` means 1.
    mean, invstd : array
        The ``mean`` and ``invstd`` returned by the forward call, shape ``(C,)``.
    training : bool, optional
        Whether the forward call normalized with batch statistics.
    axis : int or tuple of int, optional
        The channel axis (or axes) used in the forward call.
    mask : array or None, optional
        The mask of the forward call (see :func:`batch_norm`); only training uses it.
    comm : optional
        The communicator of a synchronized forward (see :func:`batch_norm`):
        in training the two sums are all-reduced over its ranks and ``dx`` is
        the gradient through the global statistics; ``dweight`` and ``dbias``
        stay this rank's own sums. In training not combinable with ``mask`` or
        several channel axes, and not differentiable (ValueError / TypeError on
        every rank). Ignored in eval. None: local.
    xp : module, optional
        The array namespace; resolved from ``x`` when omitted.

    Returns
    -------
    BatchNormGrads
        ``(dx, dweight, dbias)``; dx in x's dtype, the others in the
        accumulation dtype (float32 for half-precision x).

    Raises
    ------
    TypeError, ValueError
        As for :func:`batch_norm`, and ValueError when ``dy.shape != x.shape``.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    >>> out = anybn.batch_norm(x, training=True)
    >>> g = anybn.batch_norm_backward(np.ones_like(x), x, None, out.mean, out.invstd)
    >>> g.dbias
    array([3., 3.])
    >>> bool(np.allclose(g.dx, 0.0))
    True
    """
    if comm is not None:
        from . import _sync

        return _sync.batch_norm_backward(
            dy, x, weight, mean, invstd, training=training, axis=axis, mask=mask, xp=xp,
            comm=comm,
        )  # fmt: skip
    plain = xp is None and mask is None and type(training) is bool
    if plain and mean is not None and invstd is not None:
        lean = _lean(x, (weight, mean, invstd), axis)
        if (
            lean is not None
            and type(dy) is type(x)
            and dy.dtype == x.dtype
            and dy.shape == x.shape
            and (type(x) is _np.ndarray or cast(Any, dy).device == cast(Any, x).device)
        ):
            return backward(
                lean[0], dy, x, weight, mean, invstd,
                training=training, axis=lean[1], count=lean[2],
            )  # fmt: skip
    a: AnyArray | None  # (annotation only: the loops below bind it to optional arrays)
    for name, a in (("dy", dy), ("mean", mean), ("invstd", invstd)):
        if a is None:
            raise TypeError(f"{name} must be an array (NumPy, CuPy, PyTorch, ...), got None")
    xp = resolve_namespace(
        x, {"dy": dy, "weight": weight, "mean": mean, "invstd": invstd, "mask": mask}, xp=xp
    )
    check_input(xp, x)
    dy, weight, mean, invstd, mask = (  # type: ignore[assignment]
        adopt(xp, x, a) for a in (dy, weight, mean, invstd, mask)
    )
    check_floating(xp, dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"dy must have the shape of x {tuple(x.shape)}, got shape {tuple(dy.shape)}"
        )
    axes = normalize_axes(axis, x.ndim)
    count = values_per_channel(tuple(x.shape), axes)
    channels = param_shape(tuple(x.shape), axes)
    for name, a in (("weight", weight), ("mean", mean), ("invstd", invstd)):
        check_channel_vector(xp, a, name, channels[0] if len(axes) == 1 else channels, x.dtype)
    training = check_training(training)
    mask = check_mask(xp, mask, x)
    return backward(
        xp, dy, x, weight, mean, invstd,
        training=training, axis=_unwrap(axes), count=count, mask=mask,
    )  # fmt: skip


def backward(
    xp: ModuleType,
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool,
    axis: int | tuple[int, ...],
    count: int,
    mask: Array | None = None,
) -> BatchNormGrads:
    """:func:`batch_norm_backward` on validated arguments: the adapters' entry point."""
    if count == 0:
        zeros = xp.zeros(
            param_shape(tuple(x.shape), axis),
            dtype=compute_dtype(xp, x.dtype),
            device=compat.device(x),
        )
        return BatchNormGrads(_as(xp, dy * 0.0, x.dtype), zeros, xp.asarray(zeros, copy=True))
    if not training:
        mask = None  # eval: the statistics are constants, the mask plays no part
    if _fastpaths.enabled() and _plain(axis, mask):
        fast = _fastpaths.batch_norm_backward(
            xp, dy, x, weight, mean, invstd, training=training, axis=cast(int, axis)
        )
        if fast is not None:
            return BatchNormGrads(*fast)
    return _generic_backward(
        xp, dy, x, weight, mean, invstd, training=training, axis=axis, count=count, mask=mask
    )


def _generic_backward(
    xp: ModuleType,
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool,
    axis: int | tuple[int, ...],
    count: int,
    mask: Array | None = None,
) -> BatchNormGrads:
    """The array-API implementation every fast path is tested against."""
    channels = param_shape(tuple(x.shape), axis)
    cdt = compute_dtype(xp, x.dtype)
    axes = reduction_axes(x.ndim, axis)
    bshape = channel_shape(x.ndim, axis, channels)
    dyc = _as(xp, dy, cdt)
    invstd = _as(xp, invstd, cdt)
    invstd_b = xp.reshape(invstd, bshape)
    mean_b = xp.reshape(_as(xp, mean, cdt), bshape)
    centered = _as(xp, x, cdt) - mean_b

    if training and compat.is_dask_array(x):
        # Out of core: the sums in one pass, dx from clones of the graphs of x, dy, mask
        from . import _dask

        sum_dy, sum_dy_centered = (
            _as(xp, s, cdt)
            for s in _dask.backward_sums(xp, dyc, _as(xp, x, cdt), mean_b, axis, mask)
        )
        if mask is not None:
            mask = _dask.clone(mask)
        x_again, dy_again = _dask.clone(x, dy)
        centered, dyc = _as(xp, x_again, cdt) - mean_b, _as(xp, dy_again, cdt)
    else:
        sum_dy = channel_sum(xp, dyc, axes)
        if training and mask is not None:
            sum_dy_centered = channel_dot(xp, dyc, reaching_loss(xp, centered, mask, dyc), axes)
        else:
            sum_dy_centered = channel_dot(xp, dyc, centered, axes)
    sum_dy_xhat = invstd_b * sum_dy_centered
    scale = invstd_b if weight is None else invstd_b * xp.reshape(_as(xp, weight, cdt), bshape)

    if training and mask is not None:
        # dx = scale * (dy - m * (sum_dy + xhat * sum_dy_xhat) / n), m the mask: the second
        # term selected (not multiplied) away where m is False, whatever x reads there
        n = channel_sum(xp, xp.astype(mask, cdt), axes)
        through_stats = (sum_dy + centered * (invstd_b * sum_dy_xhat)) / n
        zero = xp.zeros((), dtype=cdt, device=compat.device(x))
        dx = scale * (dyc - xp.where(mask, through_stats, zero))
    elif training:
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
