"""Argument checks for the functional core.

Every check runs before any computation, so that a bad call raises without
having produced, let alone stored, anything.
"""

from __future__ import annotations

import math
import numbers
from types import ModuleType

from ._xp import Array, check_floating, compute_dtype, dtype_name

__all__ = ["check_channel_vector", "check_eps", "check_input", "check_momentum", "check_training"]


def check_input(xp: ModuleType, x: Array, name: str = "x") -> None:
    """``x`` must have at least two dimensions and a real floating dtype."""
    if x.ndim < 2:
        raise ValueError(
            f"{name} must have at least 2 dimensions (N, C, ...), got shape {tuple(x.shape)}"
        )
    check_floating(xp, x, name)


def check_channel_vector(
    xp: ModuleType, a: Array | None, name: str, channels: int, x_dtype: object
) -> None:
    """A per-channel argument: ``None`` or a 1-D float array of length ``channels``.

    Its dtype must be that of ``x`` or, for half-precision ``x``, float32, as
    PyTorch accepts. ``x_dtype`` must already be checked to be floating
    (:func:`check_input`): an array of x's dtype and shape ``(C,)`` is then valid
    without further checks, the common case, kept cheap for small inputs.
    """
    if a is None or (a.dtype == x_dtype and tuple(a.shape) == (channels,)):
        return
    if tuple(a.shape) != (channels,):
        raise ValueError(
            f"{name} must have shape ({channels},) to match the {channels} channels "
            f"of x, got shape {tuple(a.shape)}"
        )
    check_floating(xp, a, name)
    allowed = (x_dtype, compute_dtype(xp, x_dtype))
    # Compare with ==, not set membership: NumPy's xp.float32 is the scalar type,
    # which equals np.dtype("float32") but does not hash like it.
    if not any(a.dtype == d for d in allowed):
        expected = " or ".join(sorted({dtype_name(d) for d in allowed}))
        raise TypeError(
            f"{name} must have dtype {expected} for x of dtype {dtype_name(x_dtype)}, "
            f"got {dtype_name(a.dtype)}"
        )


def check_eps(eps: object) -> float:
    """``eps`` must be a finite number > 0."""
    if isinstance(eps, bool) or not isinstance(eps, numbers.Real):
        raise TypeError(f"eps must be a float, got {type(eps).__name__}")
    value = float(eps)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"eps must be a finite number > 0, got {eps!r}")
    return value


def check_momentum(momentum: object) -> float:
    """``momentum`` must be a number in [0, 1]."""
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float in [0, 1], got {type(momentum).__name__}")
    value = float(momentum)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
    return value


def check_training(training: object) -> bool:
    """``training`` must be a bool."""
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    return training
