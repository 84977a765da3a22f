"""Hypothesis property tests over random shapes, channel axes, scales and options.

Deterministic (``derandomize=True``) and small, so they run in seconds.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
from _helpers import (
    Case,
    Inputs,
    assert_close,
    backward,
    check_case,
    forward,
    host,
    make_inputs,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from anybn._testing.backends import Backend

SETTINGS = settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    database=None,  # nothing written to the tree
    suppress_health_check=[HealthCheck.function_scoped_fixture],  # `backend` is stateless
)


@dataclasses.dataclass(frozen=True)
class Problem:
    """A random case with its data (float64 NumPy) and options."""

    case: Case
    data: Inputs
    dtype: str
    momentum: float
    eps: float


@st.composite
def problems(draw: st.DrawFn, dtypes: tuple[str, ...] = ("float32", "float64")) -> Problem:
    """Shapes of 2 to 5 dimensions, any channel axis, x of spread 1e-3..1e3 and offset."""
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    training = draw(st.booleans()) and bool(np.prod(shape) > shape[axis])
    case = Case(
        training=training,
        affine=draw(st.booleans()),
        stats=draw(st.booleans()) or not training,
        dims=(shape, axis),
    )
    scale = 10.0 ** draw(st.floats(-3, 3))
    offset = draw(st.floats(-10, 10)) * scale
    data = make_inputs(np.random.default_rng(draw(st.integers(0, 2**32 - 1))), case)
    data = dataclasses.replace(data, x=data.x * scale + offset)
    return Problem(
        case,
        data,
        draw(st.sampled_from(dtypes)),
        momentum=draw(st.floats(0, 1)),
        eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])) * scale**2,
    )


def _options(p: Problem) -> dict[str, Any]:
    return {"momentum": p.momentum, "eps": p.eps}


@SETTINGS
@given(p=problems())
def test_matches_oracles(backend: Backend, p: Problem) -> None:
    """Forward and backward agree with the float64 reference and torch."""
    check_case(p.data.to(backend, p.dtype), p.case, p.dtype, **_options(p))


@SETTINGS
@given(p=problems(dtypes=("float64",)), shift=st.floats(-100, 100))
def test_training_ignores_a_shift(backend: Backend, p: Problem, shift: float) -> None:
    """In training, y and dx do not change when x is shifted by a constant."""
    case = dataclasses.replace(p.case, training=True)
    assume(np.prod(case.shape) > case.shape[case.axis])
    scale = float(np.std(p.data.x)) or 1.0
    moved = dataclasses.replace(p.data, x=p.data.x + shift * scale)
    results = []
    for data in (p.data, moved):
        a = data.to(backend, "float64")
        out = forward(a, case, **_options(p))
        results.append((out.y, backward(a, case, out).dx))
    (y, dx), (y_moved, dx_moved) = results
    assert_close(y_moved, host(y), name="y")
    assert_close(dx_moved, host(dx), scale=float(np.max(np.abs(host(dx)), initial=1.0)), name="dx")


@SETTINGS
@given(p=problems())
def test_channel_axis_is_a_view(backend: Backend, p: Problem) -> None:
    """Moving the channel axis of x to 1 and back changes nothing."""
    axis = p.case.axis
    moved = p.data.map(lambda _, v: np.moveaxis(v, axis, 1) if v.ndim > 1 else v)
    case = dataclasses.replace(p.case, dims=(moved.x.shape, 1))
    a, b = p.data.to(backend, p.dtype), moved.to(backend, p.dtype)
    out_a, out_b = forward(a, p.case, **_options(p)), forward(b, case, **_options(p))
    grads_a, grads_b = backward(a, p.case, out_a), backward(b, case, out_b)
    for got, want in ((out_b.y, out_a.y), (grads_b.dx, grads_a.dx)):
        assert_close(got, np.moveaxis(host(want), axis, 1), name="moved")
    for got, want in ((out_b.mean, out_a.mean), (grads_b.dweight, grads_a.dweight)):
        assert_close(got, host(want), name="per-channel")
