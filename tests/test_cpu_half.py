"""float16 on the compiled CPU kernels (:mod:`anybn._kernels.numba_cpu` and
:mod:`anybn._kernels.half`).

The conversions are checked exhaustively (all 65536 half bit patterns) and against NumPy's
``astype`` on a large sample of float32 values with every tie; the kernels against the float64
reference on the float16 input: y and dx within one rounding to float16 (they are rounded once
from float32 arithmetic), the statistics at float32 accuracy (accumulated in float64).
Without Numba (or with ``ANYBN_NUMBA=0``) the module is skipped: float16 then runs the NumPy
kernels, as the dispatcher test in ``test_cpu_kernels.py`` checks.
"""

from __future__ import annotations

import numpy as np
import pytest
from _helpers import backward64

import anybn
from anybn._kernels import numba_cpu as cpu
from anybn._kernels import torch_cpu
from anybn._testing.reference import reference_forward

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="Numba not installed or ANYBN_NUMBA=0")

HALF_ULP = 2.0**-11  # half an ulp of float16, relative


def _loop(convert):
    """A compiled loop ``out[i] = convert(a[i])``."""
    import numba

    @numba.njit
    def run(a, out):
        for i in range(a.shape[0]):
            out[i] = convert(a[i])

    return run


if cpu.AVAILABLE:  # the kernels' conversions (the CPU's own here, if it has them) and the soft
    from anybn._kernels import half

    # Built at import and kept: a compiled function dropped at a fixture's end leaves a dead
    # weak proxy among gc's objects, which test_training_code's gc.get_objects() scan trips on.
    CONVERSIONS = {
        "kernels'": (_loop(half.half_to_float), _loop(half.float_to_half)),
        "soft": (_loop(half.soft_half_to_float), _loop(half.soft_float_to_half)),
    }


@pytest.mark.parametrize("which", ["kernels'", "soft"])
def test_half_to_float_is_exact_for_every_bit_pattern(which):
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = np.empty(bits.size, np.float32)
    CONVERSIONS[which][0](bits, out)
    expected = bits.view(np.float16).astype(np.float32)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out.view(np.uint32)[~nan], expected.view(np.uint32)[~nan])
    np.testing.assert_array_equal(np.signbit(out), np.signbit(expected))  # NaN's sign too


@pytest.mark.parametrize("which", ["kernels'", "soft"])
def test_float_to_half_rounds_to_nearest_even_like_numpy(which):
    rng = np.random.default_rng(0)
    sample = rng.integers(0, 1 << 32, 1 << 21, dtype=np.uint64).astype(np.uint32).view(np.float32)
    halves = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = halves[np.isfinite(halves)]
    # the midpoints between neighbouring halves (exact in float32), 65520 the overflow tie
    with np.errstate(over="ignore"):
        above = np.nextafter(finite, np.float16(np.inf)).astype(np.float64)
    ties64 = (finite.astype(np.float64) + above) / 2
    ties64 = np.concatenate([ties64[np.isfinite(ties64)], [65520.0, -65520.0]])
    ties = ties64.astype(np.float32)
    np.testing.assert_array_equal(ties.astype(np.float64), ties64)  # exact: really ties
    f = np.concatenate([
        sample,
        finite.astype(np.float32),
        ties,
        np.nextafter(ties, np.float32(np.inf)),
        np.nextafter(ties, np.float32(-np.inf)),
        np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1e-45, 2.0**-25, 2.0**-24,
                    3 * 2.0**-26, 65519.996, 1e38]),
    ])  # fmt: skip
    out = np.empty(f.size, np.uint16)
    CONVERSIONS[which][1](f, out)
    with np.errstate(over="ignore"):
        expected = f.astype(np.float16)
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out.view(np.float16)), nan)
    np.testing.assert_array_equal(out[~nan], expected.view(np.uint16)[~nan])
    np.testing.assert_array_equal(np.signbit(out.view(np.float16)), np.signbit(expected))


