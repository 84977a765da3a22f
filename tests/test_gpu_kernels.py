"""The CUDA kernels (anybn._kernels.numba_cuda), executed: in numba-cuda's simulator or on a GPU.

``ANYBN_CUDA_SIMULATOR=1 python -m pytest tests/test_gpu_kernels.py`` runs the very
kernel source on the CPU (the simulator takes NumPy arrays, so shapes stay small and
the launch geometry is shrunk to make every code path run: several chunks per
channel, more work items than blocks, partial channel tiles). Without the variable,
on a machine with a CUDA GPU the same tests run on the device (CuPy arrays, or
torch CUDA tensors without CuPy); with neither they are skipped with the reason.

Every case is compared with a float64 oracle computed on the values the kernels
saw: :mod:`anybn._testing.reference` for the forward, the textbook backward in float64
with the ``mean``/``invstd`` the kernels were given. The compile check builds every
kernel to PTX for sm_80 and sm_90 with NVVM (and assembles it with ptxas when
present: no spills), which needs no GPU.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest

if os.environ.get("ANYBN_CUDA_SIMULATOR", "").strip() not in ("", "0"):
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"  # before numba.cuda is first imported

pytest.importorskip("numba.cuda", reason="numba-cuda is not installed (pip install numba-cuda)")

from numba import cuda

from anybn._kernels import numba_cuda as kernels
from anybn._testing.reference import reference_forward

SIMULATOR = kernels.simulated()
ROOT = Path(__file__).resolve().parents[1]


def _device_reason() -> str | None:
    if SIMULATOR:
        return None
    if os.environ.get("ANYBN_CUDA_SIMULATOR", "").strip() not in ("", "0"):
        return "ANYBN_CUDA_SIMULATOR is set but numba.cuda was imported without the simulator"
    try:
        if not cuda.is_available():
            return "no CUDA GPU (set ANYBN_CUDA_SIMULATOR=1 to run the kernels in the simulator)"
    except Exception as exc:  # pragma: no cover - driver trouble
        return f"numba cannot reach a CUDA GPU ({type(exc).__name__}: {exc})"
    return None


REASON = _device_reason()
needs_device = pytest.mark.skipif(REASON is not None, reason=str(REASON))

#: Small blocks and grids: in the simulator every thread is a Python thread. With these a
#: channel of 300 values is cut into several chunks and the grids loop over work items.
SMALL = kernels.Launch(threads=32, max_blocks=6, target_blocks=8, min_per_thread=2)
LAUNCHES = [SMALL] if SIMULATOR else [SMALL, kernels.DEFAULT_LAUNCH]

OFFSETS = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5]

#: (shape, axis) covering both layouts and the awkward cases of issue 11.
SHAPES = {
    "planes-S33": ((3, 4, 33), 1),
    "rows-S1": ((40, 3), 1),
    "C1": ((6, 1, 17), 1),
    "C33": ((3, 33, 4), 1),
    "N-below-chunks": ((1, 2, 300), 1),
    "channels-last-C3": ((2, 4, 5, 3), -1),
    "rows-C-above-threads": ((5, 70), 1),
    "middle-axis": ((3, 4, 5, 6), 2),
}


# --- arrays on the device ------------------------------------------------------------------


def _to_device(a: np.ndarray | None) -> Any:
    """NumPy in the simulator; CuPy (or torch CUDA) on a GPU, same strides."""
    if a is None or SIMULATOR:
        return a
    try:
        import cupy
    except ImportError:
        import torch

        return torch.from_numpy(np.ascontiguousarray(a)).cuda()
    if a.ndim == 1 and not a.flags.c_contiguous:  # keep the stride on the device too
        step = a.strides[0] // a.itemsize
        view = cupy.zeros(abs(step) * a.size, a.dtype)[:: abs(step)]
        view = view if step > 0 else view[::-1]
        view[...] = cupy.asarray(np.ascontiguousarray(a))
        return view
    return cupy.asarray(a)


def _host(a: Any) -> np.ndarray | None:
    if a is None:
        return None
    if isinstance(a, np.ndarray):
        return a
    if type(a).__module__.startswith("torch"):
        return a.cpu().numpy()
    return a.get()


def _data(
    rng: np.random.Generator, shape: tuple[int, ...], axis: int, offset: float, dtype: str
) -> dict[str, np.ndarray]:
    c = shape[axis]
    vec = "float32" if dtype == "float16" else dtype
    return {
        "x": (rng.standard_normal(shape) + offset).astype(dtype),
        "dy": rng.standard_normal(shape).astype(dtype),
        "weight": rng.uniform(0.5, 1.5, c).astype(vec),
        "bias": rng.standard_normal(c).astype(vec),
        "running_mean": (rng.standard_normal(c) + offset).astype(vec),
        "running_var": rng.uniform(0.5, 2.0, c).astype(vec),
    }


def _forward(d: dict[str, Any], *, training: bool, axis: int, launch: kernels.Launch) -> list:
    dev = {k: _to_device(v) for k, v in d.items()}
    out = kernels.forward(
        dev["x"], dev["running_mean"], dev["running_var"], dev["weight"], dev["bias"],
        training=training, momentum=0.3, eps=1e-5, axis=axis % d["x"].ndim, launch=launch,
    )  # fmt: skip
    if not SIMULATOR:
        cuda.synchronize()
    return [_host(o) for o in out]


def _backward(
    d: dict[str, Any], mean: np.ndarray, invstd: np.ndarray, *, training: bool, axis: int,
    launch: kernels.Launch,
) -> list:  # fmt: skip
    out = kernels.backward(
        _to_device(d["dy"]), _to_device(d["x"]), _to_device(d["weight"]), _to_device(mean),
        _to_device(invstd), training=training, axis=axis % d["x"].ndim, launch=launch,
    )  # fmt: skip
    return [_host(o) for o in out]


def _backward64(
    dy: np.ndarray, x: np.ndarray, weight: np.ndarray | None, mean: np.ndarray,
    invstd: np.ndarray, *, training: bool, axis: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """The textbook backward in float64, with the mean and invstd the kernels were given."""
    cols = np.moveaxis(x.astype(np.float64), axis, -1)
    g = np.moveaxis(dy.astype(np.float64), axis, -1)
    c = cols.shape[-1]
    n = cols.size // c
    w = np.ones(c) if weight is None else weight.astype(np.float64)
    inv = invstd.astype(np.float64)
    xhat = (cols - mean.astype(np.float64)) * inv
    dbias = g.reshape(-1, c).sum(0)
    dweight = (g * xhat).reshape(-1, c).sum(0)
    if training:
        dx = w * inv * (g - dbias / n - xhat * dweight / n)
    else:
        dx = w * inv * g
    return np.moveaxis(dx, -1, axis), dweight, dbias


#: (y/dx abs, statistics rel) per dtype; float32 y holds the issue's 1e-6 at every offset.
TOL = {"float64": (1e-12, 1e-12), "float32": (1e-6, 1e-6), "float16": (2e-3, 2e-3)}


def _close(got: np.ndarray, expected: np.ndarray, tol: float, name: str) -> None:
    scale = max(1.0, float(np.nanmax(np.abs(expected), initial=0.0)))
    np.testing.assert_allclose(
        np.asarray(got, np.float64), expected, rtol=tol, atol=tol * scale, err_msg=name
    )


def _check_forward(
    d: dict, out: list, *, training: bool, axis: int, dtype: str, offset: float = 1.0
) -> None:
    y, mean, invstd, nrm, nrv = out
    ref = reference_forward(
        d["x"], d["running_mean"], d["running_var"], d["weight"], d["bias"],
        training=training, momentum=0.3, eps=1e-5, axis=axis,
    )  # fmt: skip
    atol, rtol = TOL[dtype]
    if dtype == "float64":  # the float64 reference's own mean is off by ~eps * offset
        atol += 64 * float(np.finfo(np.float64).eps) * offset
    assert y.dtype == d["x"].dtype and y.shape == d["x"].shape
    np.testing.assert_allclose(y.astype(np.float64), ref.y, rtol=0, atol=atol, err_msg="y")
    # the statistics come back rounded to float32 (or float64): hold them to that rounding
    stat = max(rtol, float(np.finfo(mean.dtype).eps))
    _close(mean, ref.mean, stat, "mean")
    _close(invstd, ref.invstd, stat, "invstd")
    _close(nrm, ref.running_mean, stat, "running_mean")
    _close(nrv, ref.running_var, stat, "running_var")


def _check_backward(
    d: dict, out: list, mean: np.ndarray, invstd: np.ndarray, *, training: bool, axis: int,
    dtype: str,
) -> None:  # fmt: skip
    dx, dw, db = out
    edx, edw, edb = _backward64(
        d["dy"], d["x"], d["weight"], mean, invstd, training=training, axis=axis
    )
    atol, rtol = TOL[dtype]
    assert dx.dtype == d["x"].dtype and dx.shape == d["x"].shape
    _close(dx, edx, 2 * atol, "dx")
    _close(dw, edw, 2 * rtol, "dweight")
    _close(db, edb, 2 * rtol, "dbias")


# --- accuracy on offset data -----------------------------------------------------------------


@needs_device
@pytest.mark.parametrize("offset", OFFSETS, ids=[f"offset{o:g}" for o in OFFSETS])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("layout", ["planes-S33", "rows-S1", "channels-last-C3"])
def test_forward_backward_offset_accuracy(offset: float, dtype: str, layout: str) -> None:
    """Training forward and backward at offsets 1e0..1e5: float32 y within 1e-6 abs."""
    shape, axis = SHAPES[layout]
    d = _data(np.random.default_rng(20261126), shape, axis, offset, dtype)
    for launch in LAUNCHES:
        out = _forward(d, training=True, axis=axis, launch=launch)
        _check_forward(d, out, training=True, axis=axis, dtype=dtype, offset=offset)
        grads = _backward(d, out[1], out[2], training=True, axis=axis, launch=launch)
        _check_backward(d, grads, out[1], out[2], training=True, axis=axis, dtype=dtype)


@needs_device
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(SHAPES))
def test_shapes(name: str, training: bool) -> None:
    """Every awkward shape, train and eval, forward and backward, float32 offset 1e3."""
    shape, axis = SHAPES[name]
    d = _data(np.random.default_rng(7), shape, axis, 1e3, "float32")
    for launch in LAUNCHES:
        out = _forward(d, training=training, axis=axis, launch=launch)
        _check_forward(d, out, training=training, axis=axis, dtype="float32", offset=1e3)
        grads = _backward(d, out[1], out[2], training=training, axis=axis, launch=launch)
        _check_backward(d, grads, out[1], out[2], training=training, axis=axis, dtype="float32")


@needs_device
@pytest.mark.parametrize("threads", [64, 128])
def test_block_sizes(threads: int) -> None:
    """Other block sizes: the tree reductions over 64 and 128 threads, rows spans of 21/42."""
    for shape, axis in (SHAPES["planes-S33"], SHAPES["channels-last-C3"]):
        d = _data(np.random.default_rng(threads), shape, axis, 10.0, "float64")
        launch = kernels.Launch(threads=threads, max_blocks=4, target_blocks=4, min_per_thread=1)
        out = _forward(d, training=True, axis=axis, launch=launch)
        _check_forward(d, out, training=True, axis=axis, dtype="float64")
        grads = _backward(d, out[1], out[2], training=True, axis=axis, launch=launch)
        _check_backward(d, grads, out[1], out[2], training=True, axis=axis, dtype="float64")


@needs_device
def test_float16_accumulates_in_float32_or_better() -> None:
    """float16 x (float32 vectors): statistics in float32, y and dx to two float16 ulps."""
    shape, axis = SHAPES["planes-S33"]
    d = _data(np.random.default_rng(3), shape, axis, 50.0, "float16")
    out = _forward(d, training=True, axis=axis, launch=SMALL)
    assert out[1].dtype == np.float32 and out[2].dtype == np.float32
    _check_forward(d, out, training=True, axis=axis, dtype="float16")
    grads = _backward(d, out[1], out[2], training=True, axis=axis, launch=SMALL)
    assert grads[1].dtype == np.float32
    _check_backward(d, grads, out[1], out[2], training=True, axis=axis, dtype="float16")


@needs_device
@pytest.mark.parametrize("layout", ["planes-S33", "channels-last-C3"])
def test_against_torch_autograd(layout: str) -> None:
    """float64: y, the running statistics and autograd's gradients of torch's batch_norm."""
    torch = pytest.importorskip("torch")
    shape, axis = SHAPES[layout]
    d = _data(np.random.default_rng(29), shape, axis, 3.0, "float64")
    out = _forward(d, training=True, axis=axis, launch=SMALL)
    grads = _backward(d, out[1], out[2], training=True, axis=axis, launch=SMALL)
    x = torch.from_numpy(np.moveaxis(d["x"], axis, 1).copy()).requires_grad_()
    w = torch.from_numpy(d["weight"].copy()).requires_grad_()
    b = torch.from_numpy(d["bias"].copy()).requires_grad_()
    rm, rv = torch.from_numpy(d["running_mean"].copy()), torch.from_numpy(d["running_var"].copy())
    y = torch.nn.functional.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, eps=1e-5)
    y.backward(torch.from_numpy(np.moveaxis(d["dy"], axis, 1).copy()))
    np.testing.assert_allclose(np.moveaxis(out[0], axis, 1), y.detach().numpy(), atol=1e-12)
    np.testing.assert_allclose(out[3], rm.numpy(), rtol=1e-12)
    np.testing.assert_allclose(out[4], rv.numpy(), rtol=1e-12)
    np.testing.assert_allclose(np.moveaxis(grads[0], axis, 1), x.grad.numpy(), atol=1e-12)
    np.testing.assert_allclose(grads[1], w.grad.numpy(), rtol=1e-11, atol=1e-11)
    np.testing.assert_allclose(grads[2], b.grad.numpy(), rtol=1e-11, atol=1e-11)


# --- strided inputs, NaN ---------------------------------------------------------------------


def _strided(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "step2":
        big = np.zeros(2 * a.size, a.dtype)
        big[::2] = a
        return big[::2]
    return np.ascontiguousarray(a[::-1])[::-1]  # same values, negative stride


@needs_device
@pytest.mark.parametrize("kind", ["step2", "negative"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_strided_channel_vectors(kind: str, training: bool) -> None:
    """weight/bias/running stats/mean/invstd with strides 2 and -1 give the same results."""
    shape, axis = SHAPES["planes-S33"]
    d = _data(np.random.default_rng(5), shape, axis, 1e2, "float32")
    s = {k: (_strided(v, kind) if v.ndim == 1 else v) for k, v in d.items()}
    assert s["weight"].strides[0] in (8, -4)
    out = _forward(s, training=training, axis=axis, launch=SMALL)
    _check_forward(d, out, training=training, axis=axis, dtype="float32")
    grads = _backward(
        s, _strided(out[1], kind), _strided(out[2], kind), training=training, axis=axis,
        launch=SMALL,
    )  # fmt: skip
    _check_backward(d, grads, out[1], out[2], training=training, axis=axis, dtype="float32")


@needs_device
def test_non_contiguous_x_and_dy_in_another_layout() -> None:
    """x that is neither C-order nor channels-last is copied; dy in another layout is too."""
    rng = np.random.default_rng(9)
    base = (rng.standard_normal((5, 3, 4, 2)) + 20).astype(np.float32)
    x = base.transpose(0, 2, 1, 3)  # (5, 4, 3, 2), channel axis 2: neither layout
    d = _data(rng, x.shape, 2, 0.0, "float32")
    d["x"] = x
    d["dy"] = np.asfortranarray(d["dy"])
    out = _forward(d, training=True, axis=2, launch=SMALL)
    _check_forward(d, out, training=True, axis=2, dtype="float32")
    grads = _backward(d, out[1], out[2], training=True, axis=2, launch=SMALL)
    _check_backward(d, grads, out[1], out[2], training=True, axis=2, dtype="float32")


@needs_device
@pytest.mark.parametrize("layout", ["planes-S33", "channels-last-C3"])
def test_nan_stays_in_its_channel(layout: str) -> None:
    """A NaN in channel 1 makes that channel's outputs NaN and leaves the others exact."""
    shape, axis = SHAPES[layout]
    d = _data(np.random.default_rng(13), shape, axis, 1e2, "float32")
    x = np.moveaxis(d["x"], axis, -1)  # a view: writes go to d["x"]
    channel = x[..., 1]  # a view too
    channel[np.unravel_index(min(5, channel.size - 1), channel.shape)] = np.nan
    out = _forward(d, training=True, axis=axis, launch=SMALL)
    y, mean, invstd = (np.moveaxis(out[0], axis, -1), out[1], out[2])
    assert np.isnan(y[..., 1]).all() and np.isnan(mean[1]) and np.isnan(invstd[1])
    others = [c for c in range(shape[axis]) if c != 1]
    assert np.isfinite(y[..., others]).all() and np.isfinite(mean[others]).all()
    keep = {k: (np.take(v, others, axis=axis if v.ndim > 1 else 0)) for k, v in d.items()}
    ref_out = [np.take(out[0], others, axis=axis), *(o[others] for o in out[1:])]
    _check_forward(keep, ref_out, training=True, axis=axis, dtype="float32")
    dx, dw, _ = _backward(d, out[1], out[2], training=True, axis=axis, launch=SMALL)
    dxm = np.moveaxis(dx, axis, -1)
    assert np.isnan(dxm[..., 1]).all() and np.isnan(dw[1])
    assert np.isfinite(dxm[..., others]).all() and np.isfinite(dw[others]).all()


