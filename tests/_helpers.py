"""Shared test helpers: tolerances, comparisons, mutation checks, test data and oracles.

Every test compares anybn against two independent oracles computed in float64
on the very values anybn saw (inputs rounded to the test dtype first): the plain
NumPy reference in :mod:`anybn._testing.reference` and, where PyTorch is installed,
``torch.nn.functional.batch_norm`` with torch autograd.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields, replace
from typing import Any, NamedTuple

import array_api_compat as compat
import numpy as np
import pytest

import anybn
from anybn._testing.backends import Backend, get_backend
from anybn._testing.reference import reference_backward, reference_forward
from anybn._xp import dtype_name, to_host

Array = Any

#: Parametrize a test's ``training`` argument over both modes.
TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])

#: Non-default options used by the matrix, so that a dropped keyword shows up.
MOMENTUM = 0.3
EPS = 1e-3


# --- tolerances -------------------------------------------------------------------------


class Tol(NamedTuple):
    """``|actual - expected| <= atol * scale + rtol * |expected|``."""

    rtol: float
    atol: float


#: Per-dtype tolerances, keyed by the dtype of the array under test. ``atol`` is
#: relative to the natural scale of the quantity (by default ``max(1, max|expected|)``),
#: so one entry serves y, dx and the per-channel sums alike. float64 is held to
#: ~1e-10, float32 to 1e-5 (~100 ulps, room for other summation orders), float16
#: (11-bit significand, ulp 2**-10) and bfloat16 (8-bit, ulp 2**-7) to about two ulps:
#: half inputs accumulate in float32, so only the final rounding should show.
#: The matrix uses at most ~3% of the float32 budget and ~20% of the half ones.
TOLERANCES: dict[str, Tol] = {
    "float64": Tol(rtol=1e-10, atol=1e-10),
    "float32": Tol(rtol=1e-5, atol=1e-5),
    "float16": Tol(rtol=2e-3, atol=2e-3),
    "bfloat16": Tol(rtol=1e-2, atol=1e-2),
}


def compute_dtype_name(dtype: str) -> str:
    """The dtype anybn returns statistics in: float32 for half types, else ``dtype``."""
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def require(backend_id: str) -> Backend:
    """The backend ``backend_id``, or skip the test with the reason it cannot run here."""
    b = get_backend(backend_id)
    reason = b.unavailable_reason()
    if reason is not None:
        pytest.skip(f"{b.id}: {reason}")
    return b


def host(a: Array) -> np.ndarray:
    """A NumPy copy of an array of any backend (bfloat16 as float32, exactly): anybn's one
    host conversion, :func:`anybn._xp.to_host`, copied."""
    return np.array(to_host(a), copy=True)


def assert_close(
    actual: Array,
    expected: np.ndarray,
    *,
    scale: float | None = None,
    dtype: str | None = None,
    name: str = "",
) -> None:
    """Assert ``actual`` matches the float64 ``expected`` to the tolerance of its dtype.

    ``dtype`` names the dtype anybn returned where ``actual`` is a NumPy copy of it.
    """
    tol = TOLERANCES[dtype or dtype_name(actual.dtype)]
    got = host(actual).astype(np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if scale is None:
        scale = max(1.0, float(np.max(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(
        got, expected, rtol=tol.rtol, atol=tol.atol * scale, err_msg=f"{name} ({tol})"
    )


# --- purity -----------------------------------------------------------------------------


@contextlib.contextmanager
def unmutated(*arrays: Array | None) -> Iterator[None]:
    """Assert that no array (``None`` is skipped) changed a single byte inside the block."""
    before = [None if a is None else host(a) for a in arrays]
    yield
    for i, (a, b) in enumerate(zip(arrays, before, strict=True)):
        if a is not None:
            assert_identical(a, b, f"argument {i} was mutated")


def assert_identical(actual: Array, expected: Array, msg: str = "") -> None:
    """Same dtype (for two arrays of one library), shape and bytes, NaNs included."""
    if type(actual) is type(expected):
        assert actual.dtype == expected.dtype, msg
    got, want = host(actual), host(expected)
    assert got.shape == want.shape and got.tobytes() == want.tobytes(), msg


#: The backend of the running matrix test (set by the ``backend`` fixture): its
#: ``call`` runs anybn the way that backend runs code (``jax:jit`` under jax.jit).
CURRENT: list[Backend] = []


def _call(fn: Any, arrays: tuple[Array | None, ...], kwargs: dict[str, Any]) -> Any:
    if CURRENT:
        return CURRENT[-1].call(fn, *arrays, **kwargs)
    return fn(*arrays, **kwargs)


def batch_norm(*arrays: Array | None, **kwargs: Any) -> anybn.BatchNormOutput:
    """:func:`anybn.batch_norm`, asserting it mutated none of its arrays."""
    with unmutated(*arrays):
        return anybn.BatchNormOutput(*_call(anybn.batch_norm, arrays, kwargs))


def batch_norm_backward(*arrays: Array | None, **kwargs: Any) -> anybn.BatchNormGrads:
    """:func:`anybn.batch_norm_backward`, asserting it mutated none of its arrays."""
    with unmutated(*arrays):
        return anybn.BatchNormGrads(*_call(anybn.batch_norm_backward, arrays, kwargs))


# --- cases and data ---------------------------------------------------------------------

#: The layouts of the matrix: name -> (shape, channel axis).
LAYOUTS: dict[str, tuple[tuple[int, ...], int]] = {
    "NC": ((8, 3), 1),
    "NCL": ((4, 3, 5), 1),
    "NCHW": ((2, 3, 4, 5), 1),
    "NCDHW": ((2, 3, 2, 3, 4), 1),
    "NHWC": ((2, 4, 5, 3), -1),
}


@dataclass(frozen=True)
class Case:
    """One configuration: layout, mode, and which optional arguments are given.

    ``dims``, a ``(shape, axis)`` pair, replaces the layout's shape and axis.
    """

    layout: str = "NCHW"
    training: bool = True
    affine: bool = True
    stats: bool = True
    dims: tuple[tuple[int, ...], int] | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.dims or LAYOUTS[self.layout])[0]

    @property
    def axis(self) -> int:
        return (self.dims or LAYOUTS[self.layout])[1]

    def __str__(self) -> str:
        return "-".join(
            (
                self.layout if self.dims is None else f"{self.shape}@{self.axis}",
                "train" if self.training else "eval",
                "affine" if self.affine else "noaffine",
                "stats" if self.stats else "nostats",
            )
        )


#: Every layout x train/eval x with/without weight and bias x with/without running
#: stats (eval always has them).
CASES: list[Case] = [
    Case(layout, training, affine, stats)
    for layout in LAYOUTS
    for training in (True, False)
    for affine in (True, False)
    for stats in (True, False)
    if stats or training
]


@dataclass(frozen=True)
class Inputs:
    """The arrays of one call, on some backend (or as float64 NumPy)."""

    x: Array
    dy: Array
    weight: Array | None = None
    bias: Array | None = None
    running_mean: Array | None = None
    running_var: Array | None = None

    def map(self, fn: Any) -> Inputs:
        """Apply ``fn(name, array)`` to every array that is not None."""
        return replace(
            self,
            **{
                f.name: None if getattr(self, f.name) is None else fn(f.name, getattr(self, f.name))
                for f in fields(self)
            },
        )

    def to(self, backend: Backend, dtype: str, param_dtype: str | None = None) -> Inputs:
        """Move onto ``backend``: x and dy in ``dtype``, the vectors in ``param_dtype``."""
        return self.map(
            lambda name, a: backend.asarray(
                a, dtype if name in ("x", "dy") else (param_dtype or dtype)
            )
        )

    def host(self) -> Inputs:
        """The float64 NumPy values of these arrays (what anybn actually saw)."""
        return self.map(lambda _, a: host(a).astype(np.float64))

    @property
    def forward_args(self) -> tuple[Array | None, ...]:
        return (self.x, self.running_mean, self.running_var, self.weight, self.bias)


def channel_vector(values: np.ndarray, ndim: int, axis: int) -> np.ndarray:
    """Reshape a per-channel vector to broadcast along ``axis``."""
    shape = [1] * ndim
    shape[axis] = -1
    return values.reshape(shape)


def make_inputs(rng: np.random.Generator, case: Case) -> Inputs:
    """Float64 NumPy data for ``case``: every channel with its own mean and spread."""
    shape, axis = case.shape, case.axis
    c = shape[axis]
    loc = channel_vector(rng.uniform(-2.0, 2.0, c), len(shape), axis)
    spread = channel_vector(rng.uniform(0.5, 2.0, c), len(shape), axis)
    return Inputs(
        x=rng.standard_normal(shape) * spread + loc,
        dy=rng.standard_normal(shape),
        weight=rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c) if case.affine else None,
        bias=rng.standard_normal(c) if case.affine else None,
        running_mean=rng.standard_normal(c) if case.stats else None,
        running_var=rng.uniform(0.5, 2.0, c) if case.stats else None,
    )


def forward(
    a: Inputs, case: Case, *, momentum: float = MOMENTUM, eps: float = EPS, **kwargs: Any
) -> anybn.BatchNormOutput:
    """anybn's forward for ``case`` on the arrays ``a``, checked for purity."""
    return batch_norm(
        *a.forward_args,
        training=case.training,
        momentum=momentum,
        eps=eps,
        axis=case.axis,
        **kwargs,
    )


