"""The generic kernel as the last entry of the kernel list: every call, every library."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .._core import generic
from .._core.outputs import BatchNormGrads, BatchNormOutput
from .._xp import Array

if TYPE_CHECKING:
    from .._call import Call

__all__ = ["accepts", "run_backward", "run_forward"]

NAME = "generic"
FAST = False


def accepts(call: Call, x: Array) -> bool:
    """Every local call (a named JAX axis is the JAX kernel's)."""
    return call.axis_name is None


def run_forward(
    call: Call,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
) -> BatchNormOutput:
    """:func:`anybn._core.generic.forward`."""
    return generic.forward(call, x, running_mean, running_var, weight, bias)


def run_backward(
    call: Call, dy: Array, x: Array, weight: Array | None, mean: Array, invstd: Array
) -> BatchNormGrads:
    """:func:`anybn._core.generic.backward`."""
    return generic.backward(call, dy, x, weight, mean, invstd)
