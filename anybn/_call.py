"""The resolved call: a call's arguments checked once, and what the checks established.

:func:`resolve_forward` and :func:`resolve_backward` are the only validation of
the functional core. Their first branch is the plain call -- x exactly a NumPy
array or torch tensor of a floating dtype, per-channel vectors of its type, dtype,
device and shape ``(C,)``, Python bools and floats for the options, one int axis,
no mask -- established in a handful of type and shape comparisons; everything else
(including every call that must raise) takes the full checks, so errors and their
messages are the same on both branches. The result is an immutable :class:`Call`
that the kernels (:mod:`anybn._kernels`), the adapters and the layer take as it is.

Adapters that check arguments by their own rules (``anybn.torch`` by PyTorch's,
which allow a momentum outside [0, 1] and ``eps=0`` in eval) build a trusted call
with :meth:`Call.trusted`, without checking again.
"""

from __future__ import annotations

import math
import numbers
import operator
import sys
from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as compat
import numpy as _np

from ._checks import (
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
    normalize_axes,
    param_shape,
    resolve_namespace,
    values_per_channel,
)

__all__ = [
    "Call",
    "resolve_axis_name",
    "resolve_backward",
    "resolve_forward",
    "resolve_timeout",
]


class Call(NamedTuple):
    """A validated batch-norm call: everything but the arrays it computes on.

    Attributes
    ----------
    xp : module
        The array namespace of ``x`` (array-api-compat's).
    axis : int or tuple of int
        The channel axis, non-negative; a sorted tuple for several channel axes.
    n : int
        Values per channel (before masking): the product of the other axes' sizes.
    training : bool
        Batch statistics (True) or running statistics (False).
    momentum, eps : float
        The options of the forward (unused by the backward).
    var_estimator : {"unbiased", "biased"}
        The running variance's denominator, ``n - 1`` or ``n``.
    mask : array or None
        Boolean, x's shape, or None.
    axis_name : hashable or None
        JAX only: the named mapped axis (``jax.pmap``, ``jax.shard_map``) whose
        devices share the batch statistics; None: local statistics.
    axis_index_groups : tuple of tuple of int or None
        JAX only: groups of device indices along ``axis_name`` that share
        statistics, as ``jax.lax`` collectives take them; None: all devices.
    """

    xp: ModuleType
    axis: int | tuple[int, ...]
    n: int
    training: bool
    momentum: float = 0.1
    eps: float = 1e-5
    var_estimator: str = "unbiased"
    mask: Array | None = None
    axis_name: Any = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None

    @classmethod
    def trusted(
        cls,
        xp: ModuleType,
        x: Array,
        *,
        training: bool,
        axis: int | tuple[int, ...],
        momentum: float = 0.1,
        eps: float = 1e-5,
        var_estimator: str = "unbiased",
        mask: Array | None = None,
    ) -> Call:
        """A call whose arguments the caller has checked (``axis`` non-negative)."""
        return cls(
            xp, axis, values_per_channel(tuple(x.shape), axis), training, momentum, eps,
            var_estimator, mask,
        )  # fmt: skip

    @property
    def plain(self) -> bool:
        """Whether the kernels of every backend serve it: one channel axis, no mask, local."""
        return self.mask is None and type(self.axis) is int and self.axis_name is None

    def channels(self, x: Array) -> tuple[int, ...]:
        """The per-channel shape: x's sizes along the channel axes."""
        return param_shape(tuple(x.shape), self.axis)

    def broadcast_shape(self, x: Array) -> tuple[int, ...]:
        """The shape a per-channel vector broadcasts against x with."""
        return channel_shape(x.ndim, self.axis, self.channels(x))

    def compute_dtype(self, x: Array) -> object:
        """The dtype of the arithmetic: x's, float32 for half precision."""
        return compute_dtype(self.xp, x.dtype)

    def device(self, x: Array) -> Any:
        """x's device."""
        return compat.device(x)


# --- the plain branch ----------------------------------------------------------------------
#
# It establishes in a few comparisons what the full checks would (they resolve namespaces and
# devices generically: ~30 us a call, more than the whole kernel on small inputs).

#: type(x) -> (namespace, {x dtype: the dtypes its per-channel vectors may have})
_PLAIN: dict[type, tuple[ModuleType, dict[Any, tuple[Any, ...]]]] = {
    _np.ndarray: (
        compat.array_namespace(_np.empty(0)),
        {
            _np.dtype(_np.float16): (_np.dtype(_np.float16), _np.dtype(_np.float32)),
            _np.dtype(_np.float32): (_np.dtype(_np.float32),),
            _np.dtype(_np.float64): (_np.dtype(_np.float64),),
        },
    )
}

