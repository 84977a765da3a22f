"""Argument checks for the functional core.

Every check runs before any computation, so that a bad call raises without
having produced, let alone stored, anything.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType

import numpy as np

from ._xp import Array, check_floating, compute_dtype, dtype_name, same_dtype

__all__ = [
    "check_bool",
    "check_channel_vector",
    "check_eps",
    "check_input",
    "check_mask",
    "check_momentum",
    "check_training",
    "check_var_estimator",
]


def check_input(xp: ModuleType, x: Array, name: str = "x") -> None:
    """``x`` must have at least two dimensions and a real floating dtype."""
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}"
        )
    check_floating(xp, x, name)


def check_channel_vector(
    xp: ModuleType, a: Array | None, name: str, channels: int | tuple[int, ...], x_dtype: object
) -> None:
    """A per-channel argument: ``None`` or a float array of the channels' shape.

    ``channels`` is the number of channels (one channel axis: shape ``(C,)``) or
    the shape of the channel axes (several: Chainer's ``param_shape``).

    Its dtype must be that of ``x`` or, for half-precision ``x``, float32, as
    PyTorch accepts. ``x_dtype`` must already be checked to be floating
    (:func:`check_input`): an array of x's dtype and shape ``(C,)`` is then valid
    without further checks, the common case, kept cheap for small inputs.
    """
    shape = (channels,) if isinstance(channels, int) else tuple(channels)
    if a is None or (a.dtype == x_dtype and tuple(a.shape) == shape):
        return
    if tuple(a.shape) != shape:
        what = f"the {channels} channels" if isinstance(channels, int) else "the channel axes"
        raise ValueError(
            f"{name} must have shape {shape} to match {what} of x, got shape {tuple(a.shape)}"
        )
    check_floating(xp, a, name)
    allowed = (x_dtype, compute_dtype(xp, x_dtype))
    # Compare with ==, not set membership: NumPy's xp.float32 is the scalar type,
    # which equals np.dtype("float32") but does not hash like it.
    if not any(same_dtype(a.dtype, d) for d in allowed):
        expected = " or ".join(sorted({dtype_name(d) for d in allowed}))
        raise TypeError(
            f"{name} must have dtype {expected} for x of dtype {dtype_name(x_dtype)}, "
            f"got {dtype_name(a.dtype)}"
        )


def check_mask(
    xp: ModuleType, mask: Array | None, x: Array, axes: tuple[int, ...] | None = None
) -> Array | None:
    """``mask``: None, or a boolean array; returned broadcast to x's shape.

    True marks a value that counts for the statistics (the Keras and Flax rule).
    Accepted shapes: x's shape without the channel ``axes`` (Keras' mask, ``(batch,
    time)`` for ``(batch, time, features)`` with ``axis=-1``), whose channel axes are
    inserted back (this reading comes first where a shape could be read both ways),
    or any shape that broadcasts to x's. The namespace and device were checked with
    the other arrays.
    """
    if mask is None:
        return None
    if not xp.isdtype(mask.dtype, "bool"):
        raise TypeError(f"mask must be a boolean array (True where a value counts), got dtype "
                        f"{dtype_name(mask.dtype)}; for a 0/1 mask pass mask != 0")
    shape = tuple(x.shape)
    without = None if axes is None else tuple(s for i, s in enumerate(shape) if i not in axes)
    if axes is not None and len(axes) < len(shape) and tuple(mask.shape) == without:
        expanded = tuple(1 if i in axes else s for i, s in enumerate(shape))
        return xp.broadcast_to(xp.reshape(mask, expanded), shape)
    try:
        return xp.broadcast_to(mask, shape)
    except (ValueError, RuntimeError, TypeError) as exc:
        keras = "" if without is None else f", x's shape without the channel axes {without}"
        raise ValueError(
            f"mask of shape {tuple(mask.shape)} fits neither x's shape {shape}{keras}, nor "
            "a shape that broadcasts to x's; pass a boolean mask of one of these shapes"
        ) from exc


VAR_ESTIMATORS = ("unbiased", "biased")


def check_var_estimator(value: object) -> str:
    """``var_estimator`` must be ``"unbiased"`` (PyTorch, Chainer) or ``"biased"`` (Keras, Flax)."""
    if value not in VAR_ESTIMATORS:
        raise ValueError(
            f"var_estimator must be 'unbiased' (PyTorch, Chainer) or 'biased' (Keras, Flax), "
            f"got {value!r}"
        )
    return str(value)


def _short(value: object) -> str:
    """``repr(value)``, shortened for huge ints (``10**400``) in messages."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:12]}...({len(text)} digits)"


def _real(value: object, name: str, expected: str) -> float:
    """``value`` as a float: a real number (not a bool), or TypeError/ValueError naming it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {expected}, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond float range, 10**400
        raise ValueError(f"{name} must be a finite float, got {_short(value)}") from None


def check_eps(eps: object) -> float:
    """``eps`` must be a finite number > 0."""
    value = _real(eps, "eps", "a float")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be a finite number > 0, got {_short(eps)}")
    return value


def check_momentum(momentum: object) -> float:
    """``momentum`` must be a number in [0, 1]."""
    value = _real(momentum, "momentum", "a float in [0, 1]")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {_short(momentum)}")
    return value


def check_bool(value: object, name: str) -> bool:
    """``value`` must be a bool; NumPy's ``np.True_``/``np.False_`` count as bools."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def check_training(training: object) -> bool:
    """``training`` must be a bool (or a NumPy bool)."""
    return check_bool(training, "training")
