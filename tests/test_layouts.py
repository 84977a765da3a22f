"""Memory layouts and devices: any strides give the results of contiguous inputs.

Transposed, negatively strided, sliced, read-only and channels-last inputs are
checked against the oracles like the matrix, and every result stays on x's device.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat as compat
import numpy as np
import pytest
from _helpers import (
    TRAIN_EVAL,
    Case,
    Inputs,
    backward,
    check_case,
    forward,
    make_inputs,
    require,
)

from anybn._testing.backends import Backend


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _strided(a: np.ndarray) -> np.ndarray:
    """The values of ``a`` as every other element of a larger array."""
    big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), dtype=a.dtype)
    big[..., ::2] = a
    return big[..., ::2]


#: NumPy views with the values of a C-contiguous array and other strides.
NUMPY_LAYOUTS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "transposed": lambda a: np.ascontiguousarray(a.T).T,
    "fortran": np.asfortranarray,
    "negative-strides": lambda a: np.flip(np.ascontiguousarray(np.flip(a))),
    "strided": _strided,
    "readonly": _readonly,
}


def _as_layout(a: Inputs, layout: Callable[[Any], Any], vectors: bool = True) -> Inputs:
    """``a`` with x and dy (and the per-channel vectors) in ``layout``."""
    return a.map(lambda name, v: layout(v) if vectors or name in ("x", "dy") else v)


@pytest.mark.parametrize("dtype", ["float32", "float64", "float16"])
@TRAIN_EVAL
@pytest.mark.parametrize("layout", list(NUMPY_LAYOUTS))
def test_numpy_layouts(layout: str, training: bool, dtype: str, rng: np.random.Generator) -> None:
    """NumPy views of every kind, for x, dy and the per-channel vectors."""
    case = Case(training=training)
    numpy = require("numpy")
    a = _as_layout(make_inputs(rng, case).to(numpy, dtype), NUMPY_LAYOUTS[layout])
    if layout != "readonly":
        assert not a.x.flags.c_contiguous
    check_case(a, case, dtype)


@pytest.mark.parametrize("layout", ["NHWC", "NCL"])
def test_numpy_broadcast_weight(layout: str, rng: np.random.Generator) -> None:
    """A zero-stride, read-only weight (``np.broadcast_to``) is accepted."""
    case = Case(layout=layout)
    a = make_inputs(rng, case).to(require("numpy"), "float64")
    channels = case.shape[case.axis]
    a = a.map(lambda n, v: np.broadcast_to(v[:1], (channels,)) if n == "weight" else v)
    check_case(a, case, "float64")


#: torch tensors with the values of a contiguous one and another memory layout:
#: name -> (layout of the case, function of the torch module and the tensor).
TORCH_LAYOUTS: dict[str, tuple[str, Callable[[Any, Any], Any]]] = {
    "channels_last": ("NCHW", lambda torch, t: t.contiguous(memory_format=torch.channels_last)),
    "channels_last_3d": (
        "NCDHW",
        lambda torch, t: t.contiguous(memory_format=torch.channels_last_3d),
    ),
    "transposed": ("NCHW", lambda torch, t: t.mT.contiguous().mT),
    "permuted": ("NCL", lambda torch, t: t.permute(2, 0, 1).contiguous().permute(1, 2, 0)),
    "sliced": ("NCL", lambda torch, t: torch.cat([t, t], dim=-1)[..., : t.shape[-1]]),
    "requires_grad": ("NCHW", lambda torch, t: t.clone().requires_grad_()),
}


@pytest.mark.parametrize("device", ["torch", "torch:cuda"])
@TRAIN_EVAL
@pytest.mark.parametrize("layout", list(TORCH_LAYOUTS))
def test_torch_layouts(layout: str, training: bool, device: str, rng: np.random.Generator) -> None:
    """torch channels_last, transposed, permuted and sliced x and dy; x requiring grad."""
    backend = require(device)
    case_layout, to_layout = TORCH_LAYOUTS[layout]
    case = Case(layout=case_layout, training=training)
    a = make_inputs(rng, case).to(backend, "float32")
    a = _as_layout(a, lambda t: to_layout(backend.lib, t), vectors=layout == "requires_grad")
    if layout != "requires_grad":
        assert not a.x.is_contiguous()
    check_case(a, case, "float32")


def test_device1_end_to_end(rng: np.random.Generator) -> None:
    """array-api-strict's device1: train, backward, then eval on the new running stats."""
    backend: Backend = require("array_api_strict:device1")
    train, evaluate = Case(layout="NHWC"), Case(layout="NHWC", training=False)
    a = make_inputs(rng, train).to(backend, "float64")
    out = forward(a, train)
    grads = backward(a, train, out)
    b = Inputs(a.x, a.dy, a.weight, a.bias, out.new_running_mean, out.new_running_var)
    out_eval = forward(b, evaluate)
    for result in (*out, *grads, *out_eval, *backward(b, evaluate, out_eval)):
        assert compat.device(result) == compat.device(a.x) == backend.lib.Device("device1")
