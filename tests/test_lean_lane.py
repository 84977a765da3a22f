"""The lean lane of ``anybn.batch_norm``/``batch_norm_backward``.

Plain calls (a NumPy array or torch tensor, per-channel vectors of its type, dtype,
device and shape, Python bools and floats, one int axis) skip the generic argument
resolution. These tests check that plain calls do take that lane, that it returns
exactly what the full validation path returns (``xp=`` given forces that path), and
that every call which must raise still raises the full path's error.
"""

from __future__ import annotations

from typing import Any

import array_api_compat
import numpy as np
import pytest

import anybn
from anybn import _call as _functional

CASES = [((8, 16), 1), ((4, 3, 5, 5), 1), ((4, 5, 5, 3), -1), ((6, 4, 7), 2), ((5, 2), 0)]
DTYPES = ["float16", "float32", "float64"]


@pytest.fixture
def no_full_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the full validation path fail loudly if a call reaches it."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the full validation path ran")

    monkeypatch.setattr(_functional, "resolve_namespace", refuse)


def _arrays(shape: tuple[int, ...], axis: int, dtype: str, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    c = shape[axis]
    return {
        "x": (rng.standard_normal(shape) * 2 + 3).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
        "weight": rng.uniform(0.5, 1.5, c).astype(dtype),
        "bias": rng.standard_normal(c).astype(dtype),
        "running_mean": rng.standard_normal(c).astype(dtype),
        "running_var": rng.uniform(0.5, 2.0, c).astype(dtype),
    }


def _torch(a: dict[str, Any]) -> dict[str, Any]:
    torch = pytest.importorskip("torch")
    return {k: torch.from_numpy(v.copy()) for k, v in a.items()}


def _equal(a: Any, b: Any) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    np.testing.assert_array_equal(anybn._xp.to_host(a), anybn._xp.to_host(b))


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_plain_calls_take_the_lean_lane(
    no_full_validation: None,
    library: str,
    training: bool,
    shape: tuple[int, ...],
    axis: int,
) -> None:
    a = _arrays(shape, axis, "float32")
    if library == "torch":
        a = _torch(a)
    out = anybn.batch_norm(
        a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
        training=training, axis=axis,
    )  # fmt: skip
    grads = anybn.batch_norm_backward(
        a["dy"], a["x"], a["weight"], out.mean, out.invstd, training=training, axis=axis
    )
    assert tuple(out.y.shape) == shape and tuple(grads.dx.shape) == shape


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_biased_estimator_takes_the_lean_lane(
    monkeypatch: pytest.MonkeyPatch, library: str, dtype: str, shape: tuple[int, ...], axis: int
) -> None:
    """var_estimator="biased" plain calls: the lean lane, the full path's results."""
    a = _arrays(shape, axis, dtype, seed=3)
    if library == "torch":
        a = _torch(a)
    x, stats = a["x"], (a["running_mean"], a["running_var"], a["weight"], a["bias"])
    xp = array_api_compat.array_namespace(x)
    full = anybn.batch_norm(x, *stats, training=True, axis=axis, var_estimator="biased", xp=xp)
    with monkeypatch.context() as m:
        m.setattr(_functional, "resolve_namespace", _refuse)
        lean = anybn.batch_norm(x, *stats, training=True, axis=axis, var_estimator="biased")
    for got, want in zip(lean, full, strict=True):
        _equal(got, want)


def _refuse(*args: Any, **kwargs: Any) -> Any:
    raise AssertionError("the full validation path ran")


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize(("shape", "axis"), CASES)
def test_lean_lane_matches_full_validation(
    library: str, dtype: str, training: bool, affine: bool, shape: tuple[int, ...], axis: int
) -> None:
    a = _arrays(shape, axis, dtype, seed=len(shape) + axis)
    if library == "torch":
        a = _torch(a)
    x = a["x"]
    xp = array_api_compat.array_namespace(x)
    w, b = (a["weight"], a["bias"]) if affine else (None, None)
    for stats in ((a["running_mean"], a["running_var"]), (None, None))[: 2 if training else 1]:
        lean = anybn.batch_norm(x, *stats, w, b, training=training, axis=axis)
        full = anybn.batch_norm(x, *stats, w, b, training=training, axis=axis, xp=xp)
        for got, want in zip(lean, full, strict=True):
            _equal(got, want)
        g_lean = anybn.batch_norm_backward(
            a["dy"], x, w, lean.mean, lean.invstd, training=training, axis=axis
        )
        g_full = anybn.batch_norm_backward(
            a["dy"], x, w, full.mean, full.invstd, training=training, axis=axis, xp=xp
        )
        for got, want in zip(g_lean, g_full, strict=True):
            _equal(got, want)


def test_lean_lane_never_mutates_and_copies_the_eval_mean() -> None:
    a = _arrays((8, 4), 1, "float32")
    before = {k: v.copy() for k, v in a.items()}
    out = anybn.batch_norm(a["x"], a["running_mean"], a["running_var"], training=False)
    assert out.mean is not a["running_mean"]
    assert not np.shares_memory(out.mean, a["running_mean"])
    anybn.batch_norm(a["x"], a["running_mean"], a["running_var"], training=True)
    for k, v in a.items():
        np.testing.assert_array_equal(v, before[k])


# Calls that look plain but must raise: each reaches the full path and its error.
_BAD_FORWARD = [
    ({"weight": np.ones(4, np.float64)}, TypeError, "weight"),
    ({"bias": np.ones(5, np.float32)}, ValueError, "bias"),
    ({"running_mean": np.zeros(4, np.float32)}, ValueError, "running_var"),
    ({"momentum": 1.5}, ValueError, "momentum"),
    ({"momentum": float("nan")}, ValueError, "momentum"),
    ({"eps": 0.0}, ValueError, "eps"),
    ({"eps": float("inf")}, ValueError, "eps"),
    ({"eps": float("nan")}, ValueError, "eps"),
    ({"training": 1}, TypeError, "training"),
    ({"axis": 2}, Exception, "axis"),
    ({"axis": 1.0}, TypeError, "axis"),
    ({"training": False}, ValueError, "running_mean"),
    ({"x": np.ones((1, 4), np.float32)}, ValueError, "more than 1 value"),
    ({"x": np.ones((8, 4), np.int64)}, TypeError, "x"),
    ({"x": np.ones(4, np.float32)}, ValueError, "x"),
    ({"weight": np.ma.ones(4, np.float32)}, TypeError, "weight"),
]


@pytest.mark.parametrize(("change", "error", "named"), _BAD_FORWARD)
def test_plain_looking_bad_forward_calls_raise(
    change: dict[str, Any], error: type[Exception], named: str
) -> None:
    call: dict[str, Any] = {"x": np.ones((8, 4), np.float32), "training": True}
    call.update(change)
    x = call.pop("x")
    with pytest.raises(error, match=named):
        anybn.batch_norm(x, **call)


_BAD_BACKWARD = [
    ({"dy": np.ones((8, 4), np.int32)}, TypeError, "dy"),
    ({"dy": np.ones((8, 5), np.float32)}, ValueError, "dy"),
    ({"mean": None}, TypeError, "mean"),
    ({"invstd": None}, TypeError, "invstd"),
    ({"invstd": np.ones(3, np.float32)}, ValueError, "invstd"),
    ({"mean": np.ones(4, np.float64)}, TypeError, "mean"),
    ({"training": np.int8(1)}, TypeError, "training"),
]


@pytest.mark.parametrize(("change", "error", "named"), _BAD_BACKWARD)
def test_plain_looking_bad_backward_calls_raise(
    change: dict[str, Any], error: type[Exception], named: str
) -> None:
    x = np.arange(32, dtype=np.float32).reshape(8, 4)
    call: dict[str, Any] = {
        "dy": np.ones_like(x),
        "weight": None,
        "mean": np.ones(4, np.float32),
        "invstd": np.ones(4, np.float32),
        "training": True,
    }
    call.update(change)
    with pytest.raises(error, match=named):
        anybn.batch_norm_backward(
            call.pop("dy"), x, call.pop("weight"), call.pop("mean"), call.pop("invstd"), **call
        )


def test_torch_vectors_on_another_device_or_dtype_take_the_full_path() -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(8, 4)
    with pytest.raises(TypeError, match="weight"):
        anybn.batch_norm(x, weight=torch.ones(4, dtype=torch.float64), training=True)
    meta = torch.ones(4, device="meta")
    with pytest.raises(ValueError, match="device"):
        anybn.batch_norm(x, weight=meta, training=True)
