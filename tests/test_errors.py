"""Every bad input: the exception type, a message naming the argument, nothing mutated.

Each case starts from valid arguments (x of shape (4, 3, 2), float32, channel
axis 1) and overrides some: an override is a value, or a function of the backend
that builds an array on it. The call must raise before touching anything: every
array argument, running stats included, is byte-identical afterwards.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import array_api_compat as compat
import numpy as np
import pytest
from _helpers import require, unmutated

import anybn
from anybn._testing.backends import Backend

FORWARD = ("x", "running_mean", "running_var", "weight", "bias")
BACKWARD = ("dy", "x", "weight", "mean", "invstd")
OPTIONS = {
    anybn.batch_norm: ("training", "momentum", "eps", "axis"),
    anybn.batch_norm_backward: ("training", "axis"),
}
CHANNELS = 3


def valid(backend: Backend) -> dict[str, Any]:
    """Valid arguments for both functions, training on x of shape (4, 3, 2)."""
    rng = np.random.default_rng(7)
    shape = (4, CHANNELS, 2)
    values = {"x": rng.standard_normal(shape), "dy": rng.standard_normal(shape)}
    for name in ("running_mean", "running_var", "weight", "bias", "mean", "invstd"):
        values[name] = rng.uniform(0.5, 1.5, CHANNELS)
    arrays: dict[str, Any] = {k: backend.asarray(v, "float32") for k, v in values.items()}
    return {**arrays, "training": True, "momentum": 0.1, "eps": 1e-5, "axis": 1}


def array(shape: tuple[int, ...], dtype: str = "float32") -> Callable[[Backend], Any]:
    """An override: ones of ``shape`` and ``dtype`` on the test's backend."""
    return lambda backend: backend.asarray(np.ones(shape), dtype)


