"""Batch renormalization and ghost batches, built on the plain forward and backward.

Both are compositions of the plain batch norm, so that every backend, the masks and
``comm=`` serve them with the kernels they already have:

* Ghost batches (``virtual_batch_size=k``) reshape x of shape ``(N, ...)`` to
  ``(k, N // k, ...)`` and add the new group axis 1 to the channel axes, as Keras 2 did:
  sample ``i`` belongs to group ``i % (N // k)``. On ``(N, C, ...)`` input the group and
  channel axes are adjacent and merge into one channel axis of ``G * C`` channels (the
  compiled kernels' plain call); other layouts take the tuple of channel axes.
* Batch renormalization (``renorm=True``, Ioffe 2017) takes the batch statistics of x
  (cut from autograd), computes the corrections ``r`` and ``d`` from them and the renorm
  moving statistics, and normalises with ``weight * r`` and ``bias + weight * d``: the
  plain training forward, through whose batch statistics the gradient flows while ``r``
  and ``d`` are constants. The backward is the plain one with ``weight * r``, and
  ``dweight = r * sum(dy * xhat) + d * sum(dy)``.

The plain functions come in as arguments (``bn``, ``bn_backward``): this module sits
under :mod:`anybn._api`, which calls it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as compat

from ._checks import check_channel_vector, check_input, check_mask, check_training
from ._core.outputs import BatchNormGrads, BatchNormOutput
from ._xp import (
    Array,
    adopt,
    compute_dtype,
    normalize_axes,
    param_shape,
    resolve_namespace,
    stop_gradient,
)

__all__ = [
    "RenormOutput",
    "backward",
    "check_clipping",
    "check_renorm_momentum",
    "check_virtual_batch_size",
    "forward",
]


class RenormOutput(NamedTuple):
    """What :func:`anybn.batch_norm` returns with ``renorm=True``.

    The first five fields are those of :class:`anybn.BatchNormOutput`.

    Attributes
    ----------
    y, mean, invstd, new_running_mean, new_running_var : array
        As in :class:`anybn.BatchNormOutput`: ``mean`` and ``invstd`` are the batch's
        (per group with ``virtual_batch_size``), for :func:`anybn.batch_norm_backward`.
        ``new_running_var`` is ``max(new_running_std ** 2 - eps, 0)`` (Keras 3).
    r, d : array or None
        The corrections used in training, shape ``(C,)``, for
        :func:`anybn.batch_norm_backward` (``renorm_r=``, ``renorm_d=``); None in eval.
    new_renorm_mean, new_renorm_std : array
        The updated renorm moving statistics (training), the given ones (eval).
    new_running_std : array
        The updated running standard deviation ``sqrt(var + eps)`` (training), whose
        square minus ``eps`` is ``new_running_var``; in eval the given one (or
        ``sqrt(running_var + eps)`` when none was given).

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> ones, zeros = np.ones(2), np.zeros(2)
    >>> out = anybn.batch_norm(x, zeros, ones, training=True, renorm=True,
    ...                        renorm_mean=zeros, renorm_std=ones,
    ...                        renorm_clipping={"rmax": 3.0, "dmax": 5.0})
    >>> out.d  # (mean - renorm_mean) / renorm_std, clipped to 5
    array([2., 5.])
    >>> float(out.r[1])  # std / renorm_std = 10, clipped to 3
    3.0
    """

    y: Array
    mean: Array
    invstd: Array
    new_running_mean: Array | None
    new_running_var: Array | None
    r: Array | None
    d: Array | None
    new_renorm_mean: Array
    new_renorm_std: Array
    new_running_std: Array


# --- the options ---------------------------------------------------------------------------

_CLIPPING_KEYS = ("rmin", "rmax", "dmax")


def _number(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    number = float(value)
    if math.isnan(number):
        raise ValueError(f"{name} must not be NaN")
    return number


def check_clipping(renorm_clipping: object) -> tuple[float, float, float]:
    """``(rmin, rmax, dmax)`` from Keras' ``renorm_clipping`` dict; missing: 0, inf, inf.

    ``r`` is clipped to ``[rmin, rmax]``, which must hold 1 (plain batch norm:
    ``rmin <= 1 <= rmax``), and ``d`` to ``[-dmax, dmax]`` with ``dmax >= 0``.
    """
    if renorm_clipping is None:
        return 0.0, math.inf, math.inf
    if not isinstance(renorm_clipping, Mapping):
        raise TypeError(
            "renorm_clipping must be a dict with keys among 'rmin', 'rmax', 'dmax' (or None), "
            f"got {type(renorm_clipping).__name__}"
        )
    unknown = sorted(str(k) for k in renorm_clipping if k not in _CLIPPING_KEYS)
    if unknown:
        raise ValueError(
            f"renorm_clipping has unknown keys {unknown}; the keys are 'rmin', 'rmax' and "
            "'dmax' (Keras' names)"
        )
    values = {k: _number(v, f"renorm_clipping[{k!r}]") for k, v in renorm_clipping.items()}
    rmin, rmax, dmax = (
        values.get("rmin", 0.0),
        values.get("rmax", math.inf),
        values.get("dmax", math.inf),
    )
    if rmax < 1.0:
        raise ValueError(
            f"renorm_clipping['rmax'] must be >= 1 (r = 1 is plain batch norm), got {rmax}"
        )
    if not 0.0 <= rmin <= 1.0:
        raise ValueError(
            f"renorm_clipping['rmin'] must be in [0, 1] (r = 1 is plain batch norm), got {rmin}; "
            "the paper's interval is rmin = 1 / rmax"
        )
    if dmax < 0.0:
        raise ValueError(f"renorm_clipping['dmax'] must be >= 0, got {dmax}")
    return rmin, rmax, dmax


def check_renorm_momentum(value: object) -> float:
    """``renorm_momentum`` must be a number in [0, 1]."""
    number = _number(value, "renorm_momentum")
    if not 0.0 <= number <= 1.0:
        raise ValueError(
            f"renorm_momentum must be in [0, 1] (the weight of the batch statistic; Keras' "
            f"renorm_momentum=0.99 is 0.01 here), got {value!r}"
        )
    return number


def check_virtual_batch_size(value: object) -> int | None:
    """``virtual_batch_size`` must be None or an int >= 1."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"virtual_batch_size must be an int >= 1 or None, got {type(value).__name__}"
        )
    if int(value) < 1:
        raise ValueError(f"virtual_batch_size must be >= 1, got {value}")
    return int(value)