# --- the kernels against the float64 reference ------------------------------------------------

LAYOUTS = {
    "(N,C)": ((300, 24), 1),
    "(N,C,L)": ((6, 5, 70), 1),
    "(N,C,H,W)": ((4, 6, 5, 7), 1),
    "channels-last": ((4, 5, 7, 6), 3),
}
SIZES = {"small": 1, "threaded": 800}  # the batch multiplied: above PARALLEL_MIN


def _half_data(shape, axis, offset, param_dtype, seed=4):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) + offset).astype(np.float16)
    dy = rng.standard_normal(shape).astype(np.float16)
    c = shape[axis]
    w = rng.uniform(0.5, 1.5, c).astype(param_dtype)
    b = rng.standard_normal(c).astype(param_dtype)
    return x, dy, w, b


def _assert_rounded_once(actual, expected, scale):
    """``actual`` (float16) is ``expected`` rounded to float16, within float32 arithmetic."""
    assert actual.dtype == np.float16
    err = np.abs(actual.astype(np.float64) - expected)
    bound = HALF_ULP * np.abs(expected) * 1.01 + 1e-6 * scale + 2.0**-25
    assert (err <= bound).all(), np.max(err - bound)


@pytest.mark.parametrize("param_dtype", ["float16", "float32"])
@pytest.mark.parametrize("offset", [0.0, 1e3])
@pytest.mark.parametrize("size", list(SIZES))
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_half_kernels_match_float64_reference(layout, size, offset, param_dtype):
    shape, axis = LAYOUTS[layout]
    shape = (shape[0] * SIZES[size], *shape[1:])
    x, dy, w, b = _half_data(shape, axis, offset, param_dtype)
    assert (x.size >= cpu.PARALLEL_MIN) == (size == "threaded")
    c = shape[axis]
    rm, rv = np.full(c, 0.5, param_dtype), np.full(c, 2.0, param_dtype)
    y, mean, invstd, nrm, nrv = cpu.forward(
        x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis
    )
    ref = reference_forward(x, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5, axis=axis)
    assert y.strides == np.empty_like(x).strides  # layout kept
    assert mean.dtype == invstd.dtype == np.float32
    assert nrm.dtype == nrv.dtype == np.dtype(param_dtype)
    _assert_rounded_once(y, ref.y, np.max(np.abs(ref.y)))
    np.testing.assert_allclose(mean, ref.mean, rtol=1e-7)
    np.testing.assert_allclose(invstd, ref.invstd, rtol=1e-6)
    stat_tol = HALF_ULP * 1.01 if param_dtype == "float16" else 1e-6
    np.testing.assert_allclose(nrm, ref.running_mean, rtol=stat_tol)
    np.testing.assert_allclose(nrv, ref.running_var, rtol=stat_tol)

    dx, dw, db = cpu.backward(dy, x, w, mean, invstd, training=True, axis=axis)
    gdx, gdw, gdb = backward64(dy, x, w, mean, invstd, axis)
    _assert_rounded_once(dx, gdx, np.max(np.abs(gdx)))
    assert dw.dtype == db.dtype == np.float32
    size_tol = 1e-6 * np.sqrt(dy.size) * np.max(np.abs(dy.astype(np.float64)))
    np.testing.assert_allclose(dw, gdw, rtol=1e-6, atol=size_tol)
    np.testing.assert_allclose(db, gdb, rtol=1e-6, atol=size_tol)

    y_eval, *_ = cpu.forward(x, rm, rv, w, b, training=False, momentum=0.1, eps=1e-5, axis=axis)
    ref_eval = reference_forward(x, rm, rv, w, b, training=False, eps=1e-5, axis=axis)
    _assert_rounded_once(y_eval, ref_eval.y, np.max(np.abs(ref_eval.y)))
    dx_eval, _, _ = cpu.backward(dy, x, None, mean, invstd, training=False, axis=axis)
    bshape = [1] * x.ndim
    bshape[axis] = -1
    gdx_eval = dy.astype(np.float64) * invstd.astype(np.float64).reshape(bshape)
    _assert_rounded_once(dx_eval, gdx_eval, np.max(np.abs(gdx_eval)))