def assert_rejects(
    fn: Callable[..., Any],
    values: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    """``fn`` raises ``error`` matching ``match`` and mutates none of its arrays."""
    names = FORWARD if fn is anybn.batch_norm else BACKWARD
    args = [values[n] for n in names]
    kwargs = {k: values[k] for k in OPTIONS[fn]}
    arrays = [a for a in values.values() if compat.is_array_api_obj(a)]
    with unmutated(*arrays), pytest.raises(error, match=match):
        fn(*args, **kwargs)


def run_case(
    fn: Callable[..., Any],
    backend: Backend,
    overrides: dict[str, Any],
    error: type[Exception],
    match: str,
) -> None:
    """Apply ``overrides`` to the valid arguments on ``backend`` and expect ``error``."""
    values = valid(backend)
    for name, v in overrides.items():
        values[name] = v(backend) if callable(v) else v
    assert_rejects(fn, values, error, match)


BAD_DTYPES = ["int64", "int32", "bool", "complex128"]

#: Bad inputs shared by both functions: (overrides, error, match).
COMMON = {
    "x-1d": ({"x": array((4,)), "dy": array((4,))}, ValueError, r"^x must have at least 2 dim"),
    "x-0d": ({"x": array(()), "dy": array(())}, ValueError, r"^x must have at least 2 dim"),
    "axis-too-large": ({"axis": 3}, ValueError, r"^axis 3 is out of range"),
    "axis-too-small": ({"axis": -4}, ValueError, r"^axis -4 is out of range"),
    "axis-float": ({"axis": 1.0}, TypeError, r"^axis must be an int"),
    "axis-bool": ({"axis": True}, TypeError, r"^axis must be an int"),
    "training-str": ({"training": "yes"}, TypeError, r"^training must be a bool"),
    "weight-length": ({"weight": array((CHANNELS + 1,))}, ValueError, r"^weight must have shape"),
    "weight-2d": ({"weight": array((1, CHANNELS))}, ValueError, r"^weight must have shape"),
    "weight-float64": (
        {"weight": array((CHANNELS,), "float64")},
        TypeError,
        r"^weight must have dtype float32",
    ),
    "x-list": ({"x": [[1.0, 2.0, 3.0]] * 4}, TypeError, r"^x must be an array"),
    "weight-list": ({"weight": [1.0] * CHANNELS}, TypeError, r"^weight must be an array"),
    **{
        f"x-{dt}": ({"x": array((4, CHANNELS, 2), dt)}, TypeError, r"^x must have a real float")
        for dt in BAD_DTYPES
    },
    **{
        f"weight-{dt}": (
            {"weight": array((CHANNELS,), dt)},
            TypeError,
            r"^weight must have a real float",
        )
        for dt in BAD_DTYPES
    },
}

FORWARD_ONLY = {
    **{
        f"{name}-length": ({name: array((CHANNELS - 1,))}, ValueError, rf"^{name} must have shape")
        for name in ("bias", "running_mean", "running_var")
    },
    **{
        f"{name}-{dt}": ({name: array((CHANNELS,), dt)}, TypeError, rf"^{name} must have a real")
        for name in ("bias", "running_mean", "running_var")
        for dt in ("int64", "bool", "complex128")
    },
    **{
        f"eps-{v}": ({"eps": v}, ValueError, r"^eps must be a finite number > 0")
        for v in (0.0, -1e-5, float("nan"), float("inf"))
    },
    "eps-str": ({"eps": "1e-5"}, TypeError, r"^eps must be a float"),
    **{
        f"momentum-{v}": ({"momentum": v}, ValueError, r"^momentum must be in \[0, 1\]")
        for v in (-0.1, 1.5, float("nan"))
    },
    "momentum-none": ({"momentum": None}, TypeError, r"^momentum must be a float"),
    "one-value-per-channel": (
        {"x": array((1, CHANNELS))},
        ValueError,
        r"^Expected more than 1 value per channel when training",
    ),
    "one-value-per-channel-spatial": (
        {"x": array((1, CHANNELS, 1, 1))},
        ValueError,
        r"^Expected more than 1 value per channel when training",
    ),
    "one-value-per-channel-last": (
        {"x": array((1, 1, CHANNELS)), "axis": -1},
        ValueError,
        r"^Expected more than 1 value per channel when training",
    ),
    "eval-without-running-stats": (
        {"training": False, "running_mean": None, "running_var": None},
        ValueError,
        r"^running_mean and running_var are required when training=False",
    ),
    "only-running-mean": (
        {"running_var": None},
        ValueError,
        r"^running_mean and running_var must be given together, got only running_mean",
    ),
    "only-running-var": (
        {"running_mean": None},
        ValueError,
        r"^running_mean and running_var must be given together, got only running_var",
    ),
    "only-running-mean-eval": (
        {"running_var": None, "training": False},
        ValueError,
        r"^running_mean and running_var must be given together",
    ),
}

BACKWARD_ONLY = {
    "dy-shape": ({"dy": array((4, CHANNELS, 3))}, ValueError, r"^dy must have the shape of x"),
    "dy-transposed": ({"dy": array((CHANNELS, 4, 2))}, ValueError, r"^dy must have the shape"),
    **{
        f"dy-{dt}": ({"dy": array((4, CHANNELS, 2), dt)}, TypeError, r"^dy must have a real float")
        for dt in BAD_DTYPES
    },
    **{
        f"{name}-length": ({name: array((CHANNELS + 2,))}, ValueError, rf"^{name} must have shape")
        for name in ("mean", "invstd")
    },
    **{
        f"{name}-{dt}": ({name: array((CHANNELS,), dt)}, TypeError, rf"^{name} must have a real")
        for name in ("mean", "invstd")
        for dt in ("int64", "complex128")
    },
    "dy-list": ({"dy": [[[0.0] * 2] * CHANNELS] * 4}, TypeError, r"^dy must be an array"),
}


def _params(table: dict[str, tuple[Any, ...]]) -> list[Any]:
    return [pytest.param(*v, id=k) for k, v in table.items()]


@pytest.mark.parametrize(("overrides", "error", "match"), _params({**COMMON, **FORWARD_ONLY}))
def test_forward_rejects(
    backend: Backend, overrides: dict[str, Any], error: type[Exception], match: str
) -> None:
    run_case(anybn.batch_norm, backend, overrides, error, match)


@pytest.mark.parametrize(("overrides", "error", "match"), _params({**COMMON, **BACKWARD_ONLY}))
def test_backward_rejects(
    backend: Backend, overrides: dict[str, Any], error: type[Exception], match: str
) -> None:
    run_case(anybn.batch_norm_backward, backend, overrides, error, match)


#: (backend of x, backend of the other argument): different libraries raise
#: TypeError, the same library on different devices ValueError.
MIXES = [
    ("numpy", "torch"),
    ("torch", "numpy"),
    ("array_api_strict", "numpy"),
    ("numpy", "array_api_strict"),
    ("torch", "array_api_strict"),
    ("numpy", "cupy"),
    ("array_api_strict", "array_api_strict:device1"),
    ("array_api_strict:device1", "array_api_strict"),
    ("torch", "torch:cuda"),
    ("torch:cuda", "torch"),
]


def _mixes(names: tuple[str, ...]) -> list[Any]:
    return [
        pytest.param(xb, ob, name, id=f"{name}-{ob}-with-x-{xb}")
        for xb, ob in MIXES
        for name in names
        if name != "x"
    ]


@pytest.mark.parametrize(("x_backend", "other_backend", "name"), _mixes(FORWARD) + _mixes(BACKWARD))
def test_mixed_libraries_and_devices(x_backend: str, other_backend: str, name: str) -> None:
    """An argument from another library (TypeError) or on another device (ValueError)."""
    xb, ob = require(x_backend), require(other_backend)
    values = valid(xb)
    values[name] = valid(ob)[name]
    fn = anybn.batch_norm if name in FORWARD else anybn.batch_norm_backward
    if xb.module != ob.module:
        assert_rejects(fn, values, TypeError, rf"^{name} must be an array of the same library as x")
    else:
        assert_rejects(fn, values, ValueError, rf"^{name} is on device .* but x is on device")


# --- the layer's messages name what the user passed and the likely fix -------------------


def _layer_state(bn: anybn.BatchNorm) -> dict[str, Any]:
    return {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}


def _assert_same_state(before: dict[str, Any], bn: anybn.BatchNorm) -> None:
    after = bn.state_dict()
    assert before.keys() == after.keys()
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(after[k]), v)


