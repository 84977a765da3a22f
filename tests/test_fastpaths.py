"""The fast paths (anybn._kernels) against the generic array-API path they replace.

Every backend of the matrix runs each case twice, with ``fast_paths(True)`` and
``fast_paths(False)``; the results must agree to the dtype's tolerance (the
generic path is the reference the fast paths are held to, and the float64 NumPy
reference checks both). On a machine with a GPU this is where the CUDA kernels
(anybn._kernels.numba_cuda, for CuPy arrays and torch CUDA tensors) are tested through
the public functions; tests/test_gpu_kernels.py runs them directly, also in the
simulator.
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
import tracemalloc
from typing import Any

import numpy as np
import pytest

import anybn
from anybn import _kernels as _fastpaths
from anybn._kernels import fast_paths
from anybn._kernels import numpy_blocks as _numpy_kernels
from anybn._testing.backends import Backend, get_backend
from anybn._testing.reference import reference_backward, reference_forward


def _has_numba_cuda() -> bool:
    """numba-cuda is installed (found without importing numba: the simulator switch is
    read when numba is first imported, see tests/test_gpu_kernels.py)."""
    import importlib.util

    return importlib.util.find_spec("numba_cuda") is not None


#: Backends with a fast path: GPU arrays take anybn._kernels.numba_cuda when numba-cuda is there.
FAST_BACKENDS = ("numpy", "torch") + (("cupy", "torch:cuda") if _has_numba_cuda() else ())

TOL = {"float64": 1e-10, "float32": 2e-5, "float16": 3e-3, "bfloat16": 2e-2}

#: (shape, axis): small (one block), NC, channels-last, and larger than
#: _numpy_kernels.SMALL so the NumPy kernels cut blocks and use threads.
SHAPES = [
    ((8, 16), 1),
    ((4, 3, 5), 1),
    ((2, 3, 4, 5), 1),
    ((2, 4, 5, 3), -1),
    ((3, 4, 5, 6), 2),
    ((6, 8, 40, 40), 1),
    ((6, 40, 40, 8), -1),
    ((600, 96), 1),
]


def _host(a: Any) -> np.ndarray:
    if a is None:
        return None
    mod = type(a).__module__.split(".")[0]
    if mod == "torch":
        return get_backend("torch").to_numpy(a).astype(np.float64)
    if mod == "cupy":
        return get_backend("cupy").to_numpy(a).astype(np.float64)
    if mod == "numpy":
        return np.asarray(a, dtype=np.float64)
    return get_backend("array_api_strict").to_numpy(a).astype(np.float64)


def _inputs(rng: np.random.Generator, shape: tuple[int, ...], axis: int, offset: float) -> dict:
    c = shape[axis]
    return {
        "x": rng.standard_normal(shape) + offset,
        "dy": rng.standard_normal(shape),
        "weight": rng.uniform(0.5, 1.5, c),
        "bias": rng.standard_normal(c),
        "running_mean": rng.standard_normal(c) + offset,
        "running_var": rng.uniform(0.5, 2.0, c),
    }


def _run(
    backend: Backend,
    data: dict,
    dtype: str,
    *,
    axis: int,
    training: bool,
    affine: bool,
    stats: bool,
    fast: bool,
) -> dict[str, Any]:
    vec = "float32" if dtype in ("float16", "bfloat16") else dtype
    x = backend.asarray(data["x"], dtype)
    dy = backend.asarray(data["dy"], dtype)
    w, b = (backend.asarray(data[k], vec) if affine else None for k in ("weight", "bias"))
    rm, rv = (
        backend.asarray(data[k], vec) if stats else None for k in ("running_mean", "running_var")
    )
    with fast_paths(fast):
        out = anybn.batch_norm(x, rm, rv, w, b, training=training, momentum=0.3, axis=axis)
        grads = anybn.batch_norm_backward(
            dy, x, w, out.mean, out.invstd, training=training, axis=axis
        )
    return {**out._asdict(), **grads._asdict()}


def _assert_agree(fast: dict, generic: dict, dtype: str, count: int) -> None:
    for name, value in generic.items():
        got = fast[name]
        if value is None:
            assert got is None, name
            continue
        expected, actual = _host(value), _host(got)
        assert actual.shape == expected.shape, name
        scale = max(1.0, float(np.max(np.abs(expected))))
        if name in ("dweight", "dbias"):  # sums of `count` terms: allow their rounding
            scale *= max(1.0, float(np.sqrt(count)))
        tol = TOL[dtype]
        np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=name)


@pytest.mark.parametrize(("shape", "axis"), SHAPES, ids=[f"{s}-axis{a}" for s, a in SHAPES])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fast_path_matches_generic(
    backend: Backend, shape: tuple[int, ...], axis: int, training: bool
) -> None:
    """Every backend, layout, mode, dtype and optional argument: fast == generic."""
    rng = np.random.default_rng(7)
    data = _inputs(rng, shape, axis, offset=3.0)
    count = int(np.prod(shape)) // shape[axis]
    for dtype, affine, stats in itertools.product(backend.dtypes, (True, False), (True, False)):
        if not training and not stats:
            continue
        kwargs = {"axis": axis, "training": training, "affine": affine, "stats": stats}
        fast = _run(backend, data, dtype, fast=True, **kwargs)
        generic = _run(backend, data, dtype, fast=False, **kwargs)
        _assert_agree(fast, generic, dtype, count)


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e5])
@pytest.mark.parametrize(
    ("shape", "axis"),
    [
        ((16, 4, 8, 8), 1),
        ((8, 8, 8, 4), -1),
        ((32, 24, 24, 64), -1),  # blocked rows: long column sums
        ((16, 64, 24, 24), 1),  # blocked planes
    ],
)
def test_fast_path_exact_on_offset_data(
    backend: Backend, offset: float, shape: tuple[int, ...], axis: int
) -> None:
    """float32 data far from zero: y as exact as the generic path (no x*alpha+beta)."""
    if "float32" not in backend.dtypes:
        pytest.skip("no float32")
    rng = np.random.default_rng(3)
    data = _inputs(rng, shape, axis, offset)
    x32 = data["x"].astype(np.float32).astype(np.float64)
    ref = reference_forward(
        x32, None, None, data["weight"].astype(np.float32), data["bias"].astype(np.float32),
        training=True, axis=axis,
    )  # fmt: skip
    kwargs = {"axis": axis, "training": True, "affine": True, "stats": False}
    fast = _run(backend, data, "float32", fast=True, **kwargs)
    generic = _run(backend, data, "float32", fast=False, **kwargs)
    err_fast = np.max(np.abs(_host(fast["y"]) - ref.y))
    err_generic = np.max(np.abs(_host(generic["y"]) - ref.y))
    assert err_fast <= max(2 * err_generic, 2e-6), (err_fast, err_generic)
    if backend.id in FAST_BACKENDS:  # the backends with a fast path
        assert err_fast <= 2e-6, (err_fast, err_generic)


# --- var_estimator="biased": the same kernels, denominator n ---------------------------------


@pytest.fixture
def kernel_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``module.forward`` of every CPU kernel module, as it is called (``cpu`` is Numba's)."""
    from anybn._kernels import numba_cpu as cpu
    from anybn._kernels import torch_cpu as _torch_kernels

    calls: list[str] = []

    def spy(module: Any, name: str) -> None:
        fn = module.forward

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            return fn(*args, **kwargs)

        monkeypatch.setattr(module, "forward", wrapper)

    for module, name in ((_numpy_kernels, "numpy"), (_torch_kernels, "torch"), (cpu, "numba")):
        spy(module, name)
    return calls