#: The running-variance estimators a plain call may name.
_ESTIMATORS = ("unbiased", "biased")


def _plain_entry(t: type) -> tuple[ModuleType, dict[Any, tuple[Any, ...]]] | None:
    """The plain branch's entry for arrays of type ``t`` (torch's registered on first use)."""
    entry = _PLAIN.get(t)
    if entry is None:
        torch = sys.modules.get("torch")
        if torch is not None and t is getattr(torch, "Tensor", None):
            f16, bf16, f32, f64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
            entry = _PLAIN[t] = (
                compat.array_namespace(torch.empty(0)),
                {f16: (f16, f32), bf16: (bf16, f32), f32: (f32,), f64: (f64,)},
            )
    return entry


def _plain(
    x: Array, vectors: tuple[Array | None, ...], axis: object
) -> tuple[ModuleType, int, int] | None:
    """``(namespace, axis, values per channel)`` if the arrays of a call are plain, else None."""
    entry = _plain_entry(type(x))
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


def _plain_options(training: object, momentum: object, eps: object) -> bool:
    """Whether the options are a Python bool and floats that need no further checks."""
    return (
        type(training) is bool
        and type(momentum) is float
        and type(eps) is float
        and 0.0 <= momentum <= 1.0
        and 0.0 < eps < math.inf
    )


def _unwrap(axes: tuple[int, ...]) -> int | tuple[int, ...]:
    """One channel axis as an int (what the kernels take), several as a tuple."""
    return axes[0] if len(axes) == 1 else axes


# --- the synchronisation options -----------------------------------------------------------


def resolve_axis_name(
    x: Array, axis_name: object, axis_index_groups: object
) -> tuple[Any, tuple[tuple[int, ...], ...] | None]:
    """``(axis_name, axis_index_groups)`` checked: JAX's named-axis synchronisation.

    ``axis_name`` is None, a string or a tuple of strings (JAX's axis names, as
    ``jax.pmap(axis_name=...)`` and ``jax.make_mesh`` take them), and needs x to be
    a JAX array; ``axis_index_groups`` (a sequence of sequences of device indices,
    as ``jax.lax.all_gather`` takes it) needs ``axis_name`` and becomes a tuple of
    tuples (hashable: it is part of what ``jit`` caches on).
    """
    if axis_name is None:
        if axis_index_groups is not None:
            raise ValueError("axis_index_groups needs axis_name (the named axis it splits)")
        return None, None
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    if not names or not all(isinstance(n, str) for n in names):
        raise TypeError(
            "axis_name must be a str or a tuple of str (the name of a jax.pmap / "
            f"jax.shard_map axis), got {axis_name!r}"
        )
    if not compat.is_jax_array(x):
        raise TypeError(
            "axis_name= synchronises over the devices of a JAX named axis (jax.pmap, "
            f"jax.shard_map) and needs JAX arrays, got x of type {type(x).__name__}; "
            "for processes use comm= (torch.distributed, MPI)"
        )
    groups = None
    if axis_index_groups is not None:
        try:
            groups = tuple(tuple(operator.index(i) for i in g) for g in axis_index_groups)  # type: ignore[attr-defined]
        except TypeError:
            raise TypeError(
                "axis_index_groups must be a sequence of sequences of device indices, got "
                f"{axis_index_groups!r}"
            ) from None
        sizes = {len(g) for g in groups}
        flat = sorted(i for g in groups for i in g)
        if not groups or len(sizes) != 1 or 0 in sizes or flat != list(range(len(flat))):
            raise ValueError(
                "axis_index_groups must split the axis' device indices 0..n-1 into groups "
                f"of one size, each index once, got {axis_index_groups!r}"
            )
    return axis_name, groups


