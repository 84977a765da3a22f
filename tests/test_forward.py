"""``anybn.batch_norm`` across the backend matrix, against the float64 reference and torch."""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import (
    CASES,
    TRAIN_EVAL,
    Case,
    assert_close,
    assert_identical,
    batch_norm,
    check_case,
    check_forward,
    forward,
    host,
    make_inputs,
)

from anybn._testing.backends import Backend


@pytest.mark.parametrize("case", CASES, ids=str)
def test_forward_matches_oracles(
    backend: Backend, dtype: str, case: Case, rng: np.random.Generator
) -> None:
    """y, mean, invstd and running stats for every layout, mode and optional argument."""
    a = make_inputs(rng, case).to(backend, dtype)
    check_forward(forward(a, case), a, case, dtype)


@TRAIN_EVAL
def test_half_input_with_float32_parameters(
    backend: Backend, half_dtype: str, training: bool, rng: np.random.Generator
) -> None:
    """Half x and dy with float32 weight, bias and running stats, as PyTorch accepts."""
    case = Case(training=training)
    check_case(
        make_inputs(rng, case).to(backend, half_dtype, param_dtype="float32"), case, half_dtype
    )


@TRAIN_EVAL
def test_defaults_follow_torch(backend: Backend, training: bool, rng: np.random.Generator) -> None:
    """Without momentum and eps, the results are torch's defaults (0.1 and 1e-5)."""
    case = Case(training=training)
    a = make_inputs(rng, case).to(backend, "float64")
    out = batch_norm(*a.forward_args, training=training)
    check_forward(out, a, case, "float64", momentum=0.1, eps=1e-5)


def test_eval_returns_running_stats_unchanged(
    backend: Backend, dtype: str, rng: np.random.Generator
) -> None:
    """In eval the running stats come back bit for bit, in their dtype."""
    case = Case(training=False)
    a = make_inputs(rng, case).to(backend, dtype)
    out = forward(a, case)
    assert_identical(out.new_running_mean, a.running_mean)
    assert_identical(out.new_running_var, a.running_var)


@pytest.mark.parametrize("momentum", [0.0, 1.0])
def test_momentum_edges(
    backend: Backend, dtype: str, momentum: float, rng: np.random.Generator
) -> None:
    """momentum=0 keeps the running stats; momentum=1 replaces them by the batch's."""
    case = Case()
    a = make_inputs(rng, case).to(backend, dtype)
    out = forward(a, case, momentum=momentum)
    if momentum == 0.0:
        assert_identical(out.new_running_mean, a.running_mean)
        assert_identical(out.new_running_var, a.running_var)
    else:
        assert_close(out.new_running_mean, host(out.mean), name="running_mean")
    check_forward(out, a, case, dtype, momentum=momentum)


def test_eval_with_one_value_per_channel(backend: Backend, rng: np.random.Generator) -> None:
    """A single sample is fine in eval: only training needs a batch."""
    case = Case(training=False, dims=((1, 3), 1))
    a = make_inputs(rng, case).to(backend, "float32")
    check_forward(forward(a, case), a, case, "float32")