@pytest.mark.parametrize("shape, axis", [((300, 4), 1), ((5, 4, 9, 11), 1), ((5, 9, 11, 4), 3)])
def test_half_non_finite_values_stay_in_their_channel(shape, axis):
    x = np.random.default_rng(1).standard_normal(shape).astype(np.float16)
    xm = np.moveaxis(x, axis, -1)  # a view: channel last
    xm[..., 1].flat[5] = np.inf
    xm[..., 2].flat[7] = np.nan
    y, mean, invstd, _, _ = cpu.forward(
        x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=axis
    )
    dy = np.ones_like(x)
    dx, dw, db = cpu.backward(dy, x, None, mean, invstd, training=True, axis=axis)
    ym, dxm = np.moveaxis(y, axis, -1), np.moveaxis(dx, axis, -1)
    for ok in (0, 3):
        assert np.isfinite(ym[..., ok]).all() and np.isfinite(dxm[..., ok]).all()
        assert np.isfinite([mean[ok], invstd[ok], dw[ok], db[ok]]).all()
    assert not np.isfinite(mean[1]) and np.isnan(mean[2])
    assert np.isnan(ym[..., 2]).all()
    finite = np.moveaxis(x, axis, -1)[..., [0, 3]]
    ref = reference_forward(finite, training=True, axis=finite.ndim - 1)
    _assert_rounded_once(ym[..., [0, 3]], ref.y, np.max(np.abs(ref.y)))


def test_half_subnormal_inputs_and_outputs():
    rng = np.random.default_rng(2)
    # inputs: most of them subnormal halves (below 2**-14 = 6.1e-5)
    x = (rng.standard_normal((64, 3, 40)) * 2e-5).astype(np.float16)
    assert (np.abs(x[x != 0]) < 2.0**-14).mean() > 0.9
    w = np.float32([1e-3, 1.0, 2e-4])  # outputs subnormal in channels 0 and 2
    y, mean, invstd, _, _ = cpu.forward(
        x, None, None, w, None, training=True, momentum=0.1, eps=1e-5, axis=1
    )
    ref = reference_forward(x, None, None, w, None, training=True, eps=1e-5, axis=1)
    np.testing.assert_allclose(mean, ref.mean, rtol=1e-6)
    assert (np.abs(y[:, 0]) < 2.0**-14).mean() > 0.5
    # subnormal halves are spaced 2**-24: at most half a spacing off (and float32 noise)
    err = np.abs(y.astype(np.float64) - ref.y)
    assert (err <= np.maximum(HALF_ULP * np.abs(ref.y), 2.0**-25) * 1.01).all()
    # eval: y = x * invstd, subnormal in and out
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y_eval, *_ = cpu.forward(x, rm, rv, None, None, training=False, momentum=0.1, eps=1e-5, axis=1)
    expected = (x.astype(np.float64) / np.sqrt(1.0 + 1e-5)).astype(np.float32).astype(np.float16)
    np.testing.assert_array_equal(y_eval, expected)
    dx, _, _ = cpu.backward(x, x, None, mean, invstd, training=False, axis=1)
    scale = invstd.astype(np.float32)[None, :, None]
    np.testing.assert_array_equal(dx, (x.astype(np.float32) * scale).astype(np.float16))