def resolve_timeout(timeout: object) -> float | None:
    """``timeout`` of a synchronised call: None (the engine's default) or seconds > 0.

    A :class:`datetime.timedelta` is taken as its seconds.
    """
    if timeout is None:
        return None
    seconds = getattr(timeout, "total_seconds", None)
    value: object = seconds() if callable(seconds) else timeout
    if isinstance(value, (bool, _np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(
            f"timeout must be a number of seconds, a datetime.timedelta or None, got "
            f"{type(timeout).__name__}"
        )
    value = float(value)
    if not (value > 0 and not math.isnan(value)):
        raise ValueError(f"timeout must be > 0 seconds (or None for the default), got {timeout!r}")
    return value


# --- the forward ---------------------------------------------------------------------------


def resolve_forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: object,
    momentum: object,
    eps: object,
    axis: object,
    mask: Array | None,
    var_estimator: object,
    xp: ModuleType | None,
    shard: bool = False,
    axis_name: object = None,
    axis_index_groups: object = None,
) -> tuple[Call, tuple[Array | None, Array | None, Array | None, Array | None]]:
    """The call of :func:`anybn.batch_norm`, and its per-channel vectors in x's namespace.

    Raises as :func:`anybn.batch_norm` documents, before anything is computed.
    ``shard=True``: x is one rank's shard of a synchronised batch, whose values per
    channel are counted over every rank (:mod:`anybn.distributed.sync`), so one value per
    channel here is not an error; the same holds for one device's shard with
    ``axis_name`` (:func:`resolve_axis_name`) in training.
    """
    if (
        xp is None
        and mask is None
        and axis_name is None
        and axis_index_groups is None
        and type(var_estimator) is str
        and var_estimator in _ESTIMATORS
    ):
        plain = _plain(x, (running_mean, running_var, weight, bias), axis)
        if (
            plain is not None
            and _plain_options(training, momentum, eps)
            and (running_mean is None) == (running_var is None)
            and ((shard or plain[2] != 1) if training else running_mean is not None)
        ):
            call = Call(
                plain[0], plain[1], plain[2], training, momentum, eps, var_estimator  # type: ignore[arg-type]
            )
            return call, (running_mean, running_var, weight, bias)
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
    mask = check_mask(xp, mask, x, axes)
    axis_name, groups = resolve_axis_name(x, axis_name, axis_index_groups)
    if not training:  # eval: nothing is synchronised
        axis_name, groups = None, None
    shard = shard or axis_name is not None
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together, got only "
            + ("running_mean" if running_var is None else "running_var")
        )
    if training and count == 1 and not shard:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}"
        )
    if not training and running_mean is None:
        raise ValueError(
            "running_mean and running_var are required when training=False "
            "(or pass training=True to normalize with batch statistics)"
        )
    call = Call(
        xp, _unwrap(axes), count, training, momentum, eps, var_estimator, mask, axis_name, groups
    )
    return call, (running_mean, running_var, weight, bias)


# --- the backward --------------------------------------------------------------------------


def resolve_backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: object,
    axis: object,
    mask: Array | None,
    xp: ModuleType | None,
    axis_name: object = None,
    axis_index_groups: object = None,
) -> tuple[Call, tuple[Array, Array | None, Array, Array]]:
    """The call of :func:`anybn.batch_norm_backward`, and ``(dy, weight, mean, invstd)``.

    Raises as :func:`anybn.batch_norm_backward` documents. In eval the mask plays
    no part (the statistics are constants) and the call holds none, nor an
    ``axis_name`` (nothing is synchronised).
    """
    if xp is None and mask is None and axis_name is None and axis_index_groups is None and (
        type(training) is bool
    ):
        if mean is not None and invstd is not None:
            plain = _plain(x, (weight, mean, invstd), axis)
            if (
                plain is not None
                and type(dy) is type(x)
                and dy.dtype == x.dtype
                and dy.shape == x.shape
                and (type(x) is _np.ndarray or dy.device == x.device)
            ):
                return Call(plain[0], plain[1], plain[2], training), (dy, weight, mean, invstd)
    a: Array | None  # (annotation only: the loops below bind it to optional arrays)
    for name, a in (("dy", dy), ("mean", mean), ("invstd", invstd)):
        if a is None:
            raise TypeError(f"{name} must be an array (NumPy, CuPy, PyTorch, ...), got None")
    xp = resolve_namespace(
        x, {"dy": dy, "weight": weight, "mean": mean, "invstd": invstd, "mask": mask}, xp=xp
    )
    check_input(xp, x)
    dy, weight, mean, invstd, mask = (adopt(xp, x, a) for a in (dy, weight, mean, invstd, mask))
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
    mask = check_mask(xp, mask, x, axes)
    axis_name, groups = resolve_axis_name(x, axis_name, axis_index_groups)
    if not training:
        mask, axis_name, groups = None, None, None
    call = Call(
        xp, _unwrap(axes), count, training, mask=mask, axis_name=axis_name,
        axis_index_groups=groups,
    )  # fmt: skip
    return call, (dy, weight, mean, invstd)
