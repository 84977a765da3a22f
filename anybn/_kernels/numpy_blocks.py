"""The CPU fast path: cache-blocked, multi-threaded batch norm on NumPy arrays.

The generic array-API core makes one whole-array pass per operation, so a
forward+backward reads and writes x-sized arrays about fifteen times. Here the
same formulas run block by block: x is viewed without a copy as ``(P, C, S)``
(``S > 1``, "planes", the NC... layout) or ``(P, C)`` ("rows", channels last),
cut into blocks of about :data:`BLOCK` values that stay in the core's L2
cache, and every operation on a block reads what the previous one wrote while
it is still in cache. Memory then sees

* forward (train): read x for the statistics, read x and write y;
* backward (train): read x and dy for the sums, read them again and write dx;

and the blocks are shared among :func:`num_threads` threads (NumPy releases
the GIL inside its loops and BLAS calls).

Statistics are per block and exact in the same way as :mod:`anybn._core.stats`:
each block is centred on its own first-pass mean ``m1_r`` (the corrected
two-pass algorithm inside the cache), and the blocks' ``(n_r, mean_r, M2_r)``
are merged in float64 with Chan's formula, the means kept as ``m1_r`` plus a
small correction so that nothing cancels::

    delta_r = (m1_r - m1_0) + corr_r            # mean_r - m1_0, exactly
    dmean   = sum_r n_r delta_r / n
    M2      = sum_r M2_r + sum_r n_r (delta_r - dmean)^2
    mean    = m1_0 + dmean

The output is then ``y = (x - m1_r) * scale + (bias - (mean - m1_r) * scale)``,
centred on data that has not cancelled. Every partial sum has a fixed place
in a ``(rows, C)`` table, so results do not depend on the number of threads.

Reductions are fused multiply-reduces that never materialise a product:
``matmul`` with a ones vector for sums and ``vecdot``/``einsum`` for dot
products, on the contiguous axis.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from .._core.outputs import BatchNormGrads, BatchNormOutput
from .pool import (
    _executor,
    _memory_order,
    _quiet,
    _quietly,
    get_num_threads,
    native_order,
    set_num_threads,
)

if TYPE_CHECKING:
    from .._call import Call

__all__ = [
    "BLOCK",
    "backward",
    "forward",
    "get_num_threads",
    "set_num_threads",
    "supports",
]

NAME = "numpy_blocks"
FAST = True

#: Values per block, for planes and for rows. A block, its output and one or
#: two scratch blocks should stay in a core's L2 cache (2 MiB here), yet blocks
#: must not be so small that the threads queue for the GIL between NumPy calls:
#: measured best on a 2-core Sapphire Rapids (asv_benchmarks/ and docs/benchmarks.md).
BLOCK = {"planes": 1 << 18, "rows": 1 << 17}

#: Below this many values the work runs on the calling thread only.
PARALLEL_MIN = 1 << 18

_FLOATS = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_NUMPY2 = int(np.__version__.split(".", 1)[0]) >= 2


# --- layout and blocks --------------------------------------------------------------------


@dataclass(frozen=True)
class _Plan:
    """How x is viewed and cut: the canonical view, its blocks and their rows.

    ``blocks[i] = (row, index, channels)``: ``view[index]`` is the block (3-D for
    planes, 2-D for rows) and its per-channel partials go to
    ``table[row, channels]``. ``counts[row]`` is the number of values per channel
    that a row's blocks reduce.
    """

    planes: bool
    shape: tuple[int, ...]  # (P, C, S) or (P, C)
    moved: bool  # rows of np.moveaxis(x, axis, -1) rather than of x itself
    axis: int
    blocks: tuple[tuple[int, tuple[slice, ...], slice], ...]
    counts: np.ndarray
    max_block: int  # values in the largest block
    bufsize: int  # NumPy ufunc buffer size for per-channel broadcasts (0: default)

    @property
    def channels(self) -> int:
        return self.shape[1]

    def view(self, a: np.ndarray) -> np.ndarray:
        """The canonical view of an array laid out like x (never a copy)."""
        if self.moved:
            a = np.moveaxis(a, self.axis, -1)
        v = a.reshape(self.shape)
        assert np.shares_memory(v, a) or a.size == 0
        return v

    def empty(self, x_shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        """A new array of x's shape laid out like x, so that :meth:`view` is a view."""
        if not self.moved:
            return np.empty(x_shape, dtype=dtype)
        moved_shape = (*x_shape[: self.axis], *x_shape[self.axis + 1 :], x_shape[self.axis])
        return np.moveaxis(np.empty(moved_shape, dtype=dtype), -1, self.axis)

    def same_layout(self, a: np.ndarray) -> bool:
        """Whether :meth:`view` of ``a`` is a view."""
        if self.moved:
            return bool(np.moveaxis(a, self.axis, -1).flags.c_contiguous)
        return bool(a.flags.c_contiguous)