# --- ghost batches -------------------------------------------------------------------------


class Ghost(NamedTuple):
    """How x is split into ``groups`` ghost batches of ``k`` samples."""

    xp: ModuleType
    shape: tuple[int, ...]  #: x's shape
    axes: tuple[int, ...]  #: x's channel axes
    k: int
    groups: int
    merged: bool  #: group and channel axes merged into one (channels on axis 1)

    @property
    def channels(self) -> tuple[int, ...]:
        return param_shape(self.shape, self.axes)

    @property
    def axis(self) -> int | tuple[int, ...]:
        """The channel axis (or axes) of the reshaped x."""
        return 1 if self.merged else (1, *(a + 1 for a in self.axes))

    def split(self, a: Array) -> Array:
        """x (or dy, or a mask broadcast to x) as ``(k, groups, ...)``, merged where it can."""
        rest = self.shape[1:]
        a = self.xp.reshape(a, (self.k, self.groups, *rest))
        if self.merged:  # a second reshape: Dask splits and merges axes one kind at a time
            a = self.xp.reshape(a, (self.k, self.groups * rest[0], *rest[1:]))
        return a

    def split_mask(self, mask: Array | None, x: Array) -> Array | None:
        """A mask broadcastable to x, checked, broadcast to x and split as x."""
        if mask is None:
            return None
        return self.split(check_mask(self.xp, adopt(self.xp, x, mask), x, self.axes))

    def join(self, a: Array) -> Array:
        """The inverse of :meth:`split`."""
        if self.merged:
            a = self.xp.reshape(a, (self.k, self.groups, *self.shape[1:]))
        return self.xp.reshape(a, self.shape)

    def per_group(self, v: Array | None) -> Array | None:
        """A per-channel vector repeated for every group (the reshaped x's channels)."""
        if v is None:
            return None
        xp = self.xp
        v = xp.broadcast_to(xp.reshape(v, (1, *self.channels)), (self.groups, *self.channels))
        if self.merged:
            return xp.reshape(v, (self.groups * self.channels[0],))
        return xp.reshape(v, (self.groups, *self.channels))

    def grouped(self, v: Array) -> Array:
        """A per-group vector of the reshaped call as ``(groups, *channels)``."""
        return self.xp.reshape(v, (self.groups, *self.channels))

    def mean(self, v: Array) -> Array:
        """The mean over the groups of a per-group vector."""
        return self.xp.mean(self.grouped(v), axis=0)

    def sum(self, v: Array) -> Array:
        """The sum over the groups of a per-group vector."""
        return self.xp.sum(self.grouped(v), axis=0)