#: Layouts for the biased estimator: small (one block), channels-first planes, channels-last
#: rows, a middle axis, and sizes above _numpy_kernels.SMALL and torch's native threshold.
BIASED_SHAPES = [
    ((8, 16), 1),
    ((2, 3, 4, 5), 1),
    ((3, 4, 5, 6), 2),
    ((6, 8, 40, 40), 1),
    ((6, 40, 40, 8), -1),
    ((4, 14, 14, 64), -1),
]


@pytest.mark.parametrize("library", ["numpy", "torch"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize(
    ("shape", "axis"), BIASED_SHAPES, ids=[f"{s}-axis{a}" for s, a in BIASED_SHAPES]
)
def test_biased_estimator_takes_the_fast_paths(
    kernel_calls: list[str], library: str, dtype: str, shape: tuple[int, ...], axis: int
) -> None:
    """var_estimator="biased" runs on a kernel and equals the generic path; its running
    variance is (1 - m) * rv + m * var, var the biased batch variance (float64 NumPy)."""
    if library == "torch":
        pytest.importorskip("torch")
    backend = get_backend(library)
    rng = np.random.default_rng(12)
    data = _inputs(rng, shape, axis, offset=3.0)
    vec = "float32" if dtype == "float16" else dtype
    x = backend.asarray(data["x"], dtype)
    rm, rv, w, b = (backend.asarray(data[k], vec)
                    for k in ("running_mean", "running_var", "weight", "bias"))  # fmt: skip
    results = []
    for fast in (True, False):
        del kernel_calls[:]
        with fast_paths(fast):
            out = anybn.batch_norm(
                x, rm, rv, w, b, training=True, momentum=0.3, axis=axis, var_estimator="biased"
            )
        results.append({k: v for k, v in out._asdict().items()})
        assert bool(kernel_calls) is fast, kernel_calls  # a kernel served it, or none ran
    count = int(np.prod(shape)) // shape[axis]
    _assert_agree(results[0], results[1], dtype, count)
    x64 = _host(x)
    red = tuple(i for i in range(len(shape)) if i != axis % len(shape))
    want = 0.7 * _host(rv) + 0.3 * x64.var(axis=red)
    np.testing.assert_allclose(_host(results[0]["new_running_var"]), want, rtol=TOL[vec], atol=0)
    assert np.all(_host(results[0]["new_running_var"]) != _host(
        anybn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, axis=axis).new_running_var
    ))  # fmt: skip  # the two estimators differ: the option reached the kernel


def test_biased_layer_takes_the_fast_paths(kernel_calls: list[str]) -> None:
    """A layer as anybn.convert.from_keras/from_flax makes it (biased) runs on a kernel."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((16, 28, 28, 64)).astype(np.float32)
    bn = anybn.BatchNorm(axis=-1, var_estimator="biased", momentum=0.01)
    bn(x)
    assert kernel_calls
    np.testing.assert_allclose(bn.running_var, 0.99 + 0.01 * x.astype(np.float64).var((0, 1, 2)),
                               rtol=1e-6)  # fmt: skip


# --- the NumPy kernels: blocks, threads, layouts, memory -----------------------------------


@pytest.mark.parametrize(
    ("shape", "axis", "block"),
    [
        ((5, 3, 7, 9), 1, 7),  # planes: one channel-row split into pieces (s-blocks)
        ((5, 3, 7, 9), 1, 130),  # planes: channel blocks within one sample
        ((5, 3, 7, 9), 1, 1000),  # planes: several samples per block
        ((50, 7), 1, 7),  # rows: blocks of one row
        ((50, 7), 1, 3),  # rows: channel blocks within a row
        ((9, 6, 5, 11), -1, 40),  # rows of a channels-last array
        ((4, 6, 5, 3), 2, 33),  # a middle axis
    ],
)
@pytest.mark.parametrize("dtype", ["float64", "float32", "float16"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_numpy_blocks_match_reference(
    shape: tuple[int, ...], axis: int, block: int, dtype: str, training: bool
) -> None:
    """The blocked NumPy kernels with tiny blocks, against the float64 reference."""
    rng = np.random.default_rng(11)
    data = _inputs(rng, shape, axis, offset=2.0)
    vec = "float32" if dtype == "float16" else dtype
    x, dy = data["x"].astype(dtype), data["dy"].astype(dtype)
    w, b, rm, rv = (data[k].astype(vec) for k in ("weight", "bias", "running_mean", "running_var"))
    ax = axis % len(shape)
    y, mean, invstd, nrm, nrv = _numpy_kernels.forward(
        x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-5, axis=ax, block=block
    )
    dx, dw, db = _numpy_kernels.backward(
        dy, x, w, mean, invstd, training=training, axis=ax, block=block
    )
    ref = reference_forward(x, rm, rv, w, b, training=training, momentum=0.3, axis=axis)
    refb = reference_backward(
        dy, x, w, training=training, running_mean=rm, running_var=rv, axis=axis
    )
    tol = TOL[dtype]
    count = x.size // x.shape[axis]
    for name, got, exp in [
        ("y", y, ref.y), ("mean", mean, ref.mean), ("invstd", invstd, ref.invstd),
        ("running_mean", nrm, ref.running_mean), ("running_var", nrv, ref.running_var),
        ("dx", dx, refb.dx),
    ]:  # fmt: skip
        scale = max(1.0, float(np.max(np.abs(exp))))
        np.testing.assert_allclose(
            np.asarray(got, np.float64), exp, rtol=tol, atol=tol * scale, err_msg=name
        )
    for name, got, exp in [("dweight", dw, refb.dweight), ("dbias", db, refb.dbias)]:
        scale = max(1.0, float(np.max(np.abs(exp)))) * np.sqrt(count)
        np.testing.assert_allclose(
            np.asarray(got, np.float64), exp, rtol=tol, atol=tol * scale, err_msg=name
        )


def test_numpy_results_do_not_depend_on_threads() -> None:
    """Partial sums have fixed places: 1 and 3 threads give bitwise-equal results."""
    rng = np.random.default_rng(5)
    x = (rng.standard_normal((16, 8, 48, 48)) + 5).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    results = []
    previous = _numpy_kernels.get_num_threads()
    try:
        for threads in (1, 3):
            _numpy_kernels.set_num_threads(threads)
            out = anybn.batch_norm(x, training=True)
            grads = anybn.batch_norm_backward(dy, x, None, out.mean, out.invstd)
            results.append([*out[:3], *grads])
    finally:
        _numpy_kernels.set_num_threads(previous)
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "layout",
    ["fortran", "transposed", "strided", "readonly"],
)
def test_numpy_fast_path_layouts(layout: str) -> None:
    """Non-contiguous and read-only NumPy inputs: the fast path copies or views, never fails."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, 8, 40, 40)).astype(np.float32) + 1
    dy = rng.standard_normal(x.shape).astype(np.float32)

    def view(a: np.ndarray) -> np.ndarray:
        if layout == "fortran":
            return np.asfortranarray(a)
        if layout == "transposed":
            return np.ascontiguousarray(a.T).T
        if layout == "strided":
            big = np.zeros((*a.shape[:-1], 2 * a.shape[-1]), a.dtype)
            big[..., ::2] = a
            return big[..., ::2]
        a = a.copy()
        a.flags.writeable = False
        return a

    xv, dyv = view(x), view(dy)
    before = xv.copy(), dyv.copy()
    with fast_paths(True):
        out = anybn.batch_norm(xv, training=True)
        g = anybn.batch_norm_backward(dyv, xv, None, out.mean, out.invstd)
    with fast_paths(False):
        out0 = anybn.batch_norm(x, training=True)
        g0 = anybn.batch_norm_backward(dy, x, None, out0.mean, out0.invstd)
    np.testing.assert_allclose(out.y, out0.y, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(g.dx, g0.dx, rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(xv, before[0])
    np.testing.assert_array_equal(dyv, before[1])


@pytest.mark.parametrize(("shape", "axis"), [((8, 32, 40, 40), 1), ((8, 40, 40, 32), -1)])
def test_numpy_temporary_memory_at_most_x(shape: tuple[int, ...], axis: int) -> None:
    """Forward+backward allocate at most one x beyond y and dx (tracemalloc sees NumPy)."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)

    def run() -> tuple[Any, Any]:
        out = anybn.batch_norm(x, training=True, axis=axis)
        return out, anybn.batch_norm_backward(dy, x, None, out.mean, out.invstd, axis=axis)

    with fast_paths(True):  # the target is the NumPy kernels' (also under ANYBN_FAST_PATHS=0)
        run()  # warm up: imports, the thread pool
        tracemalloc.start()
        try:
            out, grads = run()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    assert (peak - out.y.nbytes - grads.dx.nbytes) / x.nbytes <= 1.0


# --- PyTorch ------------------------------------------------------------------------------


def test_torch_tracked_tensors_keep_autograd() -> None:
    """Tensors that require grad take the generic path, so autograd traces through it."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, dtype=torch.float64, requires_grad=True)
    out = anybn.batch_norm(x, None, None, w, None, training=True)
    assert out.y.grad_fn is not None
    out.y.sum().backward()
    assert x.grad is not None and w.grad is not None


def test_torch_running_stats_are_not_mutated() -> None:
    """The native kernel updates running statistics in place: anybn gives it copies."""
    torch = pytest.importorskip("torch")
    for offset in (0.0, 1e4):  # the direct and the centred native paths
        x = torch.randn(16, 4, 6, 6) + offset
        rm, rv = torch.full((4,), offset), torch.ones(4)
        before = rm.clone(), rv.clone()
        out = anybn.batch_norm(x, rm, rv, training=True)
        assert torch.equal(rm, before[0]) and torch.equal(rv, before[1])
        assert out.new_running_mean is not rm and out.new_running_var is not rv
        expected = 0.9 * before[0] + 0.1 * x.double().mean((0, 2, 3)).float()
        torch.testing.assert_close(out.new_running_mean, expected, rtol=1e-6, atol=1e-6)


def test_torch_channels_last_stays_channels_last() -> None:
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 8, 5, 5).contiguous(memory_format=torch.channels_last)
    out = anybn.batch_norm(x, training=True)
    assert out.y.is_contiguous(memory_format=torch.channels_last)
    with fast_paths(False):
        torch.testing.assert_close(out.y, anybn.batch_norm(x, training=True).y)


# --- the switch ---------------------------------------------------------------------------


def test_fast_paths_context_manager_restores() -> None:
    before = _fastpaths.enabled()
    with fast_paths(False):
        assert not _fastpaths.enabled()
        with fast_paths(True):
            assert _fastpaths.enabled()
        assert not _fastpaths.enabled()
    assert _fastpaths.enabled() is before


def test_set_fast_paths_is_process_wide() -> None:
    previous = _fastpaths.set_fast_paths(False)
    try:
        assert not _fastpaths.enabled()
        with fast_paths(True):
            assert _fastpaths.enabled()
    finally:
        _fastpaths.set_fast_paths(previous)
    assert _fastpaths.enabled() is previous


def test_generic_path_really_runs_when_disabled(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the switch off the dispatcher is never asked."""

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fast path called")

    for module in _fastpaths.kernels_for(np.empty(0)):
        if module.FAST:
            monkeypatch.setattr(module, "run_forward", boom)
            monkeypatch.setattr(module, "run_backward", boom)
    x = np.arange(12.0).reshape(4, 3)
    with fast_paths(False):
        out = anybn.batch_norm(x, training=True)
        anybn.batch_norm_backward(np.ones_like(x), x, None, out.mean, out.invstd)


def test_environment_variable_turns_fast_paths_off() -> None:
    code = "import anybn._kernels as f; print(f.enabled())"
    env = {**os.environ, "ANYBN_FAST_PATHS": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.strip() == "False", out.stderr


def test_set_num_threads_validates() -> None:
    previous = _numpy_kernels.get_num_threads()
    with pytest.raises(ValueError, match="threads"):
        _numpy_kernels.set_num_threads(0)
    assert _numpy_kernels.set_num_threads(previous) == previous


# --- GPU arrays: CuPy and torch CUDA tensors (anybn._kernels.numba_cuda) -----------------------


def _gpu_backend(backend: Backend) -> None:
    if backend.id not in ("cupy", "torch:cuda"):
        pytest.skip("GPU backends only")
    pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")


def test_gpu_arrays_take_the_cuda_kernels(backend: Backend) -> None:
    """CuPy arrays and untracked torch CUDA tensors dispatch to anybn._kernels.numba_cuda."""
    _gpu_backend(backend)
    x = backend.asarray(np.ones((4, 3, 5)), "float32")
    from anybn._kernels import numba_cuda

    assert numba_cuda._served((x, None, None, None, None))
    if backend.id == "torch:cuda":
        x.requires_grad_(True)
        assert not numba_cuda._served((x,))  # autograd traces the generic path
        x = backend.asarray(np.ones((4, 3, 5)), "bfloat16")
        assert not numba_cuda._served((x,))  # no bfloat16 in numba


def test_torch_cuda_no_host_sync_and_channels_last(backend: Backend) -> None:
    """torch CUDA: no host synchronisation (torch's sync debug mode) and channels_last kept."""
    _gpu_backend(backend)
    if backend.id != "torch:cuda":
        pytest.skip("torch:cuda only")
    import torch

    rng = np.random.default_rng(4)
    x = backend.asarray(rng.standard_normal((4, 8, 5, 5)) + 100, "float32")
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn_like(x)
    rm, rv = torch.zeros(8, device=x.device), torch.ones(8, device=x.device)
    anybn.batch_norm(x, rm, rv, training=True)  # compile and warm up first
    previous = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = anybn.batch_norm(x, rm, rv, training=True)
        grads = anybn.batch_norm_backward(dy, x, None, out.mean, out.invstd)
    finally:
        torch.cuda.set_sync_debug_mode(previous)
    assert out.y.is_contiguous(memory_format=torch.channels_last)
    assert grads.dx.is_contiguous(memory_format=torch.channels_last)
    with fast_paths(False):
        ref = anybn.batch_norm(x.double(), rm.double(), rv.double(), training=True)
    torch.testing.assert_close(out.y.double(), ref.y, rtol=0, atol=2e-6)


def test_gpu_kernels_use_the_callers_stream(backend: Backend) -> None:
    """Work queued on a non-default stream: anybn's kernels run after it, on that stream."""
    _gpu_backend(backend)
    rng = np.random.default_rng(6)
    host_x = (rng.standard_normal((64, 16, 32, 32)) + 10).astype(np.float32)
    lib = backend.lib
    if backend.id == "cupy":
        stream = lib.cuda.Stream(non_blocking=True)
        with stream:
            x = lib.asarray(host_x) * 2  # queued on `stream`
            out = anybn.batch_norm(x, training=True)
        stream.synchronize()
    else:
        stream = lib.cuda.Stream()
        with lib.cuda.stream(stream):
            x = lib.from_numpy(host_x).cuda() * 2
            out = anybn.batch_norm(x, training=True)
        stream.synchronize()
    y = backend.to_numpy(out.y).astype(np.float64)
    ref = reference_forward(host_x * 2, training=True)
    assert np.max(np.abs(y - ref.y)) <= 2e-6


def test_gpu_kernels_run_on_the_arrays_device(backend: Backend) -> None:
    """With two GPUs, x on device 1 while device 0 is current: outputs on device 1."""
    _gpu_backend(backend)
    lib = backend.lib
    count = lib.cuda.runtime.getDeviceCount() if backend.id == "cupy" else lib.cuda.device_count()
    if count < 2:
        pytest.skip("needs two GPUs")
    rng = np.random.default_rng(8)
    host_x = (rng.standard_normal((8, 4, 6, 6)) + 5).astype(np.float32)
    if backend.id == "cupy":
        with lib.cuda.Device(1):
            x = lib.asarray(host_x)
        with lib.cuda.Device(0):
            out = anybn.batch_norm(x, training=True)
        assert out.y.device.id == 1 and out.mean.device.id == 1
    else:
        x = lib.from_numpy(host_x).to("cuda:1")
        with lib.cuda.device(0):
            out = anybn.batch_norm(x, training=True)
        assert out.y.device.index == 1 and out.mean.device.index == 1
    ref = reference_forward(host_x, training=True)
    assert np.max(np.abs(backend.to_numpy(out.y) - ref.y)) <= 2e-6
