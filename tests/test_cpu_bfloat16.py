"""bfloat16 torch CPU tensors on the compiled CPU kernels (:mod:`anybn._kernels.half`,
:mod:`anybn._kernels.torch_cpu`, the drop-ins' eager lane).

The conversions against torch's own: every bfloat16 bit pattern widened exactly, and float32
values (a large sample, every tie between neighbouring bfloat16 values, the overflow edge,
NaN and inf) rounded to nearest even as ``tensor.to(torch.bfloat16)`` rounds them. The kernels
against the generic path (the array-API core, fast paths off) on the same tensors: y and dx
bit for bit or within one bfloat16 rounding, the statistics at float32 accuracy; and the
modules against ``nn.BatchNorm`` in bfloat16. Skipped without Numba or torch.
"""

from __future__ import annotations

import numpy as np
import pytest

import anybn
from anybn._kernels import fast_paths
from anybn._kernels import numba_cpu as cpu

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="Numba not installed or ANYBN_NUMBA=0")


def _loop(convert):
    import numba

    @numba.njit
    def run(a, out):
        for i in range(a.shape[0]):
            out[i] = convert(a[i])

    return run


if cpu.AVAILABLE:
    from anybn._kernels import half

    # Kept at module level (see test_cpu_half.py: a dropped compiled function trips gc scans).
    TO_FLOAT, TO_BFLOAT16 = _loop(half.bfloat16_to_float), _loop(half.float_to_bfloat16)


def test_bfloat16_to_float_is_exact_for_every_bit_pattern():
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.int16)
    out = np.empty(bits.size, np.float32)
    TO_FLOAT(bits, out)
    expected = torch.from_numpy(bits.copy()).view(torch.bfloat16).float().numpy()
    nan = np.isnan(expected)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out.view(np.uint32), expected.view(np.uint32))  # NaN bits too


def test_float_to_bfloat16_rounds_to_nearest_even_like_torch():
    rng = np.random.default_rng(0)
    sample = rng.integers(0, 1 << 32, 1 << 21, dtype=np.uint64).astype(np.uint32)
    # every bfloat16 value, and the float32 ties halfway to the next (low 16 bits 0x8000)
    # with their neighbours: bit patterns, so that the ties are exact
    upper = np.arange(1 << 16, dtype=np.uint32) << 16
    patterns = np.concatenate([sample, upper, upper | 0x8000, upper | 0x7FFF, upper | 0x8001])
    f = np.concatenate([
        patterns.view(np.float32),
        np.float32([0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 3.4028235e38, -3.4028235e38]),
    ])  # fmt: skip
    out = np.empty(f.size, np.int16)
    TO_BFLOAT16(f, out)
    expected = torch.from_numpy(f).to(torch.bfloat16).view(torch.int16).numpy()
    nan = np.isnan(f)
    np.testing.assert_array_equal(out[~nan], expected[~nan])
    got_nan = out[nan].view(np.uint16)
    assert ((got_nan & 0x7F80) == 0x7F80).all() and ((got_nan & 0x40) != 0).all()  # quiet NaN
    np.testing.assert_array_equal(got_nan >> 15, f[nan].view(np.uint32) >> 31)  # sign kept


LAYOUTS = {
    "(N,C)": ((256, 24), False),
    "(N,C,H,W)": ((8, 6, 9, 7), False),
    "channels-last": ((8, 6, 9, 7), True),
}


def _tensors(shape, channels_last, offset, param_dtype, seed=2):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 2 + offset).to(torch.bfloat16)
    dy = torch.randn(shape, generator=g).to(torch.bfloat16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        dy = dy.contiguous(memory_format=torch.channels_last)
    c = shape[1]
    w = (torch.rand(c, generator=g) + 0.5).to(param_dtype)
    b = torch.randn(c, generator=g).to(param_dtype)
    rm, rv = torch.full((c,), 0.5).to(param_dtype), torch.full((c,), 2.0).to(param_dtype)
    return x, dy, w, b, rm, rv


def _call(x, dy, w, b, rm, rv, training):
    out = anybn.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training)
    grads = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, training=training)
    return (*out, *grads)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("param_dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bfloat16_tensors_on_the_kernels_match_the_generic_path(
    layout, offset, param_dtype, training
):
    shape, cl = LAYOUTS[layout]
    args = _tensors(shape, cl, offset, getattr(torch, param_dtype))
    got = _call(*args, training)
    with fast_paths(False):
        expected = _call(*args, training)
    names = ("y", "mean", "invstd", "running_mean", "running_var", "dx", "dweight", "dbias")
    for name, a, e in zip(names, got, expected, strict=True):
        assert a.dtype == e.dtype, name
        if name in ("y", "dx"):
            assert a.stride() == e.stride(), name  # the layout of x
            # each rounded once from float32 arithmetic: at most one bfloat16 ulp apart
            diff = (a.double() - e.double()).abs()
            assert (diff <= e.double().abs() * 2.0**-7 + 1e-30).all(), name
        else:
            torch.testing.assert_close(a, e, rtol=2e-6 if a.dtype == torch.float32 else 1e-2,
                                       atol=1e-6, msg=name)  # fmt: skip


def test_bfloat16_reaches_the_kernels(monkeypatch):
    """Not the generic path's: the call goes through the compiled forward and backward."""
    seen = []
    for name in ("forward", "backward"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _real=real, _n=name, **k: (
            seen.append((_n, a[0].dtype)), _real(*a, **k))[1])  # fmt: skip
    x, dy, w, b, rm, rv = _tensors((64, 8), False, 0.0, torch.float32)
    _call(x, dy, w, b, rm, rv, True)
    assert seen == [("forward", np.int16), ("backward", np.int16)]


@pytest.mark.parametrize("offset", [0.0, 100.0])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bfloat16_modules_on_the_kernels_match_their_generic_path_and_nn(layout, offset):
    """The drop-in modules in bfloat16 (parameters and buffers too): the eager lane against
    the same module with the fast paths off, and against nn's module (without an offset:
    nn's bfloat16 kernel cancels on offset data), two steps each."""
    import anybn.torch as abt

    shape, cl = LAYOUTS[layout]
    x, dy, *_ = _tensors(shape, cl, offset, torch.float32)
    cls, nn_cls = ((abt.BatchNorm1d, torch.nn.BatchNorm1d) if len(shape) == 2
                   else (abt.BatchNorm2d, torch.nn.BatchNorm2d))  # fmt: skip
    c = shape[1]

    def steps(m: torch.nn.Module) -> list[torch.Tensor]:
        out = []
        for _ in range(2):
            xi = x.detach().requires_grad_()
            y = m(xi)
            y.backward(dy)
            out += [y, xi.grad, m.weight.grad.clone(), m.running_mean.clone(),
                    m.running_var.clone()]  # fmt: skip
        return out

    lane = steps(cls(c).to(torch.bfloat16))
    with fast_paths(False):
        generic = steps(cls(c).to(torch.bfloat16))
    native = steps(nn_cls(c).to(torch.bfloat16))
    for a, e, n in zip(lane, generic, native, strict=True):
        assert a.dtype == e.dtype == n.dtype == torch.bfloat16
        assert a.stride() == e.stride()
        torch.testing.assert_close(a, e, rtol=2**-7, atol=2**-7)  # one bfloat16 rounding
        if offset == 0.0:
            torch.testing.assert_close(a, n, rtol=2**-6, atol=2**-5)  # nn's own roundings too