def backward(
    a: Inputs, case: Case, out: anybn.BatchNormOutput, **kwargs: Any
) -> anybn.BatchNormGrads:
    """anybn's backward for ``case`` after the forward ``out``, checked for purity."""
    return batch_norm_backward(
        a.dy, a.x, a.weight, out.mean, out.invstd, training=case.training, axis=case.axis, **kwargs
    )


# --- oracles ----------------------------------------------------------------------------


class Oracle(NamedTuple):
    """Expected float64 results of one case; fields an oracle cannot give are None."""

    name: str
    y: np.ndarray
    mean: np.ndarray | None
    invstd: np.ndarray | None
    running_mean: np.ndarray | None
    running_var: np.ndarray | None
    dx: np.ndarray
    dweight: np.ndarray
    dbias: np.ndarray


def reference_oracle(
    h: Inputs, case: Case, *, momentum: float = MOMENTUM, eps: float = EPS
) -> Oracle:
    """The float64 NumPy reference of :mod:`anybn._testing.reference`."""
    fwd = reference_forward(
        *h.forward_args, training=case.training, momentum=momentum, eps=eps, axis=case.axis
    )
    bwd = reference_backward(
        h.dy,
        h.x,
        h.weight,
        training=case.training,
        running_mean=h.running_mean,
        running_var=h.running_var,
        eps=eps,
        axis=case.axis,
    )
    return Oracle("reference", fwd.y, fwd.mean, fwd.invstd, *fwd[3:], *bwd)