def _torch_layout(y: Array, x: Array) -> Array:
    """y in x's memory format where x is a channels-last torch tensor (PyTorch's modules
    keep it; the reshape that joins the ghost batches gives a contiguous tensor)."""
    if not compat.is_torch_array(x) or x.ndim not in (4, 5) or x.is_contiguous():
        return y
    import torch

    fmt = torch.channels_last if x.ndim == 4 else torch.channels_last_3d
    return y.contiguous(memory_format=fmt) if x.is_contiguous(memory_format=fmt) else y


def ghost(xp: ModuleType, x: Array, axis: object, k: int, training: bool) -> Ghost:
    """The split of x into ghost batches of ``k`` samples; raises if it has none."""
    shape = tuple(x.shape)
    axes = normalize_axes(axis, len(shape))
    if 0 in axes:
        raise ValueError(
            "virtual_batch_size splits the first axis of x into ghost batches, but axis 0 is "
            f"a channel axis (axis={axis!r}); put the batch first"
        )
    n = shape[0]
    if n % k:
        raise ValueError(
            f"virtual_batch_size={k} must divide the batch size (x.shape[0] = {n}); use a "
            "batch size that is a multiple of it, as Keras 2 required"
        )
    if training and k * math.prod(shape[1:]) // math.prod(param_shape(shape, axes)) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel in each ghost batch when training, got "
            f"virtual_batch_size={k} on input size {shape}"
        )
    return Ghost(xp, shape, axes, k, n // k, axes == (1,))


# --- the forward ---------------------------------------------------------------------------


def _namespace(
    x: Array,
    arrays: dict[str, Array | None],
    axis: object,
    xp: ModuleType | None,
    mask: Array | None = None,
) -> tuple[ModuleType, tuple[int, ...], dict[str, Array | None]]:
    """x's namespace and channels, and ``arrays`` checked as per-channel vectors of x."""
    xp = resolve_namespace(x, {**arrays, "mask": mask}, xp=xp)
    check_input(xp, x)
    channels: Any = param_shape(tuple(x.shape), normalize_axes(axis, x.ndim))
    vector = channels[0] if len(channels) == 1 else channels
    adopted = {name: adopt(xp, x, a) for name, a in arrays.items()}
    for name, a in adopted.items():
        check_channel_vector(xp, a, name, vector, x.dtype)
    return xp, channels, adopted


def _as(xp: ModuleType, a: Array, dtype: object) -> Array:
    return a if a.dtype == dtype else xp.astype(a, dtype)


def forward(
    bn: Callable[..., BatchNormOutput],
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: object,
    momentum: float,
    eps: float,
    axis: object,
    mask: Array | None,
    var_estimator: str,
    renorm: object,
    renorm_clipping: object,
    renorm_momentum: object,
    renorm_mean: Array | None,
    renorm_std: Array | None,
    running_std: Array | None,
    virtual_batch_size: object,
    options: dict[str, Any],
    xp: ModuleType | None,
) -> BatchNormOutput | RenormOutput:
    """:func:`anybn.batch_norm` with ``renorm`` or ``virtual_batch_size``.

    ``bn`` is the plain :func:`anybn.batch_norm`; ``options`` its synchronisation
    keywords (``comm``, ``timeout``, ...), passed on. Every check runs before anything
    is computed.
    """
    training = check_training(training)
    if not isinstance(renorm, bool):
        raise TypeError(f"renorm must be a bool, got {type(renorm).__name__}")
    k = check_virtual_batch_size(virtual_batch_size)
    clip = check_clipping(renorm_clipping) if renorm else None
    renorm_m = check_renorm_momentum(renorm_momentum) if renorm else 0.0
    if k is not None and options.get("comm") is not None and training:
        raise ValueError(
            "virtual_batch_size cannot be combined with comm=: ghost batches are groups of "
            "one process's samples, and synchronising them would make them real batches "
            "again; drop comm= for per-process ghost batches"
        )
    if k is not None and options.get("axis_name") is not None and training:
        raise ValueError(
            "virtual_batch_size cannot be combined with axis_name=: ghost batches are groups "
            "of one device's samples"
        )
    renorm_arrays = {
        "renorm_mean": renorm_mean,
        "renorm_std": renorm_std,
        "running_std": running_std,
    }
    if renorm:
        missing = [
            name
            for name, a in (
                ("running_mean", running_mean),
                ("running_var", running_var),
                ("renorm_mean", renorm_mean),
                ("renorm_std", renorm_std),
            )
            if a is None
        ]
        if missing:
            raise ValueError(
                "renorm=True needs the running statistics running_mean, running_var, "
                f"renorm_mean and renorm_std (got None for {', '.join(missing)}); start them at "
                "0, 1, 0 and 1"
            )
    elif any(a is not None for a in renorm_arrays.values()):
        given = [name for name, a in renorm_arrays.items() if a is not None]
        raise ValueError(f"{', '.join(given)} given without renorm=True; pass renorm=True")
    xp, channels, arrays = _namespace(
        x,
        {
            "running_mean": running_mean,
            "running_var": running_var,
            "weight": weight,
            "bias": bias,
            **renorm_arrays,
        },
        axis,
        xp,
        mask,
    )
    running_mean, running_var = arrays["running_mean"], arrays["running_var"]
    weight, bias = arrays["weight"], arrays["bias"]
    renorm_mean, renorm_std, running_std = (arrays[n] for n in renorm_arrays)
    plain = {"eps": eps, "var_estimator": var_estimator, "xp": xp, **options}

    if not training:  # eval: the running statistics, nothing grouped or corrected
        out = bn(
            x, running_mean, running_var, weight, bias,
            training=False, momentum=momentum, axis=axis, mask=mask, **plain,
        )  # fmt: skip
        if not renorm:
            return out
        assert running_var is not None and renorm_mean is not None and renorm_std is not None
        if running_std is None:
            running_std = xp.sqrt(running_var + eps)
        return RenormOutput(*out, None, None, renorm_mean, renorm_std, running_std)

    group = None if k is None else ghost(xp, x, axis, k, training)
    xs, ms, ax = x, mask, axis
    if group is not None:
        xs = group.split(x)
        ax = group.axis
        ms = group.split_mask(mask, x)

    if not renorm:
        assert group is not None
        out = bn(
            xs, group.per_group(running_mean), group.per_group(running_var),
            group.per_group(weight), group.per_group(bias),
            training=True, momentum=momentum, axis=ax, mask=ms, **plain,
        )  # fmt: skip
        new_mean, new_var = out.new_running_mean, out.new_running_var
        if new_mean is not None:  # Keras 2: the running update from the groups' mean
            new_mean = _as(xp, group.mean(new_mean), running_mean.dtype)  # type: ignore[union-attr]
            new_var = _as(xp, group.mean(new_var), running_var.dtype)  # type: ignore[union-attr]
        return BatchNormOutput(
            _torch_layout(group.join(out.y), x), group.grouped(out.mean), group.grouped(out.invstd),
            new_mean, new_var,
        )  # fmt: skip

    # renorm: the batch statistics first, cut from autograd (r and d are constants)
    assert clip is not None and running_mean is not None and running_var is not None
    assert renorm_mean is not None and renorm_std is not None
    cdt = compute_dtype(xp, x.dtype)
    device = compat.device(x)
    shape = channels
    if group is not None:
        shape = (group.groups * channels[0],) if group.merged else (group.groups, *channels)
    stats = bn(
        stop_gradient(xs), xp.zeros(shape, dtype=cdt, device=device),
        xp.ones(shape, dtype=cdt, device=device), None, None,
        training=True, momentum=1.0, axis=ax, mask=ms, **plain,
    )  # fmt: skip
    mean_b = stop_gradient(stats.mean)
    var_b = stop_gradient(1.0 / (stats.invstd * stats.invstd))  # var + eps
    var_est = stop_gradient(stats.new_running_var)  # the estimator's variance (momentum 1)
    if group is not None:  # the groups' mean statistics (Keras 2)
        mean_b, var_b, var_est = group.mean(mean_b), group.mean(var_b), group.mean(var_est)
    else:
        mean_b, var_b, var_est = (xp.reshape(a, channels) for a in (mean_b, var_b, var_est))
    std_b = xp.sqrt(var_b)
    r_mean = _as(xp, stop_gradient(renorm_mean), cdt)
    r_std = _as(xp, stop_gradient(renorm_std), cdt)
    limit = xp.maximum(r_std, xp.asarray(math.sqrt(eps), dtype=cdt, device=device))
    rmin, rmax, dmax = clip
    r = xp.clip(std_b / limit, rmin, rmax)
    d = xp.clip((mean_b - r_mean) / limit, -dmax, dmax)

    w = r if weight is None else r * _as(xp, weight, cdt)
    b = d if weight is None else d * _as(xp, weight, cdt)
    if bias is not None:
        b = b + _as(xp, bias, cdt)
    if group is not None:
        w, b = group.per_group(w), group.per_group(b)
    out = bn(xs, None, None, w, b, training=True, momentum=momentum, axis=ax, mask=ms, **plain)

    # the moving statistics as Keras 3 updates them (momentum is the batch's weight here)
    def ema(old: Array, new: Array, m: float) -> Array:
        return _as(xp, (1.0 - m) * _as(xp, stop_gradient(old), cdt) + m * new, old.dtype)

    if running_std is None:
        running_std = xp.sqrt(_as(xp, running_var, cdt) + eps)
    new_std = ema(running_std, xp.sqrt(var_est + eps), momentum)
    new_std_c = _as(xp, new_std, cdt)
    zero = xp.zeros((), dtype=cdt, device=device)
    new_var = _as(xp, xp.maximum(new_std_c * new_std_c - eps, zero), running_var.dtype)
    y, mean, invstd = out.y, out.mean, out.invstd
    if group is not None:
        y, mean, invstd = group.join(y), group.grouped(mean), group.grouped(invstd)
        y = _torch_layout(y, x)
    return RenormOutput(
        y, mean, invstd, ema(running_mean, mean_b, momentum), new_var, r, d,
        ema(renorm_mean, mean_b, renorm_m), ema(renorm_std, std_b, renorm_m), new_std,
    )  # fmt: skip


# --- the backward --------------------------------------------------------------------------


def backward(
    bn_backward: Callable[..., BatchNormGrads],
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: object,
    axis: object,
    mask: Array | None,
    renorm_r: Array | None,
    renorm_d: Array | None,
    virtual_batch_size: object,
    options: dict[str, Any],
    xp: ModuleType | None,
) -> BatchNormGrads:
    """:func:`anybn.batch_norm_backward` with ``renorm_r``/``renorm_d`` or ghost batches."""
    training = check_training(training)
    k = check_virtual_batch_size(virtual_batch_size)
    if (renorm_r is None) != (renorm_d is None):
        raise ValueError(
            "renorm_r and renorm_d must be given together (the forward's out.r and out.d)"
        )
    if k is not None and training and options.get("comm") is not None:
        raise ValueError("virtual_batch_size cannot be combined with comm= (see batch_norm)")
    if not training:  # eval: the running statistics are constants, r and d play no part
        return bn_backward(dy, x, weight, mean, invstd, training=False, axis=axis, xp=xp, **options)
    xp, channels, arrays = _namespace(
        x, {"weight": weight, "renorm_r": renorm_r, "renorm_d": renorm_d}, axis, xp, mask
    )
    weight, r, d = arrays["weight"], arrays["renorm_r"], arrays["renorm_d"]
    w = weight
    if r is not None:
        cdt = compute_dtype(xp, x.dtype)
        w = r if weight is None else _as(xp, r, cdt) * _as(xp, weight, cdt)
    if k is None:
        grads = bn_backward(
            dy, x, w, mean, invstd, training=True, axis=axis, mask=mask, xp=xp, **options
        )
        sum_dy_xhat, sum_dy = grads.dweight, grads.dbias
        dx = grads.dx
    else:
        group = ghost(xp, x, axis, k, True)
        expected = (group.groups, *channels)
        for name, a in (("mean", mean), ("invstd", invstd)):
            if tuple(a.shape) != expected:
                raise ValueError(
                    f"{name} must have shape {expected} (one row per ghost batch, as the "
                    f"forward with virtual_batch_size={k} returns it), got {tuple(a.shape)}"
                )
        ms = group.split_mask(mask, x)
        flat = (group.groups * channels[0],) if group.merged else expected
        grads = bn_backward(
            group.split(dy), group.split(x), group.per_group(w),
            xp.reshape(mean, flat), xp.reshape(invstd, flat),
            training=True, axis=group.axis, mask=ms, xp=xp, **options,
        )  # fmt: skip
        dx = _torch_layout(group.join(grads.dx), x)
        sum_dy_xhat, sum_dy = group.sum(grads.dweight), group.sum(grads.dbias)
    if r is None or d is None:
        return BatchNormGrads(dx, sum_dy_xhat, sum_dy)
    cdt = sum_dy.dtype
    return BatchNormGrads(dx, _as(xp, r, cdt) * sum_dy_xhat + _as(xp, d, cdt) * sum_dy, sum_dy)