def _make_plan(x: np.ndarray, axis: int, block: int | None) -> _Plan | None:
    shape = tuple(int(s) for s in x.shape)
    channels = shape[axis]
    if x.flags.c_contiguous:
        moved = False
        outer, inner = math.prod(shape[:axis]), math.prod(shape[axis + 1 :])
    elif np.moveaxis(x, axis, -1).flags.c_contiguous:
        moved = True
        outer, inner = x.size // channels, 1
    else:
        return None
    if block is None:
        # Each thread holds up to six block-sized buffers (scratch and tiles): keep them
        # well under x's size, so temporary memory stays below one x.
        block = min(BLOCK["planes" if inner > 1 else "rows"], max(4096, x.size // 16))
    blocks: list[tuple[int, tuple[slice, ...], slice]] = []
    counts: list[int] = []
    everything = slice(None)
    if inner > 1:  # planes (P, C, S)
        plane = channels * inner
        if plane <= block:
            b = max(1, block // plane)
            for p0 in range(0, outer, b):
                blocks.append(
                    (len(counts), (slice(p0, p0 + b), everything, everything), everything)
                )
                counts.append(min(b, outer - p0) * inner)
        elif inner <= block:
            cb = max(1, block // inner)
            for p in range(outer):
                for c0 in range(0, channels, cb):
                    cs = slice(c0, c0 + cb)
                    blocks.append((p, (slice(p, p + 1), cs, everything), cs))
                counts.append(inner)
        else:
            for p in range(outer):
                for c in range(channels):
                    cs = slice(c, c + 1)
                    row = p * math.ceil(inner / block)
                    for j, s0 in enumerate(range(0, inner, block)):
                        blocks.append((row + j, (slice(p, p + 1), cs, slice(s0, s0 + block)), cs))
            counts = [min(block, inner - s0) for _ in range(outer) for s0 in range(0, inner, block)]
        view_shape: tuple[int, ...] = (outer, channels, inner)
        # NumPy buffers a stride-0 operand whose rows are shorter than its ufunc
        # buffer (8192), which makes x - mean[:, None] three times slower than
        # x - scalar; a buffer no longer than a row avoids it.
        bufsize = 0
        if _NUMPY2 and 256 <= inner < 8192:
            bufsize = 1 << (inner.bit_length() - 1)
    else:  # rows (P, C)
        if channels <= block:
            b = max(1, block // channels)
            if b > 16:
                b -= b % 16  # so that _widen can split every full block
            for p0 in range(0, outer, b):
                blocks.append((len(counts), (slice(p0, p0 + b), everything), everything))
                counts.append(min(b, outer - p0))
        else:
            for p in range(outer):
                for c0 in range(0, channels, block):
                    cs = slice(c0, c0 + block)
                    blocks.append((p, (slice(p, p + 1), cs), cs))
                counts.append(1)
        view_shape = (outer, channels)
        bufsize = 0
    return _Plan(
        planes=inner > 1,
        shape=view_shape,
        moved=moved,
        axis=axis,
        blocks=tuple(blocks),
        counts=np.asarray(counts, dtype=np.float64),
        max_block=max(_block_size(view_shape, index) for _, index, _ in blocks[:1]),
        bufsize=bufsize,
    )


def supports(x: Any) -> bool:
    """Whether ``x`` is an array the CPU fast path handles (a float NumPy array)."""
    return type(x) is np.ndarray and x.dtype in _FLOATS and x.size > 0


# --- per-block reductions and the parallel loop -------------------------------------------


#: float16's smallest normal value: below it, float16 values are subnormal.
HALF_TINY = float(np.finfo(np.float16).tiny)
#: Rounds a float32 of magnitude below HALF_TINY to float16's subnormal grid (2^-24):
#: in [0.5, 1) float32's spacing is 2^-24, so (v + 0.75) - 0.75 is v rounded to a multiple
#: of 2^-24, ties to even (0.75 is an even multiple), as a float16 cast rounds it.
_SUBNORMAL_GRID = np.float32(0.75)


def _store_half(u: np.ndarray, out: np.ndarray) -> None:
    """``out[...] = u`` (float32 to float16), without the cost of inexact subnormal results.

    Converting a float32 that is not exactly a float16 subnormal into one (or rounding it
    to zero) takes a microcode assist on x86 CPUs: a block of such values converted 16-25x
    slower than a block of normal ones (a backward with ``dy = ones`` gives such blocks:
    its exact dx is zero, its computed dx rounding noise). Where a strided sample of the
    block finds many, they are first rounded to float16's grid in float32 arithmetic
    (exact results convert at full speed); the bits are those of the plain conversion.
    ``u`` (float32 scratch) is overwritten.
    """
    flat = u.reshape(-1)
    probe = np.abs(flat[:: max(1, flat.size // 64)])
    if np.count_nonzero((probe < HALF_TINY) & (probe != 0)) * 8 > probe.size:
        small = np.abs(u) < HALF_TINY
        rounded = np.copysign((u + _SUBNORMAL_GRID) - _SUBNORMAL_GRID, u)
        np.copyto(u, rounded, where=small)
    np.copyto(out, u, casting="same_kind")


class _Scratch:
    """One thread's scratch blocks (compute dtype) and per-channel vectors laid out per block.

    For planes a vector ``v`` becomes the column ``v[cs, None]``; NumPy runs
    ``block - column`` at the speed of ``block - scalar``. For rows it becomes a
    contiguous *tile*, the vector repeated over a block's rows: NumPy's
    ``block - v`` with a broadcast row is about 1.5x slower than with a full
    operand, so each thread builds its tiles once per pass.
    """

    def __init__(self, plan: _Plan, dtype: np.dtype, count: int, vectors: Sequence[np.ndarray]):
        size = plan.max_block
        self._bufs = [np.empty(size, dtype=dtype) for _ in range(count)]
        self.planes = plan.planes
        if plan.planes:
            self._vectors = [v[:, None] for v in vectors]
            self._tiles: list[np.ndarray] = []
        else:
            rows = size // plan.channels if size >= plan.channels else 1
            self._vectors = list(vectors)
            self._tiles = [np.broadcast_to(v, (rows, v.shape[0])).copy() for v in vectors]

    def like(self, i: int, shape: tuple[int, ...]) -> np.ndarray:
        """Scratch block ``i`` with ``shape``."""
        return self._bufs[i][: math.prod(shape)].reshape(shape)

    def vector(self, i: int, v: np.ndarray, cs: slice) -> np.ndarray:
        """Vector ``i`` shaped to combine with block ``v`` of channels ``cs``."""
        if self.planes:
            return self._vectors[i][cs]
        tile = self._tiles[i]
        if tile.shape[1] != v.shape[1]:  # a block of some channels of one row
            return self._vectors[i][cs]
        return tile[: v.shape[0]]


def _widen(v: np.ndarray) -> np.ndarray:
    """A rows block ``(b, C)`` as ``(b / k, k, C)`` with ``k * C`` about 1024.

    NumPy adds rows one after the other down each column, so a float32 column sum
    of b rows is off by up to ~b ulps (1.7e-5 relative measured for 2048 rows of
    data offset by 1e5, whose rounding errors do not cancel). Summing ``k``
    interleaved partial columns keeps the chains ``b / k`` long and the inner loop
    ``k * C`` wide, which is also faster for few channels.
    """
    b, c = v.shape
    k = 1 << max(0, (1024 // c).bit_length() - 1) if c < 1024 else 1
    while k > 1 and b % k:
        k //= 2
    return v.reshape(b // k, k, c)


def _csum(v: np.ndarray) -> np.ndarray:
    """Per-channel sum of a block: over axes (0, 2) of planes, axis 0 of rows.

    ``einsum`` rather than ``matmul`` with a ones vector: both run at memory
    speed on one thread, but BLAS calls from several threads serialise.
    """
    if v.ndim == 3:
        return np.einsum("cs->c", v[0]) if v.shape[0] == 1 else np.einsum("pcs->c", v)
    w = _widen(v)
    return np.einsum("pkc->kc", w).sum(axis=0) if w.shape[1] > 1 else np.einsum("pc->c", v)


def _cdot(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-channel ``sum(a * b)`` of two blocks, without forming ``a * b``."""
    if a.ndim == 3:
        if a.shape[0] == 1:
            return np.einsum("cs,cs->c", a[0], b[0])
        return np.einsum("pcs,pcs->c", a, b)
    wa = _widen(a)
    if wa.shape[1] == 1:
        return np.einsum("pc,pc->c", a, b)
    return np.einsum("pkc,pkc->kc", wa, b.reshape(wa.shape)).sum(axis=0)


def _run(
    plan: _Plan,
    dtype: np.dtype,
    nbuf: int,
    work: Callable[..., None],
    vectors: Sequence[np.ndarray] = (),
) -> None:
    """Call ``work(row, index, channels, scratch)`` for every block, on the threads.

    ``vectors`` are the per-channel vectors the blocks combine with, served by
    :meth:`_Scratch.vector`.
    """
    blocks = plan.blocks
    size = math.prod(plan.shape)
    pool, threads = _executor() if size >= PARALLEL_MIN and len(blocks) > 1 else (None, 1)
    nthreads = min(threads, len(blocks))

    def chunk(part: Sequence[tuple[int, tuple[slice, ...], slice]]) -> None:
        scratch = _Scratch(plan, dtype, nbuf, vectors)
        with _quiet():  # error state is per thread: the workers need it too
            if plan.bufsize:
                np.setbufsize(plan.bufsize)
            for row, index, cs in part:
                work(row, index, cs, scratch)

    if nthreads <= 1:
        chunk(blocks)
        return
    bounds = [len(blocks) * i // nthreads for i in range(nthreads + 1)]
    parts = [blocks[bounds[i] : bounds[i + 1]] for i in range(nthreads)]
    assert pool is not None
    futures: list[Future[None]] = [pool.submit(chunk, part) for part in parts[1:]]
    try:
        chunk(parts[0])
    finally:
        for f in futures:
            f.result()


def _block_size(shape: tuple[int, ...], index: tuple[slice, ...]) -> int:
    """The number of values in ``view[index]`` for a view of ``shape``."""
    return math.prod(len(range(*sl.indices(n))) for sl, n in zip(index, shape, strict=True))


# --- small inputs: one block, no plan, no threads -------------------------------------------

#: Inputs of at most this many values skip the blocking machinery: a few
#: whole-array operations cost less than planning blocks.
SMALL = 1 << 15


def _small_view(a: np.ndarray, axis: int, dtype: np.dtype) -> np.ndarray:
    """``a`` as a C-ordered ``(P, C, S)`` array in ``dtype`` (a copy only if needed)."""
    shape = a.shape
    a = np.ascontiguousarray(a, dtype=dtype)
    return a.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def _denominator(count: float, var_estimator: str) -> float:
    """The running variance's denominator: ``n - 1`` (unbiased) or ``n`` (biased)."""
    return count - 1 if var_estimator == "unbiased" else count


def _small_forward(
    x: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    var_estimator: str = "unbiased",
) -> tuple[Any, ...]:
    # Whole-array operations in the compute dtype (float32 for float16), the
    # per-channel arithmetic in float64: few calls, for the per-call overhead.
    cdt = np.dtype(np.float32) if x.dtype == np.float16 else x.dtype
    v = _small_view(x, axis, cdt)
    count = v.shape[0] * v.shape[2]
    if training:
        m1 = np.einsum("pcs->c", v) / count
        d = v - m1[:, None]
        corr = np.einsum("pcs->c", d, dtype=np.float64) / count
        m2 = np.maximum(np.einsum("pcs,pcs->c", d, d, dtype=np.float64) - count * corr * corr, 0)
        mean64 = m1 + corr
        invstd64 = 1.0 / np.sqrt(m2 / count + eps)
    else:
        assert running_mean is not None and running_var is not None
        d = v - np.asarray(running_mean, dtype=cdt)[:, None]
        corr = 0.0
        mean64 = running_mean.astype(np.float64)
        invstd64 = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    scale64 = invstd64 if weight is None else invstd64 * weight
    shift64 = -corr * scale64 if bias is None else bias - corr * scale64
    d *= scale64.astype(cdt)[:, None]
    d += np.broadcast_to(shift64, (d.shape[1],)).astype(cdt)[:, None]
    y = d.reshape(x.shape).astype(x.dtype, copy=False)
    new_rm, new_rv = running_mean, running_var
    if training and running_mean is not None and running_var is not None:
        new_rm = ((1.0 - momentum) * running_mean + momentum * mean64).astype(running_mean.dtype)
        batch_var = m2 / _denominator(count, var_estimator)
        new_rv = ((1.0 - momentum) * running_var + momentum * batch_var).astype(running_var.dtype)
    return y, mean64.astype(cdt), invstd64.astype(cdt), new_rm, new_rv


def _small_backward(
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    mean: np.ndarray,
    invstd: np.ndarray,
    training: bool,
    axis: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    cdt = np.dtype(np.float32) if x.dtype == np.float16 else x.dtype
    v = _small_view(x, axis, cdt)
    g = _small_view(dy, axis, cdt)
    count = v.shape[0] * v.shape[2]
    d = v - mean.astype(cdt, copy=False)[:, None]
    sum_dy = np.einsum("pcs->c", g, dtype=np.float64)
    invstd64 = invstd.astype(np.float64)
    sum_dy_xhat = invstd64 * np.einsum("pcs,pcs->c", g, d, dtype=np.float64)
    scale64 = invstd64 if weight is None else invstd64 * weight
    if training:
        d *= ((scale64 * invstd64 * sum_dy_xhat) / -count).astype(cdt)[:, None]
        t = g - (sum_dy / count).astype(cdt)[:, None]
        t *= scale64.astype(cdt)[:, None]
        d += t
    else:
        d = g * scale64.astype(cdt)[:, None]
    dx = d.reshape(x.shape).astype(x.dtype, copy=False)
    return dx, sum_dy_xhat.astype(cdt), sum_dy.astype(cdt)


# --- forward and backward -----------------------------------------------------------------


#: Data within this many standard deviations of zero (``|mean| * invstd``) is
#: normalized as ``x * scale + shift`` and differentiated without forming
#: ``x - mean``: one pass fewer per block, at most ~2 * RATIO ulps of y lost to
#: cancellation. Farther from zero (large offsets), the exact centred forms run.
RATIO = 8.0


def _near_zero(mean64: np.ndarray, invstd64: np.ndarray) -> bool:
    return bool(np.max(np.abs(mean64) * invstd64, initial=0.0) <= RATIO)


def _f64(a: np.ndarray | None) -> np.ndarray | None:
    return None if a is None else np.asarray(a, dtype=np.float64)


@_quietly
def forward(
    x: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
    var_estimator: str = "unbiased",
    block: int | None = None,
) -> tuple[Any, ...]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``.

    Arguments are validated by the caller; ``axis`` is non-negative; the running
    variance accumulates ``M2 / (n - 1)`` (``var_estimator="unbiased"``) or
    ``M2 / n`` (``"biased"``). y is laid
    out in memory like x wherever x is a permutation of a C-ordered array
    (channels-last, transposed), at no cost: the kernels run on x's axes in
    memory order.
    """
    perm = _memory_order(x)
    if perm is not None:
        out = forward(
            x.transpose(perm), running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=eps, axis=perm.index(axis),
            var_estimator=var_estimator, block=block,
        )  # fmt: skip
        return (out[0].transpose(np.argsort(perm)), *out[1:])
    if x.size <= SMALL:
        return _small_forward(
            x, running_mean, running_var, weight, bias, training, momentum, eps, axis,
            var_estimator,
        )  # fmt: skip
    plan = _make_plan(x, axis, block)
    if plan is None:
        x = np.ascontiguousarray(x)
        plan = _make_plan(x, axis, block)
        assert plan is not None
    cdt = np.dtype(np.float32) if x.dtype == np.float16 else x.dtype
    half = cdt != x.dtype
    xv = plan.view(x)
    y = plan.empty(tuple(x.shape), x.dtype)
    yv = plan.view(y)
    channels = plan.channels
    w64 = _f64(weight)
    b64 = _f64(bias)

    if training:
        rows = len(plan.counts)
        m1 = np.empty((rows, channels), dtype=cdt)
        s1 = np.empty((rows, channels), dtype=cdt)
        q = np.empty((rows, channels), dtype=cdt)

        def stats(row: int, index: tuple[slice, ...], cs: slice, s: _Scratch) -> None:
            v = xv[index]
            if half:
                v32 = s.like(1, v.shape)
                np.copyto(v32, v)
                v = v32
            n = v.size // v.shape[1]
            m = _csum(v)
            m /= n
            d = s.like(0, v.shape)
            np.subtract(v, m[:, None] if v.ndim == 3 else m, out=d)
            m1[row, cs] = m
            s1[row, cs] = _csum(d)
            q[row, cs] = _cdot(d, d)

        _run(plan, cdt, 2, stats)
        counts = plan.counts[:, None]
        total = float(plan.counts.sum())
        m1_64 = m1.astype(np.float64)
        s1_64 = s1.astype(np.float64)
        ref = m1_64[0]
        delta = (m1_64 - ref) + s1_64 / counts
        dmean = (counts * delta).sum(axis=0) / total
        m2 = (q.astype(np.float64) - s1_64 * s1_64 / counts).sum(axis=0)
        m2 += (counts * (delta - dmean) ** 2).sum(axis=0)
        m2 = np.maximum(m2, 0.0)
        mean64 = ref + dmean
        var64 = m2 / total
        invstd64 = 1.0 / np.sqrt(var64 + eps)
        scale64 = invstd64 if w64 is None else invstd64 * w64
        # y = (x - m1_0) * scale + bias - (mean - m1_0) * scale, where x - m1_0 is
        # exact for data near its mean and mean - m1_0 = dmean is known in float64
        centre = m1[0]
        shift64 = -dmean * scale64
        if b64 is not None:
            shift64 += b64
    else:
        assert running_mean is not None and running_var is not None
        mean64 = np.asarray(running_mean, dtype=np.float64)
        invstd64 = 1.0 / np.sqrt(np.asarray(running_var, dtype=np.float64) + eps)
        scale64 = invstd64 if w64 is None else invstd64 * w64
        shift64 = np.zeros(channels) if b64 is None else b64
        centre = np.asarray(running_mean, dtype=cdt)

    if not half and _near_zero(mean64, invstd64):
        # |mean| <= RATIO / invstd: x * scale + (shift - mean * scale) loses at most
        # ~2 * RATIO ulps of y to cancellation, and saves a pass over each block.
        shift64 = shift64 - centre.astype(np.float64) * scale64

        def normalize(row: int, index: tuple[slice, ...], cs: slice, s: _Scratch) -> None:
            v, out = xv[index], yv[index]
            np.multiply(v, s.vector(0, v, cs), out=out)
            np.add(out, s.vector(1, v, cs), out=out)

        vectors: tuple[np.ndarray, ...] = (scale64.astype(cdt), shift64.astype(cdt))
    else:

        def normalize(row: int, index: tuple[slice, ...], cs: slice, s: _Scratch) -> None:
            v, out = xv[index], yv[index]
            d = s.like(0, v.shape) if half else out
            np.subtract(v, s.vector(0, v, cs), out=d)
            np.multiply(d, s.vector(1, v, cs), out=d)
            if half:
                np.add(d, s.vector(2, v, cs), out=d)
                _store_half(d, out)
            else:
                np.add(d, s.vector(2, v, cs), out=out)

        vectors = (centre, scale64.astype(cdt), shift64.astype(cdt))
    _run(plan, cdt, 1, normalize, vectors)

    mean = mean64.astype(cdt)
    invstd = invstd64.astype(cdt)
    new_rm, new_rv = running_mean, running_var
    if training and running_mean is not None and running_var is not None:
        total = float(plan.counts.sum())
        batch_var = m2 / _denominator(total, var_estimator)
        rm64 = np.asarray(running_mean, dtype=np.float64)
        rv64 = np.asarray(running_var, dtype=np.float64)
        new_rm = ((1.0 - momentum) * rm64 + momentum * mean64).astype(running_mean.dtype)
        new_rv = ((1.0 - momentum) * rv64 + momentum * batch_var).astype(running_var.dtype)
    return y, mean, invstd, new_rm, new_rv


@_quietly
def backward(
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    mean: np.ndarray,
    invstd: np.ndarray,
    *,
    training: bool,
    axis: int,
    block: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dweight, dbias)``; arguments validated by the caller; dx laid out like x."""
    perm = _memory_order(x)
    if perm is not None:
        dx, dweight, dbias = backward(
            dy.transpose(perm), x.transpose(perm), weight, mean, invstd,
            training=training, axis=perm.index(axis), block=block,
        )  # fmt: skip
        return dx.transpose(np.argsort(perm)), dweight, dbias
    if x.size <= SMALL:
        return _small_backward(dy, x, weight, mean, invstd, training, axis)
    plan = _make_plan(x, axis, block)
    if plan is None:
        x = np.ascontiguousarray(x)
        plan = _make_plan(x, axis, block)
        assert plan is not None
    if not plan.same_layout(dy):
        dy_like = plan.empty(tuple(x.shape), dy.dtype)
        np.copyto(dy_like, dy)
        dy = dy_like
    cdt = np.dtype(np.float32) if x.dtype == np.float16 else x.dtype
    half = cdt != x.dtype or cdt != dy.dtype
    xv, dyv = plan.view(x), plan.view(dy)
    dx = plan.empty(tuple(x.shape), x.dtype)
    dxv = plan.view(dx)
    channels = plan.channels
    rows = len(plan.counts)
    mean_c = np.asarray(mean, dtype=cdt)
    sdy = np.empty((rows, channels), dtype=cdt)
    q = np.empty((rows, channels), dtype=cdt)

    mean64 = np.asarray(mean, dtype=np.float64)
    invstd64 = np.asarray(invstd, dtype=np.float64)
    # Near zero, sum(dy * (x - mean)) = sum(dy * x) - mean * sum(dy) and
    # dx = dy * scale + x * negk + const lose at most ~2 * RATIO ulps and save a
    # pass per block (see RATIO); elsewhere x - mean is formed exactly.
    near = not half and _near_zero(mean64, invstd64)

    def sums(row: int, index: tuple[slice, ...], cs: slice, s: _Scratch) -> None:
        v, g = xv[index], dyv[index]
        if half:
            g32 = s.like(1, g.shape)
            np.copyto(g32, g)
            g = g32
        sdy[row, cs] = _csum(g)
        if near:
            q[row, cs] = _cdot(g, v)
            return
        d = s.like(0, v.shape)
        np.subtract(v, s.vector(0, v, cs), out=d)
        q[row, cs] = _cdot(g, d)

    _run(plan, cdt, 2, sums, (mean_c,))
    total = float(plan.counts.sum())
    sum_dy = sdy.astype(np.float64).sum(axis=0)
    sum_dy_centred = q.astype(np.float64).sum(axis=0)
    if near:
        sum_dy_centred -= mean64 * sum_dy
    sum_dy_xhat = invstd64 * sum_dy_centred
    scale64 = invstd64 if weight is None else invstd64 * np.asarray(weight, dtype=np.float64)
    scale = scale64.astype(cdt)

    if training and near:
        negk64 = -(scale64 * invstd64 * sum_dy_xhat) / total
        const64 = -negk64 * mean64 - scale64 * (sum_dy / total)

        def grad(row: int, index: tuple[slice, ...], cs: slice, s: _Scratch) -> None:
            v, g, out = xv[index], dyv[index], dxv[index]
            t = s.like(1, v.shape)
            np.multiply(g, s.vector(0, v, cs), out=t)
            np.multiply(v, s.vector(1, v, cs), out=out)
            np.add(out, t, out=out)
            np.add(out, s.vector(2, v, cs), out=out)

        vectors: tuple[np.ndarray, ...] = (scale, negk64.astype(cdt), const64.astype(cdt))
    elif training:
        negk = (-(scale64 * invstd64 * sum_dy_xhat) / total).astype(cdt)
        mdy = (sum_dy / total).astype(cdt)

        def grad(row: int, index: tuple[slice, ...], cs: slice, s: _Scratch) -> None:
            v, g, out = xv[index], dyv[index], dxv[index]
            d = s.like(0, v.shape)
            np.subtract(v, s.vector(0, v, cs), out=d)
            np.multiply(d, s.vector(1, v, cs), out=d)
            t = s.like(1, v.shape)
            np.subtract(g, s.vector(2, v, cs), out=t)
            np.multiply(t, s.vector(3, v, cs), out=t)
            if out.dtype == np.float16:
                np.add(d, t, out=d)
                _store_half(d, out)
            else:
                np.add(d, t, out=out, casting="same_kind")

        vectors = (mean_c, negk, mdy, scale)
    else:

        def grad(row: int, index: tuple[slice, ...], cs: slice, s: _Scratch) -> None:
            np.multiply(
                dyv[index], s.vector(0, dyv[index], cs), out=dxv[index], casting="same_kind"
            )

        vectors = (scale,)
    _run(plan, cdt, 2, grad, vectors)
    return dx, sum_dy_xhat.astype(cdt), sum_dy.astype(cdt)


# --- the kernel protocol -------------------------------------------------------------------


def accepts(call: Call, x: Any) -> bool:
    """NumPy arrays, one channel axis, no mask."""
    return type(x) is np.ndarray and call.plain


def run_forward(
    call: Call,
    x: np.ndarray,
    running_mean: np.ndarray | None,
    running_var: np.ndarray | None,
    weight: np.ndarray | None,
    bias: np.ndarray | None,
) -> BatchNormOutput | None:
    """:func:`forward` on a resolved call, or None where these kernels do not serve x."""
    x = native_order(x)
    if not supports(x):
        return None
    out = forward(
        x, running_mean, running_var, weight, bias,
        training=call.training, momentum=call.momentum, eps=call.eps,
        axis=call.axis, var_estimator=call.var_estimator,  # type: ignore[arg-type]
    )  # fmt: skip
    return BatchNormOutput(*out)


def run_backward(
    call: Call,
    dy: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray | None,
    mean: np.ndarray,
    invstd: np.ndarray,
) -> BatchNormGrads | None:
    """:func:`backward` on a resolved call, or None where these kernels do not serve x."""
    x, dy = native_order(x), native_order(dy)
    if not (supports(x) and supports(dy)):
        return None
    return BatchNormGrads(
        *backward(dy, x, weight, mean, invstd, training=call.training, axis=call.axis)  # type: ignore[arg-type]
    )