def torch_oracle(h: Inputs, case: Case, *, momentum: float = MOMENTUM, eps: float = EPS) -> Oracle:
    """``torch.nn.functional.batch_norm`` and autograd in float64 on the CPU."""
    import torch

    def t(a: np.ndarray | None, grad: bool = False) -> Any:
        """A float64 tensor, with x-shaped arrays' channels moved to axis 1."""
        if a is None:
            return None
        if a.ndim > 1:
            a = np.moveaxis(a, case.axis, 1)
        return torch.tensor(a, requires_grad=grad)

    c = h.x.shape[case.axis]
    x = t(h.x, grad=True)
    weight = t(np.ones(c) if h.weight is None else h.weight, grad=True)
    bias = t(np.zeros(c) if h.bias is None else h.bias, grad=True)
    rm, rv = t(h.running_mean), t(h.running_var)  # fresh copies: torch updates them in place
    y = torch.nn.functional.batch_norm(
        x, rm, rv, weight, bias, training=case.training, momentum=momentum, eps=eps
    )
    y.backward(t(h.dy))

    def back(a: Any) -> np.ndarray | None:
        """The NumPy array of a tensor, with x-shaped arrays' channels moved back."""
        if a is None:
            return None
        out = a.detach().numpy()
        return np.moveaxis(out, 1, case.axis) if out.ndim > 1 else out

    return Oracle(
        "torch",
        back(y),
        None,
        None,
        back(rm),
        back(rv),
        back(x.grad),
        back(weight.grad),
        back(bias.grad),
    )


def torch_available() -> bool:
    """Whether PyTorch can be imported here."""
    return get_backend("torch").unavailable_reason() is None