def test_layer_channels_last_input_suggests_axis_minus_one() -> None:
    bn = anybn.BatchNorm(3)
    bn(np.ones((2, 3, 4, 4)) + np.arange(2.0).reshape(2, 1, 1, 1))
    before = _layer_state(bn)
    with pytest.raises(
        ValueError, match=r"28 channels on axis 1 .*last axis has 3.*create the layer with axis=-1"
    ):
        bn(np.zeros((4, 28, 28, 3)))
    _assert_same_state(before, bn)
    with pytest.raises(ValueError, match=r"axis 2 has 5: create the layer with axis=2"):
        anybn.BatchNorm(5)(np.zeros((4, 3, 5, 6)))
    with pytest.raises(ValueError, match=r"num_features=7$"):  # no axis to suggest
        anybn.BatchNorm(7)(np.zeros((4, 3, 5, 6)))


def test_lazy_layer_warns_on_what_looks_channels_last() -> None:
    with pytest.warns(UserWarning, match=r"28 channels from x of shape \(4, 28, 28, 3\).*axis=-1"):
        anybn.BatchNorm()(np.random.default_rng(0).standard_normal((4, 28, 28, 3)))
    with pytest.warns(UserWarning, match=r"\(N, D, H, W, C\)"):
        anybn.BatchNorm()(np.random.default_rng(0).standard_normal((2, 6, 6, 6, 2)))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rng = np.random.default_rng(1)
        anybn.BatchNorm()(rng.standard_normal((32, 512, 4, 4)))  # NCHW, a late layer
        anybn.BatchNorm()(rng.standard_normal((8, 16, 16, 16)))  # C == H == W: ambiguous
        anybn.BatchNorm(28)(rng.standard_normal((4, 28, 28, 3)))  # told: no guess
        anybn.BatchNorm(axis=-1)(rng.standard_normal((4, 28, 28, 3)))


@pytest.mark.parametrize("given", [True, False], ids=["dtype=", "first input"])
def test_layer_dtype_mismatch_blames_x_not_running_mean(given: bool) -> None:
    bn = anybn.BatchNorm(3, dtype=np.float32) if given else anybn.BatchNorm(3)
    bn(np.random.default_rng(2).standard_normal((4, 3)).astype(np.float32))
    before = _layer_state(bn)
    source = "its dtype=" if given else "bound by its first input"
    with pytest.raises(TypeError) as info:
        bn(np.zeros((4, 3)))  # float64
    message = str(info.value)
    assert message.startswith("x has dtype float64 but this BatchNorm's parameters")
    assert source in message and "create the layer with dtype=float64" in message
    assert "running_mean" not in message
    _assert_same_state(before, bn)
    bn(np.zeros((4, 3), np.float16))  # half x on float32 arrays: PyTorch's rule, accepted


def test_layer_other_library_message_says_how_it_was_bound() -> None:
    torch = pytest.importorskip("torch")
    bn = anybn.BatchNorm(3)
    bn(np.random.default_rng(3).standard_normal((4, 3)))
    before = _layer_state(bn)
    with pytest.raises(TypeError) as info:
        bn(torch.zeros(4, 3, dtype=torch.float64))
    message = str(info.value)
    assert "holds numpy arrays (bound by its first input), got x of type torch.Tensor" in message
    assert "state_dict()" in message and "xp=None" not in message
    _assert_same_state(before, bn)
    with pytest.raises(TypeError, match=r"holds torch arrays \(its xp=\)"):
        anybn.BatchNorm(3, xp=torch)(np.zeros((4, 3), np.float32))