def test_half_backward_reads_a_float32_dy_unrounded():
    x, _, w, _ = _half_data((40, 3, 30), 1, 0.0, "float32")
    dy = np.random.default_rng(3).standard_normal(x.shape).astype(np.float32)
    _, mean, invstd, _, _ = cpu.forward(
        x, None, None, w, None, training=True, momentum=0.1, eps=1e-5, axis=1
    )
    dx, _, db = cpu.backward(dy, x, w, mean, invstd, training=True, axis=1)
    gdx, _, gdb = backward64(dy, x, w, mean, invstd, 1)
    _assert_rounded_once(dx, gdx, np.max(np.abs(gdx)))
    np.testing.assert_allclose(db, gdb, rtol=1e-6, atol=1e-5)


# --- dispatch: NumPy arrays, torch tensors, the torch module ----------------------------------


@pytest.fixture
def kernel_calls(monkeypatch):
    """The compiled kernels' entry points, as they are called ("forward", "backward").

    Every call of the kernels goes through ``forward_laid`` / ``backward_laid`` (the
    public ``forward`` / ``backward`` lay x out first; the torch drop-ins' eager lane
    calls them directly)."""
    calls = []

    def spy(fn, name):
        def wrapper(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return wrapper

    for name in ("forward", "backward"):
        monkeypatch.setattr(cpu, f"{name}_laid", spy(getattr(cpu, f"{name}_laid"), name))
    return calls


def test_dispatcher_serves_float16_numpy_arrays_with_the_compiled_kernels(kernel_calls):
    x, dy, w, b = _half_data((64, 5, 30), 1, 1e3, "float16")
    assert torch_cpu._numpy_module(x) is cpu
    out = anybn.batch_norm(x, None, None, w, b, training=True)
    grads = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, training=True)
    assert kernel_calls == ["forward", "backward"]
    assert out.y.dtype == grads.dx.dtype == np.float16
    ref = reference_forward(x, None, None, w, b, training=True, axis=1)
    _assert_rounded_once(out.y, ref.y, np.max(np.abs(ref.y)))