def oracles(h: Inputs, case: Case, **options: float) -> list[Oracle]:
    """The reference and, where PyTorch is installed, the torch oracle."""
    found = [reference_oracle(h, case, **options)]
    if torch_available():
        found.append(torch_oracle(h, case, **options))
    return found


# --- checks -----------------------------------------------------------------------------


def assert_like(actual: Array, x: Array, dtype: str, name: str) -> None:
    """``actual`` is in x's namespace, on x's device, with dtype ``dtype``."""
    assert compat.array_namespace(actual) is compat.array_namespace(x), name
    assert compat.device(actual) == compat.device(x), f"{name} left x's device"
    assert dtype_name(actual.dtype) == dtype, f"{name} has dtype {actual.dtype}, not {dtype}"


def check_forward(
    out: anybn.BatchNormOutput, a: Inputs, case: Case, dtype: str, **options: float
) -> None:
    """Dtypes, devices and values of a forward result against every oracle.

    ``options`` (momentum, eps) go to the oracles; the matrix's are the default.
    """
    stats_dtype = compute_dtype_name(dtype)
    assert_like(out.y, a.x, dtype, "y")
    assert_like(out.mean, a.x, stats_dtype, "mean")
    assert_like(out.invstd, a.x, stats_dtype, "invstd")
    assert tuple(out.y.shape) == tuple(a.x.shape)
    for name in ("running_mean", "running_var"):
        given, new = getattr(a, name), getattr(out, "new_" + name)
        if given is None:
            assert new is None, f"new_{name} should be None without {name}"
        else:
            assert_like(new, a.x, dtype_name(given.dtype), "new_" + name)
    for oracle in oracles(a.host(), case, **options):
        for name in ("y", "mean", "invstd", "running_mean", "running_var"):
            expected = getattr(oracle, name)
            if expected is not None:
                got = getattr(out, name if hasattr(out, name) else "new_" + name)
                assert_close(got, expected, name=f"{name} vs {oracle.name}")


def check_backward(
    grads: anybn.BatchNormGrads, a: Inputs, case: Case, dtype: str, **options: float
) -> None:
    """Dtypes, devices and values of a backward result against every oracle.

    dx is compared on its natural scale ``max|weight| * max(invstd) * max|dy|``:
    in training it is a difference of terms of that size.
    """
    h = a.host()
    assert_like(grads.dx, a.x, dtype, "dx")
    assert_like(grads.dweight, a.x, compute_dtype_name(dtype), "dweight")
    assert_like(grads.dbias, a.x, compute_dtype_name(dtype), "dbias")
    found = oracles(h, case, **options)
    weight = 1.0 if h.weight is None else float(np.max(np.abs(h.weight)))
    dy = float(np.max(np.abs(h.dy), initial=0.0))
    dx_scale = weight * float(np.max(found[0].invstd)) * dy or 1.0
    for oracle in found:
        assert_close(grads.dx, oracle.dx, scale=dx_scale, name=f"dx vs {oracle.name}")
        assert_close(grads.dweight, oracle.dweight, name=f"dweight vs {oracle.name}")
        assert_close(grads.dbias, oracle.dbias, name=f"dbias vs {oracle.name}")


def check_case(a: Inputs, case: Case, dtype: str, **options: float) -> None:
    """Forward, then backward, on ``a``, each checked against the oracles."""
    out = forward(a, case, **options)
    check_forward(out, a, case, dtype, **options)
    check_backward(backward(a, case, out), a, case, dtype, **options)


def backward64(dy, x, w, mean, invstd, axis):
    """The training backward in float64 with the given statistics (textbook formula)."""
    shape = [1] * x.ndim
    shape[axis] = -1
    axes = tuple(i for i in range(x.ndim) if i != axis)
    x, dy = x.astype(np.float64), dy.astype(np.float64)
    m, s = mean.astype(np.float64).reshape(shape), invstd.astype(np.float64).reshape(shape)
    xhat = (x - m) * s
    sdy, sdyx = dy.sum(axis=axes), (dy * xhat).sum(axis=axes)
    n = x.size // x.shape[axis]
    dx = (
        w.astype(np.float64).reshape(shape)
        * s
        * (dy - sdy.reshape(shape) / n - xhat * sdyx.reshape(shape) / n)
    )
    return dx, sdyx, sdy