@needs_device
def test_inputs_are_not_modified() -> None:
    shape, axis = SHAPES["channels-last-C3"]
    d = _data(np.random.default_rng(1), shape, axis, 1.0, "float32")
    before = {k: v.copy() for k, v in d.items()}
    out = _forward(d, training=True, axis=axis, launch=SMALL)
    _backward(d, out[1], out[2], training=True, axis=axis, launch=SMALL)
    for k, v in d.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def _assert_generic_path_with_one_warning(match: str) -> None:
    """forward warns (``match``) and returns None, the generic path; backward then too, silently."""
    x = np.ones((4, 3), np.float32)
    with pytest.warns(RuntimeWarning, match=match):
        assert kernels.forward(
            x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1
        ) is None  # fmt: skip
    assert kernels.backward(x, x, None, x[0], x[0], training=True, axis=1) is None


def test_unusable_toolchain_falls_back_to_the_generic_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No NVVM/NVRTC/driver: forward and backward return None (generic path) and warn once."""
    from numba.cuda.cudadrv import error

    def no_nvvm(*args: object, **kwargs: object) -> None:
        raise error.CudaSupportError("libnvvm not found")

    monkeypatch.setattr(kernels, "_broken", None)
    monkeypatch.setattr(kernels, "_probed", True)
    monkeypatch.setattr(kernels, "_forward", no_nvvm)
    _assert_generic_path_with_one_warning("generic array-API path")


def test_numba_cuda_that_fails_to_build_its_target_falls_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """numba-cuda installed but unusable in another way (numba-cuda 0.30 with NumPy 2.5 raises
    AttributeError while building its CUDA target): the one-store probe fails, the generic
    path runs, one warning names the cause."""

    class Unusable:
        @staticmethod
        def device_array(*args: object, **kwargs: object) -> None:
            raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(kernels, "_broken", None)
    monkeypatch.setattr(kernels, "_probed", False)
    monkeypatch.setattr(kernels, "cuda", Unusable)
    _assert_generic_path_with_one_warning("row_stack")


@needs_device
def test_probe_passes_where_numba_cuda_works() -> None:
    assert kernels._probe() is None


def test_launch_validates_threads() -> None:
    with pytest.raises(ValueError, match="power of two"):
        kernels.Launch(threads=48)
    with pytest.raises(ValueError, match="power of two"):
        kernels.Launch(threads=2 * kernels.MAX_THREADS)


# --- compile check ---------------------------------------------------------------------------


def test_every_kernel_compiles_for_sm80_and_sm90(tmp_path: Path) -> None:
    """NVVM compiles every kernel (float16/32/64) for sm_80 and sm_90; ptxas: no spills.

    Runs in a subprocess without the simulator (it needs numba-cuda's real target,
    NVVM and NVRTC, but no GPU). Skipped with the reason when NVVM is missing.
    """
    code = textwrap.dedent(
        f"""
        import json, sys
        from anybn._kernels.numba_cuda import compile_ptx
        out = {{}}
        for cc in ((8, 0), (9, 0)):
            for key, ptx in compile_ptx(cc).items():
                path = {str(tmp_path)!r} + f"/{{key}}-sm{{cc[0]}}{{cc[1]}}.ptx"
                open(path, "w").write(ptx)
                out[path] = cc
        json.dump(out, sys.stdout)
        """
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("NUMBA_ENABLE_CUDASIM", "ANYBN_CUDA_SIMULATOR")
    }
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1:] or [""]
        if any(
            s in proc.stderr for s in ("libnvvm", "NVVM", "nvrtc", "NVRTC", "DynamicLibNotFound")
        ):
            pytest.skip(f"NVVM/NVRTC not found: {tail[0]}")
        pytest.fail(proc.stderr[-3000:])
    import json

    files = json.loads(proc.stdout)
    assert len(files) == 2 * 3 * len(kernels.KERNELS)
    ptxas = shutil.which("ptxas")
    if ptxas is None:
        return
    for path, cc in files.items():
        arch = f"sm_{cc[0]}{cc[1]}"
        res = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", path, "-o", os.devnull], capture_output=True, text=True
        )
        if "Unsupported .version" in res.stderr:
            pytest.skip(f"ptxas is older than NVVM's PTX: {res.stderr.strip()}")
        assert res.returncode == 0, (path, res.stderr)
        assert "0 bytes spill stores" in res.stderr, (path, res.stderr)


@needs_device
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("layout", ["planes-S33", "rows-S1", "channels-last-C3"])
def test_biased_running_variance(dtype: str, layout: str) -> None:
    """var_estimator="biased": the running variance accumulates M2 / n (float64 NumPy)."""
    shape, axis = SHAPES[layout]
    d = _data(np.random.default_rng(17), shape, axis, 3.0, dtype)
    dev = {k: _to_device(v) for k, v in d.items()}
    out = kernels.forward(
        dev["x"], dev["running_mean"], dev["running_var"], dev["weight"], dev["bias"],
        training=True, momentum=0.3, eps=1e-5, axis=axis % len(shape), var_estimator="biased",
        launch=SMALL,
    )  # fmt: skip
    if not SIMULATOR:
        cuda.synchronize()
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    want = 0.7 * d["running_var"].astype(np.float64) + 0.3 * d["x"].astype(np.float64).var(red)
    np.testing.assert_allclose(_host(out[4]).astype(np.float64), want, rtol=1e-6, atol=0)