@pytest.mark.parametrize("param_dtype", ["float16", "float32"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_half_torch_tensors_use_the_compiled_kernels(param_dtype, channels_last, kernel_calls):
    torch = pytest.importorskip("torch")
    x, dy, w, b = _half_data((8, 6, 9, 10), 1, 1e3, param_dtype)
    tx, tdy = torch.from_numpy(x), torch.from_numpy(dy)
    if channels_last:
        tx = tx.contiguous(memory_format=torch.channels_last)
        tdy = tdy.contiguous(memory_format=torch.channels_last)
    tw, tb = torch.from_numpy(w), torch.from_numpy(b)
    trm, trv = torch.zeros(6, dtype=tw.dtype), torch.ones(6, dtype=tw.dtype)
    out = anybn.batch_norm(tx, trm, trv, tw, tb, training=True)
    grads = anybn.batch_norm_backward(tdy, tx, tw, out.mean, out.invstd, training=True)
    assert kernel_calls == ["forward", "backward"]
    assert out.y.dtype == grads.dx.dtype == torch.float16
    assert out.new_running_mean.dtype == tw.dtype
    if channels_last:
        assert out.y.is_contiguous(memory_format=torch.channels_last)
    ref = reference_forward(x, np.zeros(6), np.ones(6), w, b, training=True, axis=1)
    _assert_rounded_once(out.y.numpy(), ref.y, np.max(np.abs(ref.y)))
    stat_tol = HALF_ULP * 1.01 if param_dtype == "float16" else 1e-6
    np.testing.assert_allclose(out.new_running_var.numpy(), ref.running_var, rtol=stat_tol)
    gdx, _, _ = backward64(dy, x, w, out.mean.numpy(), out.invstd.numpy(), 1)
    _assert_rounded_once(grads.dx.numpy(), gdx, np.max(np.abs(gdx)))


def test_half_torch_module_matches_float64(kernel_calls):
    torch = pytest.importorskip("torch")
    import anybn.torch as abt

    torch.manual_seed(0)
    x64 = torch.randn(16, 8, 12, 12, dtype=torch.float64) * 3 + 100
    x = x64.half()
    dy = torch.randn_like(x64).half()
    ours = abt.BatchNorm2d(8).half()
    theirs = torch.nn.BatchNorm2d(8).double()
    xi = x.clone().requires_grad_()
    y = ours(xi)
    y.backward(dy)
    assert kernel_calls == ["forward", "backward"]
    xr = x.double().requires_grad_()
    yr = theirs(xr)
    yr.backward(dy.double())
    assert y.dtype == xi.grad.dtype == torch.float16
    _assert_rounded_once(y.detach().numpy(), yr.detach().numpy(), float(yr.detach().abs().max()))
    gdx = xr.grad.numpy()
    _assert_rounded_once(xi.grad.numpy(), gdx, np.max(np.abs(gdx)))
    for a, r in ((ours.running_mean, theirs.running_mean), (ours.running_var, theirs.running_var)):
        assert a.dtype == torch.float16
        np.testing.assert_allclose(a.double().numpy(), r.numpy(), rtol=HALF_ULP * 1.01)


def test_numpy_kernels_store_float16_as_a_plain_cast_does() -> None:
    """The NumPy kernels' float16 store (subnormal results rounded in float32 first, where
    many are) gives the bits of ``astype(float16)``: every subnormal and zero result, ties,
    signs, values that round up to the smallest normal, NaN, infinities, normal values."""
    from anybn._kernels import numpy_blocks

    rng = np.random.default_rng(11)
    tiny = numpy_blocks.HALF_TINY
    step = 2.0**-24
    k = np.arange(0, 1025, dtype=np.float64)
    values = np.concatenate(
        [
            rng.uniform(-tiny, tiny, 40_000),
            (k + 0.5) * step,  # ties
            -(k + 0.5) * step,
            k * step,
            rng.uniform(-(2.0**-26), 2.0**-26, 2_000),  # round to +-0
            [0.0, -0.0, np.nan, np.inf, -np.inf, tiny, -tiny, 1.0, -3.5e4, 6.5e4],
            rng.standard_normal(500),
        ]
    ).astype(np.float32)
    for block in (values, rng.standard_normal(4096).astype(np.float32)):  # many / few
        u = block.copy()
        out = np.empty(block.shape, np.float16)
        numpy_blocks._store_half(u, out)
        want = block.astype(np.float16)
        np.testing.assert_array_equal(out.view(np.uint16), want.view(np.uint16))


def test_numpy_kernels_float16_backward_with_dy_ones(monkeypatch) -> None:
    """``dy = ones`` (its exact dx is zero, the computed one rounding noise, mostly float16
    subnormals) through the NumPy kernels: the bits of the float32 arithmetic cast once."""
    from anybn._kernels import numpy_blocks

    rng = np.random.default_rng(12)
    x = rng.standard_normal((8, 4, 48, 48)).astype(np.float16)
    dy = np.ones_like(x)
    mean = x.astype(np.float64).mean(axis=(0, 2, 3))
    invstd = 1 / np.sqrt(x.astype(np.float64).var(axis=(0, 2, 3)) + 1e-5)
    w = rng.uniform(0.5, 1.5, 4).astype(np.float32)
    got, _, _ = numpy_blocks.backward(
        dy, x, w, mean.astype(np.float32), invstd.astype(np.float32), training=True, axis=1
    )
    monkeypatch.setattr(numpy_blocks, "HALF_TINY", 0.0)  # never rounds first: the plain cast
    plain, _, _ = numpy_blocks.backward(
        dy, x, w, mean.astype(np.float32), invstd.astype(np.float32), training=True, axis=1
    )
    subnormal = (got != 0) & (np.abs(got) < np.finfo(np.float16).tiny)
    assert subnormal.mean() > 0.2  # the case the store is for
    np.testing.assert_array_equal(got.view(np.uint16), plain.view(np.uint16))
