"""The CUDA fast path: numba-cuda kernels for CuPy arrays and PyTorch CUDA tensors.

The kernels are written once, in Python, with :func:`numba.cuda.jit`, and launched
through the CUDA Array Interface on the caller's current stream (CuPy's
``get_current_stream()``, torch's ``current_stream(device)``) on x's device,
without a host synchronisation. The same source runs in CI on the CPU under
numba-cuda's CUDA simulator (``ANYBN_CUDA_SIMULATOR=1`` or
``NUMBA_ENABLE_CUDASIM=1``; the simulator takes NumPy arrays), which is why the
block reductions use shared memory and ``syncthreads`` (the simulator has no
warp shuffles). ``tests/test_gpu_kernels.py`` runs them there against the float64
reference, and compiles every kernel to PTX for sm_80 and sm_90.

Layouts: x viewed without a copy as ``(N, C, S)`` ("planes", C-contiguous with
``S > 1``) or ``(P, C)`` ("rows": channels last, the channel axis contiguous);
anything else is copied to C order first. Outputs keep x's layout.

Passes over memory (the minimum):

* forward, training: ``stats_*`` reads x once and writes per-block partial sums;
  ``finish_stats`` merges them per channel; ``affine`` reads x and writes y;
* forward, eval: ``prep_eval`` (per channel), then ``affine``;
* backward: ``sums_*`` reads dy and x; ``finish_sums`` per channel; ``grad``
  reads dy and x and writes dx (eval: ``affine`` on dy).

Numerics (anybn's rules: no ``E[x^2] - E[x]^2`` cancellation, float16 accumulates
in float32 at least):

* statistics are sums of ``d = x - pivot`` and ``d * d`` accumulated in float64,
  where the pivot is the channel's first value: ``mean = pivot + sum(d) / n`` and
  ``M2 = sum(d^2) - sum(d)^2 / n`` then lose only ``(mean - pivot)^2 / var`` ulps
  of float64, nothing for data that is not wildly spread. The partials of all
  blocks of a channel share the pivot, so they merge by addition (no divisions);
* y is ``(x - centre) * scale + shift`` in the compute dtype (float32 for
  float16/float32 x, float64 for float64), with ``centre`` the mean rounded to
  that dtype and ``shift = bias - (mean - centre) * scale`` carrying the rest:
  ``x - centre`` is exact for data near its mean, so offset data does not cancel;
* the backward sums ``sum(dy)`` and ``sum(dy * (x - mean))`` accumulate in float64.

Launch limits: every kernel walks its work with grid-stride loops over 64-bit
indices (no ``gridDim.y`` per channel tile, no ``gridDim.x = N * C``); the
elementwise kernels track the channel of a flat index incrementally (no integer
division per element), so ``S = 1`` or ``C = 3`` keep every thread busy; the
reductions split each channel's values into ``blocks_per_channel`` contiguous
chunks so that small ``C`` still fills the device.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import array_api_compat as compat
import numpy as np

from .._core.outputs import BatchNormGrads, BatchNormOutput

if TYPE_CHECKING:
    from .._call import Call

if os.environ.get("ANYBN_CUDA_SIMULATOR", "").strip() not in ("", "0"):
    # Must be set before numba.cuda is first imported (tests/test_gpu_kernels.py does it too).
    os.environ.setdefault("NUMBA_ENABLE_CUDASIM", "1")


def _import_numba() -> tuple[Any, Any]:
    """numba's ``cuda`` and ``float64``; ``(None, None)`` without numba-cuda.

    Without it this module still imports (docs, doctests) and nothing runs.
    """
    try:
        from numba import cuda, float64
    except ImportError:
        return None, None
    return cuda, float64


cuda, float64 = _import_numba()

#: Whether numba-cuda is installed (the dispatcher uses the kernels only then).
AVAILABLE = cuda is not None

__all__ = [
    "AVAILABLE",
    "KERNELS",
    "MAX_THREADS",
    "Launch",
    "backward",
    "forward",
    "simulated",
    "supports",
]

Array = Any

#: The largest block the kernels accept (their shared-memory scratch size).
MAX_THREADS = 512


def simulated() -> bool:
    """Whether numba-cuda runs the kernels in its CPU simulator."""
    if cuda is None:
        return False
    return bool(getattr(cuda, "simulator_enabled", False)) or os.environ.get(
        "NUMBA_ENABLE_CUDASIM", ""
    ).strip() not in ("", "0")


@dataclass(frozen=True)
class Launch:
    """Launch geometry. The defaults suit H100/A100; the simulator tests use small ones.

    Attributes
    ----------
    threads : int
        Threads per block, a power of two from 32 to :data:`MAX_THREADS`.
    max_blocks : int
        Most blocks per launch (the grid-stride loops cover the rest).
    target_blocks : int
        Reductions split channels into chunks until about this many blocks work.
    min_per_thread : int
        A reduction chunk keeps at least this many values per thread.
    """

    threads: int = 256
    max_blocks: int = 8192
    target_blocks: int = 2048
    min_per_thread: int = 16

    def __post_init__(self) -> None:
        t = self.threads
        if t < 1 or t > MAX_THREADS or t & (t - 1):
            raise ValueError(f"threads must be a power of two <= {MAX_THREADS}, got {t}")


DEFAULT_LAUNCH = Launch()


# --- kernels --------------------------------------------------------------------------------
# Written for numba.cuda.jit: plain Python that the simulator can also run. Big arrays are
# flat 1-D views; per-channel vectors are contiguous 1-D arrays of length C.


def stats_planes(x, n_rows, channels, inner, blocks, part):
    """Partial ``sum(x - pivot)``, ``sum((x - pivot)^2)`` per (channel, chunk); x is (N, C, S).

    Work item ``w = c * blocks + b``: chunk ``b`` of the ``N * S`` values of channel ``c``,
    walked as a flat index ``i -> (n, s)`` with the row/column carried incrementally.
    """
    sh1 = cuda.shared.array(MAX_THREADS, float64)
    sh2 = cuda.shared.array(MAX_THREADS, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    total = n_rows * inner
    dq = nt // inner
    dr = nt - dq * inner
    w = cuda.blockIdx.x
    while w < channels * blocks:
        c = w // blocks
        b = w - c * blocks
        pivot = float64(x[c * inner])
        i = total * b // blocks + t
        end = total * (b + 1) // blocks
        n = i // inner
        s = i - n * inner
        s1 = float64(0.0)
        s2 = float64(0.0)
        while i < end:
            d = float64(x[(n * channels + c) * inner + s]) - pivot
            s1 += d
            s2 += d * d
            i += nt
            n += dq
            s += dr
            if s >= inner:
                s -= inner
                n += 1
        sh1[t] = s1  # tree sum over the block (shared memory: the simulator has no shuffles)
        sh2[t] = s2
        cuda.syncthreads()
        h = nt // 2
        while h > 0:
            if t < h:
                sh1[t] += sh1[t + h]
                sh2[t] += sh2[t + h]
            cuda.syncthreads()
            h //= 2
        if t == 0:
            part[2 * (b * channels + c)] = sh1[0]
            part[2 * (b * channels + c) + 1] = sh2[0]
        cuda.syncthreads()
        w += cuda.gridDim.x


def stats_rows(x, n_rows, channels, tile, blocks, part):
    """Partial sums per (channel, chunk of rows); x is (P, C), channels contiguous.

    A block covers ``tile`` consecutive channels (all of them when ``C`` fits) and
    ``blockDim // tile`` rows at a time, so that a small ``C`` (3, say) still uses
    every lane and reads whole contiguous runs of memory.
    """
    sh1 = cuda.shared.array(MAX_THREADS, float64)
    sh2 = cuda.shared.array(MAX_THREADS, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    span = nt // tile  # rows per step
    r = t // tile
    cc = t - r * tile
    tiles = (channels + tile - 1) // tile
    w = cuda.blockIdx.x
    while w < tiles * blocks:
        k = w // blocks
        b = w - k * blocks
        c = k * tile + cc
        s1 = float64(0.0)
        s2 = float64(0.0)
        if r < span and c < channels:
            pivot = float64(x[c])
            p = n_rows * b // blocks + r
            end = n_rows * (b + 1) // blocks
            while p < end:
                d = float64(x[p * channels + c]) - pivot
                s1 += d
                s2 += d * d
                p += span
        sh1[t] = s1
        sh2[t] = s2
        cuda.syncthreads()
        m = span  # tree over the rows of the block, any span
        while m > 1:
            h = (m + 1) // 2
            if r + h < m:
                sh1[t] += sh1[t + h * tile]
                sh2[t] += sh2[t + h * tile]
            cuda.syncthreads()
            m = h
        if r == 0 and c < channels:
            part[2 * (b * channels + c)] = sh1[t]
            part[2 * (b * channels + c) + 1] = sh2[t]
        cuda.syncthreads()
        w += cuda.gridDim.x


def finish_stats(
    x, pivot_stride, part, blocks, channels, count, eps, momentum, ddof,
    weight, bias, has_weight, has_bias, running_mean, running_var, has_running,
    vec, new_rm, new_rv,
):  # fmt: skip
    """Per channel: merge the partials (same pivot: add), then the derived vectors.

    ``vec`` rows: 0 mean, 1 invstd, 2 centre, 3 scale, 4 shift (see :func:`affine`).
    The running variance accumulates ``M2 / (n - ddof)``: 1 unbiased, 0 biased.
    """
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    while c < channels:
        s1 = float64(0.0)
        s2 = float64(0.0)
        for b in range(blocks):
            s1 += part[2 * (b * channels + c)]
            s2 += part[2 * (b * channels + c) + 1]
        pivot = float64(x[c * pivot_stride])
        dmean = s1 / count
        m2 = s2 - s1 * dmean
        if m2 < 0.0:
            m2 = 0.0
        mean = pivot + dmean
        invstd = 1.0 / math.sqrt(m2 / count + eps)
        a = invstd * float64(weight[c]) if has_weight else invstd
        vec[2, c] = mean  # centre: the mean rounded to the compute dtype
        lo = mean - float64(vec[2, c])  # the part of the mean that the centre could not hold
        vec[3, c] = a
        vec[4, c] = (float64(bias[c]) if has_bias else 0.0) - lo * a
        vec[0, c] = mean
        vec[1, c] = invstd
        if has_running:
            batch_var = m2 / (count - ddof)
            new_rm[c] = (1.0 - momentum) * float64(running_mean[c]) + momentum * mean
            new_rv[c] = (1.0 - momentum) * float64(running_var[c]) + momentum * batch_var
        c += cuda.gridDim.x * cuda.blockDim.x


def prep_eval(
    running_mean, running_var, weight, bias, has_weight, has_bias, channels, eps,
    vec,
):  # fmt: skip
    """Per channel, eval: the running statistics as centre, scale and shift (rows as above)."""
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    while c < channels:
        mean = float64(running_mean[c])
        invstd = 1.0 / math.sqrt(float64(running_var[c]) + eps)
        a = invstd * float64(weight[c]) if has_weight else invstd
        vec[2, c] = mean
        lo = mean - float64(vec[2, c])
        vec[3, c] = a
        vec[4, c] = (float64(bias[c]) if has_bias else 0.0) - lo * a
        vec[0, c] = mean
        vec[1, c] = invstd
        c += cuda.gridDim.x * cuda.blockDim.x


def affine(x, y, size, channels, inner, vec, kc, ks, kh):
    """``y = (x - vec[kc, c]) * vec[ks, c] + vec[kh, c]`` over a flat (N, C, S) or (P, C) array.

    Rows ``kc``, ``ks``, ``kh`` of ``vec`` hold the per-channel centre, scale and shift.

    The channel ``c = (i // S) % C`` of the flat index is carried along the
    grid-stride loop, without a division per element.
    """
    nt = cuda.gridDim.x * cuda.blockDim.x
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    row = i // inner
    s = i - row * inner
    c = row % channels
    dq = nt // inner  # rows per step
    dr = nt - dq * inner
    dc = dq % channels
    while i < size:
        y[i] = (x[i] - vec[kc, c]) * vec[ks, c] + vec[kh, c]
        i += nt
        s += dr
        c += dc
        if s >= inner:
            s -= inner
            c += 1
        if c >= channels:
            c -= channels


def sums_planes(dy, x, mean, n_rows, channels, inner, blocks, part):
    """Partial ``sum(dy)`` and ``sum(dy * (x - mean))`` per (channel, chunk); (N, C, S)."""
    sh1 = cuda.shared.array(MAX_THREADS, float64)
    sh2 = cuda.shared.array(MAX_THREADS, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    total = n_rows * inner
    dq = nt // inner
    dr = nt - dq * inner
    w = cuda.blockIdx.x
    while w < channels * blocks:
        c = w // blocks
        b = w - c * blocks
        m = float64(mean[c])
        i = total * b // blocks + t
        end = total * (b + 1) // blocks
        n = i // inner
        s = i - n * inner
        s1 = float64(0.0)
        s2 = float64(0.0)
        while i < end:
            j = (n * channels + c) * inner + s
            g = float64(dy[j])
            s1 += g
            s2 += g * (float64(x[j]) - m)
            i += nt
            n += dq
            s += dr
            if s >= inner:
                s -= inner
                n += 1
        sh1[t] = s1  # tree sum over the block (shared memory: the simulator has no shuffles)
        sh2[t] = s2
        cuda.syncthreads()
        h = nt // 2
        while h > 0:
            if t < h:
                sh1[t] += sh1[t + h]
                sh2[t] += sh2[t + h]
            cuda.syncthreads()
            h //= 2
        if t == 0:
            part[2 * (b * channels + c)] = sh1[0]
            part[2 * (b * channels + c) + 1] = sh2[0]
        cuda.syncthreads()
        w += cuda.gridDim.x


def sums_rows(dy, x, mean, n_rows, channels, tile, blocks, part):
    """Partial ``sum(dy)`` and ``sum(dy * (x - mean))`` per (channel, chunk); (P, C)."""
    sh1 = cuda.shared.array(MAX_THREADS, float64)
    sh2 = cuda.shared.array(MAX_THREADS, float64)
    t = cuda.threadIdx.x
    nt = cuda.blockDim.x
    span = nt // tile
    r = t // tile
    cc = t - r * tile
    tiles = (channels + tile - 1) // tile
    w = cuda.blockIdx.x
    while w < tiles * blocks:
        k = w // blocks
        b = w - k * blocks
        c = k * tile + cc
        s1 = float64(0.0)
        s2 = float64(0.0)
        if r < span and c < channels:
            m = float64(mean[c])
            p = n_rows * b // blocks + r
            end = n_rows * (b + 1) // blocks
            while p < end:
                j = p * channels + c
                g = float64(dy[j])
                s1 += g
                s2 += g * (float64(x[j]) - m)
                p += span
        sh1[t] = s1
        sh2[t] = s2
        cuda.syncthreads()
        m2 = span
        while m2 > 1:
            h = (m2 + 1) // 2
            if r + h < m2:
                sh1[t] += sh1[t + h * tile]
                sh2[t] += sh2[t + h * tile]
            cuda.syncthreads()
            m2 = h
        if r == 0 and c < channels:
            part[2 * (b * channels + c)] = sh1[t]
            part[2 * (b * channels + c) + 1] = sh2[t]
        cuda.syncthreads()
        w += cuda.gridDim.x


def finish_sums(
    part, blocks, channels, count, weight, has_weight, mean, invstd, training,
    vec,
):  # fmt: skip
    """Per channel: ``dweight``, ``dbias`` and the coefficients of ``grad``.

    ``vec`` rows: 0 dweight, 1 dbias, 2 mean, 3 negk, 4 mdy, 5 scale.

    ``dx = (dy - mdy) * scale + (x - mean) * negk`` with ``scale = invstd * weight``,
    ``mdy = sum_dy / n`` and ``negk = -scale * invstd * sum_dy_xhat / n`` (training).
    """
    c = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    while c < channels:
        sum_dy = float64(0.0)
        sum_dy_centred = float64(0.0)
        for b in range(blocks):
            sum_dy += part[2 * (b * channels + c)]
            sum_dy_centred += part[2 * (b * channels + c) + 1]
        inv = float64(invstd[c])
        sum_dy_xhat = inv * sum_dy_centred
        a = inv * float64(weight[c]) if has_weight else inv
        vec[0, c] = sum_dy_xhat
        vec[1, c] = sum_dy
        vec[2, c] = mean[c]
        vec[5, c] = a
        if training:
            vec[3, c] = -(a * inv * sum_dy_xhat) / count
            vec[4, c] = sum_dy / count
        else:
            vec[3, c] = 0.0
            vec[4, c] = 0.0
        c += cuda.gridDim.x * cuda.blockDim.x


def grad(dy, x, dx, size, channels, inner, vec):
    """``dx = (dy - mdy[c]) * scale[c] + (x - mean[c]) * negk[c]``, flat, like :func:`affine`.

    ``vec`` as written by :func:`finish_sums`.
    """
    nt = cuda.gridDim.x * cuda.blockDim.x
    i = cuda.blockIdx.x * cuda.blockDim.x + cuda.threadIdx.x
    row = i // inner
    s = i - row * inner
    c = row % channels
    dq = nt // inner
    dr = nt - dq * inner
    dc = dq % channels
    while i < size:
        dx[i] = (dy[i] - vec[4, c]) * vec[5, c] + (x[i] - vec[2, c]) * vec[3, c]
        i += nt
        s += dr
        c += dc
        if s >= inner:
            s -= inner
            c += 1
        if c >= channels:
            c -= channels


#: The kernels' Python source functions, by name (the compile check walks them).
_ALL = (
    stats_planes, stats_rows, finish_stats, prep_eval, affine,
    sums_planes, sums_rows, finish_sums, grad,
)  # fmt: skip
KERNELS: dict[str, Callable[..., None]] = {f.__name__: f for f in _ALL}
_jitted: dict[str, Any] = {}


def _kernel(name: str) -> Any:
    """The numba dispatcher of kernel ``name`` (compiled per argument types on first launch)."""
    kernel = _jitted.get(name)
    if kernel is None:
        # cache=True: compiled kernels persist across processes (in __pycache__ or numba's
        # user-wide cache; gpu-check runs three processes); the simulator ignores it
        try:
            kernel = cuda.jit(KERNELS[name], cache=not simulated())
        except RuntimeError:  # numba: "cannot cache function ...: no locator available"
            kernel = cuda.jit(KERNELS[name])
        _jitted[name] = kernel
    return kernel


# --- arrays: NumPy (simulator), CuPy, torch CUDA ----------------------------------------

_FLOATS = ("float16", "float32", "float64")


def _kind(x: Array) -> str | None:
    """``"cupy"``, ``"torch"`` (CUDA tensors), ``"numpy"`` (simulator only) or None."""
    mod = type(x).__module__.split(".", 1)[0]
    if mod == "cupy":
        return "cupy"
    if mod == "torch":
        return "torch" if x.device.type == "cuda" else None
    if mod == "numpy" and isinstance(x, np.ndarray) and simulated():
        return "numpy"
    return None


def _dtype_name(a: Array) -> str:
    return str(a.dtype).rsplit(".", 1)[-1]


class _Lib:
    """The few array operations the glue needs, for one library (and x's device)."""

    def __init__(self, x: Array) -> None:
        self.kind = _kind(x)
        self.x = x
        if self.kind == "cupy":
            import cupy

            self.xp: Any = cupy
        elif self.kind == "torch":
            import torch

            self.xp = torch
        else:
            self.xp = np

    def device_id(self) -> int:
        return int(self.x.device.id if self.kind == "cupy" else self.x.device.index)

    def device(self) -> Any:
        """A context manager that makes x's device current (for numba and the library).

        Nothing to do when it already is (the common case): numba then uses the primary
        context that the library made current.
        """
        if self.kind == "cupy":
            if self.xp.cuda.runtime.getDevice() == self.device_id():
                return _Both()
            return _Both(self.x.device, cuda.gpus[self.device_id()])
        if self.kind == "torch":
            if self.xp.cuda.current_device() == self.device_id():
                return _Both()
            return _Both(self.xp.cuda.device(self.x.device), cuda.gpus[self.device_id()])
        return _Both()

    def stream(self) -> Any:
        """The caller's current stream as a numba stream (None in the simulator)."""
        if self.kind == "cupy":
            ptr = self.xp.cuda.get_current_stream().ptr
        elif self.kind == "torch":
            ptr = self.xp.cuda.current_stream(self.x.device).cuda_stream
        else:
            return None
        return _external_stream(self.device_id(), int(ptr))

    def empty(self, shape: tuple[int, ...], dtype: str) -> Array:
        if self.kind == "torch":
            return self.xp.empty(shape, dtype=getattr(self.xp, dtype), device=self.x.device)
        return self.xp.empty(shape, dtype=dtype)

    def contiguous(self, a: Array) -> Array:
        if self.kind == "torch":
            return a.detach().contiguous()
        return self.xp.ascontiguousarray(a)

    def is_contiguous(self, a: Array) -> bool:
        if self.kind == "torch":
            return bool(a.is_contiguous())
        return bool(a.flags.c_contiguous)

    def moveaxis(self, a: Array, source: int, dest: int) -> Array:
        if self.kind == "torch":
            return a.movedim(source, dest)
        return self.xp.moveaxis(a, source, dest)

    def flat(self, a: Array) -> Array:
        """A 1-D view of a contiguous array."""
        return a.reshape(-1)

    def copy_into(self, dst: Array, src: Array) -> None:
        if self.kind == "torch":
            dst.copy_(src)
        else:
            dst[...] = src

    def kernel_arg(self, a: Array) -> Array:
        """What numba gets: the array itself (simulator) or its CUDA Array Interface view."""
        if self.kind == "numpy":
            return a
        if self.kind == "torch":
            a = a.detach()
        # sync=False: numba would otherwise synchronise the exporter's stream (a host sync)
        return cuda.as_cuda_array(a, sync=False)


class _Both:
    """Enter several context managers (x's device for the library and for numba)."""

    def __init__(self, *managers: Any) -> None:
        self.managers = managers

    def __enter__(self) -> None:
        for m in self.managers:
            m.__enter__()

    def __exit__(self, *exc: object) -> None:
        for m in reversed(self.managers):
            m.__exit__(*exc)


_streams: dict[tuple[int, int], Any] = {}


def _external_stream(device: int, ptr: int) -> Any:
    """numba's view of the stream handle ``ptr`` on ``device`` (0: the default stream)."""
    if ptr == 0:
        return cuda.default_stream()
    key = (device, ptr)
    stream = _streams.get(key)
    if stream is None:
        stream = _streams[key] = cuda.external_stream(ptr)
    return stream


@dataclass(frozen=True)
class _Layout:
    """x as a flat array: ``(outer, C, inner)`` planes, or ``(outer, C)`` rows (inner 1)."""

    planes: bool
    outer: int
    channels: int
    inner: int
    moved: bool  # the flat array is moveaxis(x, axis, -1) (channels last)

    @property
    def size(self) -> int:
        return self.outer * self.channels * self.inner


def _layout(lib: _Lib, x: Array, axis: int) -> _Layout | None:
    """How x is viewed without a copy, or None if it must be copied to C order."""
    shape = tuple(int(s) for s in x.shape)
    channels = shape[axis]
    if lib.is_contiguous(x):
        outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
        return _Layout(inner > 1, outer, channels, inner, False)
    if lib.is_contiguous(lib.moveaxis(x, axis, -1)):
        return _Layout(False, math.prod(shape) // channels, channels, 1, True)
    return None


def _flat(lib: _Lib, a: Array, layout: _Layout, axis: int) -> Array:
    return lib.flat(lib.moveaxis(a, axis, -1) if layout.moved else a)


def _empty_like_layout(
    lib: _Lib, shape: tuple[int, ...], layout: _Layout, axis: int, dtype: str
) -> tuple[Array, Array]:
    """A new array of ``shape`` in x's memory order, and its flat view."""
    if not layout.moved:
        a = lib.empty(shape, dtype)
        return a, lib.flat(a)
    moved_shape = (*shape[:axis], *shape[axis + 1 :], shape[axis])
    m = lib.empty(moved_shape, dtype)
    return lib.moveaxis(m, -1, axis), lib.flat(m)


def _compute_dtype(dtype: str) -> str:
    return "float64" if dtype == "float64" else "float32"


def _chunks(layout: _Layout, launch: Launch) -> tuple[int, int, int]:
    """``(tile, blocks per channel or tile, grid)`` for the reductions."""
    threads = launch.threads
    if layout.planes:
        tile, units, per_chunk = 1, layout.channels, threads * launch.min_per_thread
        values = layout.outer * layout.inner
    else:
        tile = min(layout.channels, threads)
        units = -(-layout.channels // tile)
        per_chunk = (threads // tile) * launch.min_per_thread
        values = layout.outer
    blocks = max(1, min(-(-launch.target_blocks // units), values // per_chunk))
    return tile, blocks, max(1, min(units * blocks, launch.max_blocks))


def _grid(n: int, launch: Launch) -> int:
    return max(1, min(-(-n // launch.threads), launch.max_blocks))


def _launcher(lib: _Lib, launch: Launch) -> Callable[..., None]:
    stream = lib.stream()

    seen: dict[int, tuple[Array, Any]] = {}  # id -> (array, its numba view): one view each

    def arg(a: Any) -> Any:
        if not hasattr(a, "shape"):
            return a
        hit = seen.get(id(a))
        if hit is None:  # keep `a` referenced, so that its id is not reused within the call
            hit = seen[id(a)] = (a, lib.kernel_arg(a))
        return hit[1]

    def run(name: str, grid: int, *args: Any) -> None:
        kernel = _kernel(name)
        conv = [arg(a) for a in args]
        if stream is None:
            kernel[grid, launch.threads](*conv)
        else:
            kernel[grid, launch.threads, stream](*conv)

    return run


# --- the fast path ------------------------------------------------------------------------


def supports(x: Array, *others: Array | None) -> bool:
    """float16/32/64 CuPy arrays and torch CUDA tensors (NumPy arrays in the simulator)."""
    if not AVAILABLE or _kind(x) is None or x.ndim < 2 or math.prod(x.shape) == 0:
        return False
    if _dtype_name(x) not in _FLOATS:
        return False
    return all(a is None or _dtype_name(a) in _FLOATS for a in others)


def _prepare(lib: _Lib, x: Array, axis: int) -> tuple[Array, _Layout]:
    layout = _layout(lib, x, axis)
    if layout is None:
        x = lib.contiguous(x)
        layout = _layout(lib, x, axis)
        assert layout is not None
    return x, layout


def _forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    var_estimator: str = "unbiased",
    launch: Launch | None = None,
) -> tuple[Array, ...]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``; arguments validated.

    ``axis`` is non-negative. ``mean`` and ``invstd`` are in the compute dtype
    (float32 for float16 x), the running statistics in their own dtypes; the running
    variance accumulates ``M2 / (n - 1)`` (unbiased) or ``M2 / n`` (biased).
    """
    launch = launch or DEFAULT_LAUNCH
    lib = _Lib(x)
    with lib.device():
        x, layout = _prepare(lib, x, axis)
        run = _launcher(lib, launch)
        dtype = _dtype_name(x)
        cdt = _compute_dtype(dtype)
        channels = layout.channels
        y, yflat = _empty_like_layout(lib, tuple(int(s) for s in x.shape), layout, axis, dtype)
        xflat = _flat(lib, x, layout, axis)
        vec = lib.empty((5, channels), cdt)  # mean, invstd, centre, scale, shift
        dummy = lib.empty((1,), cdt)  # stands in for a missing vector (never read)
        w = dummy if weight is None else lib.contiguous(weight)
        b = dummy if bias is None else lib.contiguous(bias)
        vgrid = _grid(channels, launch)
        new_rm, new_rv = running_mean, running_var
        if training:
            tile, blocks, grid = _chunks(layout, launch)
            part = lib.empty((2 * blocks * channels,), "float64")
            if layout.planes:
                run("stats_planes", grid, xflat, layout.outer, channels, layout.inner, blocks, part)
            else:
                run("stats_rows", grid, xflat, layout.outer, channels, tile, blocks, part)
            has_running = running_mean is not None and running_var is not None
            if has_running:
                assert running_mean is not None and running_var is not None
                rm, rv = lib.contiguous(running_mean), lib.contiguous(running_var)
                new_rm = lib.empty((channels,), _dtype_name(running_mean))
                new_rv = lib.empty((channels,), _dtype_name(running_var))
            else:
                rm = rv = new_rm_k = new_rv_k = dummy
            run(
                "finish_stats", vgrid,
                xflat, layout.inner if layout.planes else 1, part, blocks, channels,
                float(layout.outer * layout.inner), float(eps), float(momentum),
                1.0 if var_estimator == "unbiased" else 0.0,
                w, b, weight is not None, bias is not None,
                rm, rv, has_running, vec,
                new_rm if has_running else new_rm_k, new_rv if has_running else new_rv_k,
            )  # fmt: skip
        else:
            assert running_mean is not None and running_var is not None
            run(
                "prep_eval", vgrid,
                lib.contiguous(running_mean), lib.contiguous(running_var), w, b,
                weight is not None, bias is not None, channels, float(eps), vec,
            )  # fmt: skip
        run(
            "affine", _grid(layout.size, launch),
            xflat, yflat, layout.size, channels, layout.inner, vec, 2, 3, 4,
        )  # fmt: skip
    return y, vec[0], vec[1], new_rm, new_rv


def _backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool,
    axis: int,
    launch: Launch | None = None,
) -> tuple[Array, Array, Array]:
    """``(dx, dweight, dbias)``; dx in x's dtype, the sums in the compute dtype."""
    launch = launch or DEFAULT_LAUNCH
    lib = _Lib(x)
    with lib.device():
        x, layout = _prepare(lib, x, axis)
        shape = tuple(int(s) for s in x.shape)
        if not lib.is_contiguous(lib.moveaxis(dy, axis, -1) if layout.moved else dy):
            like, _ = _empty_like_layout(lib, shape, layout, axis, _dtype_name(dy))
            lib.copy_into(like, dy)
            dy = like
        run = _launcher(lib, launch)
        dtype = _dtype_name(x)
        cdt = _compute_dtype(dtype)
        channels = layout.channels
        dx, dxflat = _empty_like_layout(lib, shape, layout, axis, dtype)
        xflat = _flat(lib, x, layout, axis)
        dyflat = _flat(lib, dy, layout, axis)
        mean = lib.contiguous(mean)
        invstd = lib.contiguous(invstd)
        dummy = lib.empty((1,), cdt)
        w = dummy if weight is None else lib.contiguous(weight)
        tile, blocks, grid = _chunks(layout, launch)
        part = lib.empty((2 * blocks * channels,), "float64")
        if layout.planes:
            run("sums_planes", grid, dyflat, xflat, mean, layout.outer, channels, layout.inner,
                blocks, part)  # fmt: skip
        else:
            run("sums_rows", grid, dyflat, xflat, mean, layout.outer, channels, tile, blocks, part)
        vec = lib.empty((6, channels), cdt)  # dweight, dbias, mean, negk, mdy, scale
        run(
            "finish_sums", _grid(channels, launch),
            part, blocks, channels, float(layout.outer * layout.inner), w, weight is not None,
            mean, invstd, training, vec,
        )  # fmt: skip
        egrid = _grid(layout.size, launch)
        if training:
            run("grad", egrid, dyflat, xflat, dxflat, layout.size, channels, layout.inner, vec)
        else:  # dx = dy * scale: affine with centre mdy = 0, scale, shift negk = 0
            run("affine", egrid, dyflat, dxflat, layout.size, channels, layout.inner, vec, 4, 5, 3)
    return dx, vec[0], vec[1]


# --- compile check (a real compiler, no GPU needed) -------------------------------------


def signatures(dtype: str) -> dict[str, tuple[Any, ...]]:
    """The argument types of every kernel for x of ``dtype`` (vectors in the compute dtype)."""
    from numba import types

    def arr(name: str) -> Any:
        return types.Array(getattr(types, name), 1, "C")

    x, a, f64 = arr(dtype), arr(_compute_dtype(dtype)), arr("float64")
    v = types.Array(getattr(types, _compute_dtype(dtype)), 2, "C")
    i, f, b = types.int64, types.float64, types.boolean
    return {
        "stats_planes": (x, i, i, i, i, f64),
        "stats_rows": (x, i, i, i, i, f64),
        "finish_stats": (x, i, f64, i, i, f, f, f, f, a, a, b, b, a, a, b, v, a, a),
        "prep_eval": (a, a, a, a, b, b, i, f, v),
        "affine": (x, x, i, i, i, v, i, i, i),
        "sums_planes": (x, x, a, i, i, i, i, f64),
        "sums_rows": (x, x, a, i, i, i, i, f64),
        "finish_sums": (f64, i, i, f, a, b, a, a, b, v),
        "grad": (x, x, x, i, i, i, v),
    }


def compile_ptx(cc: tuple[int, int], dtypes: tuple[str, ...] = _FLOATS) -> dict[str, str]:
    """PTX of every kernel for compute capability ``cc``, keyed ``name[dtype]``.

    Uses NVVM through numba-cuda (no GPU needed; not under the simulator).
    """
    if simulated():
        raise RuntimeError("compile_ptx needs the real numba-cuda target, not the simulator")
    out = {}
    for dtype in dtypes:
        for name, sig in signatures(dtype).items():
            ptx, _ = cuda.compile_ptx(KERNELS[name], sig, cc=cc)
            out[f"{name}[{dtype}]"] = ptx
    return out


# --- the entry points: a toolchain that cannot compile falls back to the generic path -------

_broken: str | None = None


def _toolchain_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "numba-cuda cannot compile or launch here" (no NVVM, NVRTC, driver)."""
    from numba.cuda.cudadrv import error

    names = ("NvvmSupportError", "NvrtcSupportError", "CudaSupportError")
    errors: list[type[BaseException]] = [getattr(error, n) for n in names if hasattr(error, n)]
    try:
        from cuda.pathfinder import DynamicLibNotFoundError

        errors.append(DynamicLibNotFoundError)
    except ImportError:
        pass
    return tuple(errors)


_probed = False


def _probe_kernel(out: Any) -> None:  # compiled by _probe: one store, nothing of anybn's
    out[0] = 1.0


def _probe() -> str | None:
    """Compile and launch a one-store kernel once: why numba-cuda is unusable here, or None.

    An install whose numba-cuda does not match NumPy (numba-cuda 0.30 with NumPy 2.5 raises
    AttributeError while it builds its CUDA target) or lacks NVVM, NVRTC or a driver fails
    here with whatever it raises, before any of anybn's kernels is compiled; afterwards only
    the toolchain's own errors count as "unusable", so a defect in anybn's kernels is not
    hidden behind the generic path.
    """
    try:
        out = cuda.device_array(1, dtype=np.float32)
        cuda.jit(_probe_kernel)[1, 1](out)
        cuda.synchronize()
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


def _mark_broken(reason: str) -> None:
    global _broken
    _broken = reason
    warnings.warn(
        f"anybn: the CUDA kernels cannot be compiled here ({reason}); GPU arrays take "
        "the generic array-API path (install a numba-cuda matching this NumPy and CUDA, "
        "with its cu12/cu13 extra)",
        RuntimeWarning,
        stacklevel=5,
    )


def _guarded(run: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``run(...)``, or None (the generic path) once the toolchain has proven unusable."""
    global _probed
    if _broken is not None:
        return None
    if not _probed:
        _probed = True
        reason = _probe()
        if reason is not None:
            _mark_broken(reason)
            return None
    try:
        return run(*args, **kwargs)
    except _toolchain_errors() as exc:
        _mark_broken(f"{type(exc).__name__}: {exc}")
        return None


def forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    var_estimator: str = "unbiased",
    launch: Launch | None = None,
) -> tuple[Array, ...] | None:
    """``(y, mean, invstd, new_running_mean, new_running_var)``; arguments validated.

    ``axis`` is non-negative. ``mean`` and ``invstd`` are in the compute dtype
    (float32 for float16 x), the running statistics in their own dtypes. None
    (the generic path) when numba-cuda's toolchain (NVVM, NVRTC, driver) is unusable.
    """
    return _guarded(
        _forward, x, running_mean, running_var, weight, bias,
        training=training, momentum=momentum, eps=eps, axis=axis,
        var_estimator=var_estimator, launch=launch,
    )  # fmt: skip


def backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool,
    axis: int,
    launch: Launch | None = None,
) -> tuple[Array, Array, Array] | None:
    """``(dx, dweight, dbias)``; dx in x's dtype, the sums in the compute dtype (or None)."""
    return _guarded(
        _backward, dy, x, weight, mean, invstd, training=training, axis=axis, launch=launch
    )


# --- the kernel protocol -------------------------------------------------------------------

NAME = "numba_cuda"
FAST = True


def accepts(call: Call, x: Array) -> bool:
    """CuPy arrays and torch CUDA tensors, one channel axis, no mask, with numba-cuda."""
    if not (AVAILABLE and call.plain):
        return False
    if compat.is_torch_array(x):
        return bool(x.is_cuda)
    return compat.is_cupy_array(x)


def _served(arrays: tuple[Array | None, ...]) -> bool:
    """Whether these kernels serve the arrays of a call.

    Torch tensors that autograd tracks (or that torch.func transforms) stay on the
    generic path: autograd traces it.
    """
    x = arrays[0] if arrays[0] is not None else arrays[1]
    if compat.is_torch_array(x):
        import torch

        from .torch_cpu import torch_transformed

        if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arrays):
            return False
        if torch_transformed(arrays):
            return False
    present = [a for a in arrays if a is not None]
    return supports(present[0], *present[1:])


def run_forward(
    call: Call,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
) -> BatchNormOutput | None:
    """:func:`forward` on a resolved call, or None where these kernels do not serve x."""
    args = (x, running_mean, running_var, weight, bias)
    if not _served(args):
        return None
    out = forward(
        *args, training=call.training, momentum=call.momentum, eps=call.eps,
        axis=call.axis, var_estimator=call.var_estimator,  # type: ignore[arg-type]
    )  # fmt: skip
    # None: the toolchain is unusable here, the next kernel in the list computes.
    return None if out is None else BatchNormOutput(*out)


def run_backward(
    call: Call, dy: Array, x: Array, weight: Array | None, mean: Array, invstd: Array
) -> BatchNormGrads | None:
    """:func:`backward` on a resolved call, or None where these kernels do not serve x."""
    args = (dy, x, weight, mean, invstd)
    if not _served(args):
        return None
    grads = backward(*args, training=call.training, axis=call.axis)  # type: ignore[arg-type]
    return None if grads is None else BatchNormGrads(*grads)
