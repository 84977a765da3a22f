"""The widest floating dtype an array's library computes in, on the array's device."""

from __future__ import annotations

from types import ModuleType

import array_api_compat as compat

from .._xp import Array

__all__ = ["wide_dtype"]


def wide_dtype(xp: ModuleType, a: Array) -> object:
    """float64 where ``a``'s library and device have it, else float32.

    JAX without ``jax_enable_x64`` and torch on MPS have no float64: they
    compute in float32.
    """
    if compat.is_jax_array(a):
        import jax

        if not jax.config.read("jax_enable_x64"):
            return xp.float32
    if compat.is_torch_array(a) and a.device.type == "mps":
        return xp.float32
    return getattr(xp, "float64", xp.float32)
