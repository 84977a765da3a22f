"""ndonnx arrays: concrete ones normalize; a symbolic batch dimension gets a clear error.

ndonnx builds ONNX graphs; an array with a symbolic dimension (``shape=("N", C, ...)``)
has no number of values per channel to divide by, which anybn needs, so it raises
ValueError naming x and what to do (issue 9's table).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

import anybn

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "onnxruntime is not installed": the reference backend serves
    ndx = pytest.importorskip("ndonnx")


def test_symbolic_batch_dimension_is_a_clear_error() -> None:
    x = ndx.argument(shape=("N", 3, 4), dtype=ndx.float32)
    with pytest.raises(ValueError, match=r"x has a shape of unknown extents \(None, 3, 4\)"):
        anybn.batch_norm(x, training=True)


def test_concrete_arrays_match_numpy() -> None:
    values = np.random.default_rng(11).standard_normal((5, 3, 4)).astype(np.float32) + 10
    out = anybn.batch_norm(ndx.asarray(values), training=True)
    expected = anybn.batch_norm(values.astype(np.float64), training=True)
    np.testing.assert_allclose(out.y.unwrap_numpy(), expected.y, atol=1e-6)
    np.testing.assert_allclose(out.mean.unwrap_numpy(), expected.mean, rtol=1e-6)
