"""``anybn.batch_norm_backward``: the backend matrix, oracles and finite differences."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from _helpers import (
    CASES,
    LAYOUTS,
    TRAIN_EVAL,
    Case,
    backward,
    check_backward,
    forward,
    host,
    make_inputs,
)

from anybn._testing.backends import Backend


@pytest.mark.parametrize("case", CASES, ids=str)
def test_backward_matches_oracles(
    backend: Backend, dtype: str, case: Case, rng: np.random.Generator
) -> None:
    """dx, dweight and dbias for every layout, mode and optional argument."""
    a = make_inputs(rng, case).to(backend, dtype)
    check_backward(backward(a, case, forward(a, case)), a, case, dtype)


def numerical_gradient(loss: object, a: np.ndarray, h: float = 1e-6) -> np.ndarray:
    """Central differences of the scalar ``loss(a)`` with respect to each entry of ``a``."""
    grad = np.empty_like(a)
    for i in np.ndindex(a.shape):
        up, down = a.copy(), a.copy()
        up[i] += h
        down[i] -= h
        grad[i] = (loss(up) - loss(down)) / (2 * h)  # type: ignore[operator]
    return grad


@pytest.mark.parametrize("layout", ["NCL", "NHWC"])
@TRAIN_EVAL
def test_finite_differences(
    backend: Backend, training: bool, layout: str, rng: np.random.Generator
) -> None:
    """The float64 backward is the derivative of the forward: d/dp sum(dy * y(p))."""
    case = Case(training=training, stats=not training, dims=((3, 2, 2), LAYOUTS[layout][1]))
    data = make_inputs(rng, case)

    def loss(name: str, value: np.ndarray) -> float:
        a = dataclasses.replace(data, **{name: value}).to(backend, "float64")
        return float(np.sum(host(forward(a, case).y) * data.dy))

    a = data.to(backend, "float64")
    grads = backward(a, case, forward(a, case))
    for name, got in (("x", grads.dx), ("weight", grads.dweight), ("bias", grads.dbias)):
        expected = numerical_gradient(lambda v, n=name: loss(n, v), getattr(data, name))
        np.testing.assert_allclose(host(got), expected, rtol=1e-6, atol=1e-7, err_msg=name)
