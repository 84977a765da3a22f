"""Numerical behaviour: NaN confinement, large offsets, constant channels, empty batches."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import (
    TRAIN_EVAL,
    Case,
    Inputs,
    assert_close,
    backward,
    check_case,
    dtype_name,
    forward,
    host,
    make_inputs,
    require,
    torch_available,
)

from anybn._testing.backends import Backend
from anybn._testing.reference import reference_backward, reference_forward

NAN_CHANNEL = 1


def _results(a: Inputs, case: Case) -> dict[str, Any]:
    """Every result of a forward and a backward call on ``a``, by name."""
    out = forward(a, case)
    grads = backward(a, case, out)
    return {**out._asdict(), **grads._asdict()}


@pytest.mark.parametrize("where", ["x", "dy"])
@TRAIN_EVAL
def test_nan_stays_in_its_channel(
    backend: Backend, dtype: str, training: bool, where: str, rng: np.random.Generator
) -> None:
    """A NaN in one channel of x or dy leaves every other channel finite and unchanged."""
    case = Case(training=training)
    data = make_inputs(rng, case)
    dirty = data.map(lambda _, a: a.copy())
    getattr(dirty, where)[0, NAN_CHANNEL, 0, 0] = np.nan

    expected = _results(data.to(backend, dtype), case)
    got = _results(dirty.to(backend, dtype), case)
    assert any(np.isnan(host(v)).any() for v in got.values()), "the NaN vanished"
    for name, value in got.items():
        axis = 1 if value.ndim > 1 else 0
        others = np.delete(host(value), NAN_CHANNEL, axis=axis)
        assert np.isfinite(others).all(), f"NaN leaked out of its channel into {name}"
        assert_close(
            others,
            np.delete(host(expected[name]), NAN_CHANNEL, axis=axis),
            dtype=dtype_name(value.dtype),
            name=name,
        )


OFFSETS = [1e2, 1e3, 1e4, 1e5]
BACKWARD_RESULTS = ("dx", "dweight", "dbias")


def offset_data(offset: float) -> Inputs:
    """float32 data of std 1 around ``offset``, 2048 values per channel, as float64."""
    rng = np.random.default_rng(5)
    shape = (32, 4, 8, 8)
    data = Inputs(
        x=rng.standard_normal(shape) + offset,
        dy=rng.standard_normal(shape),
        weight=rng.uniform(0.5, 1.5, 4),
        bias=np.zeros(4),
        running_mean=np.zeros(4),
        running_var=np.ones(4),
    )
    return data.map(lambda _, a: a.astype(np.float32).astype(np.float64))


def relative_errors(got: dict[str, Any], data: Inputs) -> dict[str, float]:
    """max |got - exact| / max(1, max|exact|) per result, exact = float64 on the same input."""
    fwd = reference_forward(*data.forward_args, training=True)
    bwd = reference_backward(data.dy, data.x, data.weight, training=True)
    exact = {**fwd._asdict(), **bwd._asdict()}
    return {
        k: float(np.max(np.abs(host(v) - exact[k]))) / max(1.0, float(np.max(np.abs(exact[k]))))
        for k, v in got.items()
    }


def anybn_offset_errors(backend: Backend, offset: float) -> dict[str, float]:
    """anybn's errors in float32 on ``backend`` (defaults: momentum 0.1, eps 1e-5)."""
    data = offset_data(offset)
    case = Case()
    a = data.to(backend, "float32")
    out = forward(a, case, momentum=0.1, eps=1e-5)
    grads = backward(a, case, out)
    got = {
        "y": out.y,
        "running_mean": out.new_running_mean,
        "running_var": out.new_running_var,
        **grads._asdict(),
    }
    return relative_errors(got, data)


def torch_offset_errors(offset: float) -> dict[str, float]:
    """PyTorch's CPU F.batch_norm and autograd errors in float32 on the same data."""
    import torch

    data = offset_data(offset)
    t = data.to(require("torch"), "float32")
    params = [t.x, t.weight, t.bias]
    for p in params:
        p.requires_grad_()
    y = torch.nn.functional.batch_norm(
        t.x, t.running_mean, t.running_var, t.weight, t.bias, training=True
    )
    y.backward(t.dy)
    got = {"y": y, "running_mean": t.running_mean, "running_var": t.running_var}
    got.update(zip(BACKWARD_RESULTS, (p.grad for p in params), strict=True))
    return relative_errors(got, data)


@pytest.mark.parametrize("offset", OFFSETS)
def test_large_offset_accuracy(backend: Backend, offset: float) -> None:
    """float32 y at least as accurate as torch's CPU kernel on data offset by 1e2..1e5.

    The backward is bounded by the rounding of the saved float32 mean (one ulp of
    the offset), as torch's is, and must stay within twice torch's error.
    """
    errors = anybn_offset_errors(backend, offset)
    ulp = float(np.spacing(np.float32(offset)))
    assert errors["y"] <= 1e-5, errors
    assert errors["running_mean"] <= 4 * float(np.finfo(np.float32).eps), errors
    assert errors["running_var"] <= 1e-6, errors
    for name in BACKWARD_RESULTS:
        assert errors[name] <= ulp + 1e-5, (name, errors)
    if torch_available():
        reference = torch_offset_errors(offset)
        assert errors["y"] <= reference["y"], (errors, reference)
        for name in BACKWARD_RESULTS:
            assert errors[name] <= 2 * reference[name] + 1e-6, (name, errors, reference)


@TRAIN_EVAL
def test_constant_channel(
    backend: Backend, dtype: str, training: bool, rng: np.random.Generator
) -> None:
    """A channel of equal values has variance 0: y is its bias, everything stays finite."""
    case = Case(training=training)
    data = make_inputs(rng, case)
    data.x[:, 0] = 0.75
    a = data.to(backend, dtype)
    check_case(a, case, dtype)
    if training:
        y = host(forward(a, case).y)[:, 0]
        np.testing.assert_array_equal(y, np.broadcast_to(host(a.bias)[0], y.shape))


def test_empty_batch_in_eval(backend: Backend, rng: np.random.Generator) -> None:
    """Eval on a batch of zero samples returns empty results and zero sums."""
    case = Case(training=False, dims=((0, 3, 4), 1))
    check_case(make_inputs(rng, case).to(backend, "float32"), case, "float32")
