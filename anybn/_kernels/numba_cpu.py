"""The compiled CPU fast path: Numba kernels for float16/32/64 NumPy arrays and CPU tensors.

Optional: used when Numba is installed (``pip install anybn[numba]``) and
``ANYBN_NUMBA`` is not ``0``; without it :mod:`anybn._kernels.numpy_blocks` serves the
same arrays. The kernels read and write memory the minimum number of times:

* forward, training: one pass reads x for the statistics, one reads x and writes y;
* backward: one pass reads x and dy for the two sums, one reads them and writes dx.

x is viewed without a copy as ``(P, C, S)`` in memory order (``S > 1``:
"planes", the NC... layout; ``S == 1``: "rows", channels last or (N, C)).

float16, which Numba lacks on the CPU, reaches the kernels as its bits (``uint16``
views); they read every element through ``read`` and write through ``written``
(:mod:`anybn._kernels.half`: exact conversions, identities for float32/float64), so
one source serves every dtype. The float16 arithmetic is float32 (as the NumPy
kernels' compute dtype), the statistics float64 like the others', and y and dx are
rounded once to float16; the statistics returned are float32. bfloat16 torch tensors
reach the kernels the same way, as ``int16`` views of their bits.

Numerics (anybn's rules, DESIGN.md): statistics are a *shifted single pass*. Every
value of a channel is shifted by the channel's first value (the pivot ``k``),
``d = x - k``, and ``sum(d)`` and ``sum(d * d)`` are accumulated in float64 per
work item, so that ``mean = k + sum(d) / n`` and ``M2 = sum(d^2) - sum(d)^2 / n``
lose about ``(mean - k)^2 / var`` ulps of float64 only, nothing for data that is
not wildly spread, however large its offset. The work items have a fixed place
in a partial-sum table that is reduced in a fixed order, so results do not
depend on the number of threads. y is ``(x - centre) * scale + shift`` in the
compute dtype with ``centre`` the mean rounded to it and ``shift = bias - (mean -
centre) * scale`` (no cancellation on offset data); the backward's ``sum(dy)``
and ``sum(dy * (x - mean))`` accumulate in float64.

The reductions are compiled with ``fastmath={"reassoc", "contract"}`` only (the
float64 sums vectorise; NaN and inf keep their meaning, so a non-finite value
stays in its channel). Small inputs run in one compiled call on the calling thread;
large ones share each pass's work items among anybn's worker threads
(:func:`anybn._kernels.set_num_threads`, the pool of :mod:`anybn._kernels.numpy_blocks`), the
compiled code running without the GIL. Not Numba's own ``parallel=True`` threads:
OpenMP workers spin between calls and, beside torch's, slowed a shared 2-core
machine by up to 40x; anybn's pool sleeps.
"""

from __future__ import annotations

import math
import os
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._core.outputs import BatchNormGrads, BatchNormOutput
from .pool import (
    _executor,
    _memory_order,
    _quietly,
    get_num_threads,
    native_order,
    tbb_layer,
    tbb_threads,
)

if TYPE_CHECKING:
    from .._call import Call

__all__ = ["AVAILABLE", "PARALLEL_MIN", "backward", "forward", "supports"]

NAME = "numba_cpu"
FAST = True


def _import_numba() -> Any:
    if os.environ.get("ANYBN_NUMBA", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    try:
        import numba
    except ImportError:
        return None
    return numba


numba = _import_numba()

#: Whether the compiled kernels are available (Numba installed, ``ANYBN_NUMBA`` not 0).
AVAILABLE = numba is not None

#: Inputs with at least this many values share their passes among the Python pool's threads
#: (where Numba's TBB layer is missing: tens of microseconds a pass).
PARALLEL_MIN = 1 << 18

#: Values per work item of a reduction (a block that stays in L1/L2 while it is read).
CHUNK = 1 << 14

#: Rows inputs (channels last, (N, C)) of at most this many values, which the caches hold,
#: reduce four rows a sweep (a quarter of the partial-sum loads and stores: 1.7x faster
#: at (64, 4096)); larger ones one row a sweep, which streams from memory faster (four
#: interleaved rows took 1.7-2.1x as long at (25088, 128) and (6272, 384), AMD Zen 3).
FOUR_ROWS_MAX = 1 << 19

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))
_HALF = np.dtype(np.float16)
#: bfloat16, which NumPy lacks: torch's bfloat16 tensors reach the kernels as their bits
#: (``int16`` views, :mod:`anybn._kernels.torch_cpu`), never a caller's NumPy array
#: (:func:`supports` takes floats only).
_BF16 = np.dtype(np.int16)
_BITS = (_HALF, _BF16)

#: Inputs with at least this many values split their passes among threads on Numba's TBB
#: layer (a few microseconds a pass); :data:`PARALLEL_MIN` with the Python pool.
TBB_MIN = 1 << 16

if numba is not None:
    from numba import prange

    from .half import read, written
else:  # pragma: no cover - the kernels are plain Python then, never called
    prange = range  # type: ignore[misc]


def supports(x: Any) -> bool:
    """Whether the compiled kernels serve ``x``: a non-empty float16/32/64 NumPy array."""
    return (
        AVAILABLE
        and type(x) is np.ndarray
        and (x.dtype in _FLOATS or x.dtype == _HALF)
        and x.size > 0
    )


def _compute_dtype(dt: np.dtype) -> np.dtype:
    """The dtype of the elementwise arithmetic and of the statistics: float32 for float16."""
    return np.dtype(np.float32) if dt in _BITS else dt


def _raw(a: np.ndarray) -> np.ndarray:
    """What the kernels get: float16 as its bits (a ``uint16`` view, see :mod:`.half`);
    bfloat16 bits (``int16``) and floats as they are."""
    return a.view(np.uint16) if a.dtype == _HALF else a


def _jit(fn: Any) -> Any:
    """Compile lazily on first call, cached on disk, GIL released (the pool threads run it)."""
    if numba is None:
        return fn
    return numba.njit(
        fastmath={"reassoc", "contract"}, nogil=True, cache=True, error_model="numpy"
    )(fn)


def _jit_exact(fn: Any) -> Any:
    """:func:`_jit` without fast-math: the per-channel arithmetic between the passes, and the
    functions that call the passes. With contraction allowed there, whether ``a * b + c``
    became one fused multiply-add depended on where LLVM inlined the arithmetic, and even on
    whether the caller came from Numba's disk cache (the running mean of float64 input
    differed in its last bit). The passes keep their own fast-math flags when inlined."""
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, error_model="numpy")(fn)


def _jit_parallel(fn: Any) -> Any:
    """:func:`_jit_exact` with Numba's parallel loops (``prange``), run on its TBB layer."""
    if numba is None:
        return fn
    return numba.njit(nogil=True, cache=True, error_model="numpy", parallel=True)(fn)


# --- kernels ----------------------------------------------------------------------------------
# x, dy, y, dx are (P, C, S) views; S == 1 is the rows layout, whose loops run over the
# contiguous channel axis. A reduction's work items are (plane, channel, chunk of CHUNK values)
# for planes and blocks of ``rows`` rows for rows; each writes its partial sums to a fixed
# place of a table that ``*_finish`` reduces serially in a fixed order, so results do not
# depend on how the items are shared among threads. Elementwise items: (plane, channel) or
# blocks of rows. ``i0:i1`` is the range of items a call runs.


@_jit
def _items(x, chunk, rows):  # pragma: no cover - compiled
    """(reduction items, elementwise items) of the (P, C, S) view x."""
    p_, c_, s_ = x.shape
    if s_ > 1:
        return p_ * c_ * ((s_ + chunk - 1) // chunk), p_ * c_
    nb = (p_ + rows - 1) // rows
    return nb, nb


@_jit
def _place(item, c_, k_):  # pragma: no cover - compiled
    """(plane, channel, chunk) of a planes item; the loops then step with :func:`_step`."""
    return item // (c_ * k_), (item // k_) % c_, item % k_


@_jit
def _step(p, c, k, c_, k_):  # pragma: no cover - compiled
    """The next item's (plane, channel, chunk): no integer divisions (~20 cycles each) per item."""
    k += 1
    if k == k_:
        k = 0
        c += 1
        if c == c_:
            c = 0
            p += 1
    return p, c, k


@_jit
def _stats(x, chunk, rows, i0, i1, s1, s2):  # pragma: no cover - compiled
    """Partial sum(x - k) and sum((x - k)^2), k = the channel's first value, in float64."""
    p_, c_, s_ = x.shape
    if s_ > 1:
        k_ = (s_ + chunk - 1) // chunk
        p, c, k = _place(i0, c_, k_)
        for item in range(i0, i1):
            piv = np.float64(read(x[0, c, 0]))
            xs = x[p, c, k * chunk : min(s_, (k + 1) * chunk)]  # 1-D slices vectorise best
            t1 = 0.0
            t2 = 0.0
            for s in range(xs.shape[0]):
                d = np.float64(read(xs[s])) - piv
                t1 += d
                t2 += d * d
            s1[item] = t1
            s2[item] = t2
            p, c, k = _step(p, c, k, c_, k_)
    else:
        x2 = x.reshape(p_, c_)  # S == 1; 1-D rows of a C-ordered view vectorise
        four = p_ * c_ <= FOUR_ROWS_MAX
        t1 = np.empty(c_)
        t2 = np.empty(c_)
        piv = np.empty(c_)
        for c in range(c_):
            piv[c] = read(x[0, c, 0])
        for blk in range(i0, i1):
            t1[:] = 0.0
            t2[:] = 0.0
            r, r1 = blk * rows, min(p_, (blk + 1) * rows)
            while four and r + 4 <= r1:  # four rows a sweep: a quarter of the table traffic
                xa, xb, xc, xd = x2[r], x2[r + 1], x2[r + 2], x2[r + 3]
                for c in range(c_):
                    k = piv[c]
                    da = np.float64(read(xa[c])) - k
                    db = np.float64(read(xb[c])) - k
                    dc = np.float64(read(xc[c])) - k
                    dd = np.float64(read(xd[c])) - k
                    t1[c] += (da + db) + (dc + dd)
                    t2[c] += (da * da + db * db) + (dc * dc + dd * dd)
                r += 4
            for rr in range(r, r1):
                xr = x2[rr]
                for c in range(c_):
                    d = np.float64(read(xr[c])) - piv[c]
                    t1[c] += d
                    t2[c] += d * d
            for c in range(c_):
                s1[blk * c_ + c] = t1[c]
                s2[blk * c_ + c] = t2[c]


@_jit_exact
def _reduce(shape, chunk, s1, s2):  # pragma: no cover - compiled
    """Per-channel totals of a partial-sum table, in a fixed order."""
    p_, c_, s_ = shape
    a = np.zeros(c_)
    q = np.zeros(c_)
    if s_ > 1:
        k_ = (s_ + chunk - 1) // chunk
        for p in range(p_):
            for c in range(c_):
                for k in range(k_):
                    i = (p * c_ + c) * k_ + k
                    a[c] += s1[i]
                    q[c] += s2[i]
    else:
        for blk in range(s1.shape[0] // c_):
            for c in range(c_):
                a[c] += s1[blk * c_ + c]
                q[c] += s2[blk * c_ + c]
    return a, q


@_jit_exact
def _forward_finish(x, w, b, rm, rv, training, momentum, eps, ddof, chunk, s1, s2,
                    mean_out, invstd_out, rm_out, rv_out, vec):  # fmt: skip  # pragma: no cover
    """Statistics, running statistics and the per-channel (centre, scale, shift) in ``vec``.

    The running variance accumulates ``M2 / (n - ddof)``: 1 unbiased, 0 biased.
    """
    p_, c_, s_ = x.shape
    n = p_ * s_
    mean = np.empty(c_)
    invstd = np.empty(c_)
    if training:
        a, q = _reduce(x.shape, chunk, s1, s2)
        for c in range(c_):
            dmean = a[c] / n
            m2 = q[c] - a[c] * dmean
            if m2 < 0.0:
                m2 = 0.0
            mean[c] = np.float64(read(x[0, c, 0])) + dmean
            invstd[c] = 1.0 / np.sqrt(m2 / n + eps)
            if rm.shape[0] > 0:
                rm_out[c] = (1.0 - momentum) * np.float64(rm[c]) + momentum * mean[c]
                rv_out[c] = (1.0 - momentum) * np.float64(rv[c]) + momentum * (m2 / (n - ddof))
    else:
        for c in range(c_):
            mean[c] = rm[c]
            invstd[c] = 1.0 / np.sqrt(np.float64(rv[c]) + eps)
    for c in range(c_):
        scale = invstd[c] * (np.float64(w[c]) if w.shape[0] > 0 else 1.0)
        vec[0, c] = mean[c]  # the centre: the mean rounded to the compute dtype
        vec[1, c] = scale
        shift = -(mean[c] - np.float64(vec[0, c])) * scale
        vec[2, c] = shift + (np.float64(b[c]) if b.shape[0] > 0 else 0.0)
        mean_out[c] = mean[c]
        invstd_out[c] = invstd[c]


@_jit
def _affine(x, vec, rows, i0, i1, y):  # pragma: no cover - compiled
    """y = (x - centre) * scale + shift."""
    p_, c_, s_ = x.shape
    if s_ > 1:
        p, c, _ = _place(i0, c_, 1)
        for _item in range(i0, i1):
            m = vec[0, c]
            sc = vec[1, c]
            sh = vec[2, c]
            xs, ys = x[p, c], y[p, c]
            for s in range(s_):
                ys[s] = written(ys, (read(xs[s]) - m) * sc + sh)
            p, c, _ = _step(p, c, 0, c_, 1)
    else:
        for blk in range(i0, i1):
            for r in range(blk * rows, min(p_, (blk + 1) * rows)):
                for c in range(c_):
                    y[r, c, 0] = written(y, (read(x[r, c, 0]) - vec[0, c]) * vec[1, c] + vec[2, c])


@_jit
def _sums(dy, x, mean_in, chunk, rows, i0, i1, s1, s2):  # pragma: no cover - compiled
    """Partial sum(dy) and sum(dy * (x - mean)), in float64."""
    p_, c_, s_ = x.shape
    mean = np.empty(c_)
    for c in range(c_):
        mean[c] = mean_in[c]
    if s_ > 1:
        k_ = (s_ + chunk - 1) // chunk
        p, c, k = _place(i0, c_, k_)
        for item in range(i0, i1):
            m = mean[c]
            lo, hi = k * chunk, min(s_, (k + 1) * chunk)
            xs, gs = x[p, c, lo:hi], dy[p, c, lo:hi]
            t1 = 0.0
            t2 = 0.0
            for s in range(xs.shape[0]):
                g = np.float64(read(gs[s]))
                t1 += g
                t2 += g * (np.float64(read(xs[s])) - m)
            s1[item] = t1
            s2[item] = t2
            p, c, k = _step(p, c, k, c_, k_)
    else:
        x2 = x.reshape(p_, c_)  # S == 1; 1-D rows of a C-ordered view vectorise
        g2 = dy.reshape(p_, c_)
        four = p_ * c_ <= FOUR_ROWS_MAX
        t1 = np.empty(c_)
        t2 = np.empty(c_)
        for blk in range(i0, i1):
            t1[:] = 0.0
            t2[:] = 0.0
            r, r1 = blk * rows, min(p_, (blk + 1) * rows)
            while four and r + 4 <= r1:  # four rows a sweep (see _stats)
                xa, xb, xc, xd = x2[r], x2[r + 1], x2[r + 2], x2[r + 3]
                ga, gb, gc, gd = g2[r], g2[r + 1], g2[r + 2], g2[r + 3]
                for c in range(c_):
                    m = mean[c]
                    a = np.float64(read(ga[c]))
                    b = np.float64(read(gb[c]))
                    e = np.float64(read(gc[c]))
                    f = np.float64(read(gd[c]))
                    t1[c] += (a + b) + (e + f)
                    pa = a * (np.float64(read(xa[c])) - m)
                    pb = b * (np.float64(read(xb[c])) - m)
                    pc = e * (np.float64(read(xc[c])) - m)
                    pd = f * (np.float64(read(xd[c])) - m)
                    t2[c] += (pa + pb) + (pc + pd)
                r += 4
            for rr in range(r, r1):
                xr = x2[rr]
                gr = g2[rr]
                for c in range(c_):
                    g = np.float64(read(gr[c]))
                    t1[c] += g
                    t2[c] += g * (np.float64(read(xr[c])) - mean[c])
            for c in range(c_):
                s1[blk * c_ + c] = t1[c]
                s2[blk * c_ + c] = t2[c]


@_jit_exact
def _backward_finish(x, w, mean_in, invstd_in, training, chunk, s1, s2,
                     dw_out, db_out, vec):  # fmt: skip  # pragma: no cover - compiled
    """dweight, dbias and the per-channel (centre, negk, mean dy, scale) in ``vec``."""
    p_, c_, s_ = x.shape
    n = p_ * s_
    a, q = _reduce(x.shape, chunk, s1, s2)
    for c in range(c_):
        invstd = np.float64(invstd_in[c])
        scale = invstd * (np.float64(w[c]) if w.shape[0] > 0 else 1.0)
        sum_dy_xhat = invstd * q[c]
        dw_out[c] = sum_dy_xhat
        db_out[c] = a[c]
        vec[0, c] = mean_in[c]
        vec[1, c] = -(scale * invstd * sum_dy_xhat) / n if training else 0.0
        vec[2, c] = a[c] / n if training else 0.0
        vec[3, c] = scale


@_jit
def _grad_planes(dy, x, vec, i0, i1, dx):  # pragma: no cover - compiled
    """The training dx of planes items (no branch in the item loop: one cost LLVM 2x here)."""
    _, c_, s_ = x.shape
    p, c, _ = _place(i0, c_, 1)
    for _item in range(i0, i1):
        m = vec[0, c]
        k = vec[1, c]
        g = vec[2, c]
        sc = vec[3, c]
        xs, gs, dxs = x[p, c], dy[p, c], dx[p, c]
        for s in range(s_):
            dxs[s] = written(dxs, (read(xs[s]) - m) * k + (read(gs[s]) - g) * sc)
        p, c, _ = _step(p, c, 0, c_, 1)


@_jit
def _grad(dy, x, vec, rows, training, i0, i1, dx):  # pragma: no cover - compiled
    """dx = (x - mean) * negk + (dy - mean(dy)) * scale in training, dy * scale in eval."""
    p_, c_, s_ = x.shape
    if s_ > 1 and training:
        _grad_planes(dy, x, vec, i0, i1, dx)
    elif s_ > 1:
        p, c, _ = _place(i0, c_, 1)
        for _item in range(i0, i1):
            sc = vec[3, c]
            gs, dxs = dy[p, c], dx[p, c]
            for s in range(s_):
                dxs[s] = written(dxs, read(gs[s]) * sc)
            p, c, _ = _step(p, c, 0, c_, 1)
    else:
        for blk in range(i0, i1):
            for r in range(blk * rows, min(p_, (blk + 1) * rows)):
                if training:
                    for c in range(c_):
                        v = (read(x[r, c, 0]) - vec[0, c]) * vec[1, c]
                        v += (read(dy[r, c, 0]) - vec[2, c]) * vec[3, c]
                        dx[r, c, 0] = written(dx, v)
                else:
                    for c in range(c_):
                        dx[r, c, 0] = written(dx, read(dy[r, c, 0]) * vec[3, c])


@_jit_exact
def _forward_serial(x, w, b, rm, rv, training, momentum, eps, ddof, chunk, rows,
                    rm_out, rv_out, y, stats):  # fmt: skip  # pragma: no cover - compiled
    """The whole forward on the calling thread, for small inputs: y, and ``(mean, invstd)``
    in ``stats``. One compiled call, which allocates its own tables (returning arrays
    would cost more: each is boxed for Python)."""
    c_ = x.shape[1]
    nr, ne = _items(x, chunk, rows)
    table = nr if x.shape[2] > 1 else nr * c_
    s1 = np.empty(table)
    s2 = np.empty(table)
    if training:
        _stats(x, chunk, rows, 0, nr, s1, s2)
    vec = np.empty((3, c_), stats.dtype)
    _forward_finish(x, w, b, rm, rv, training, momentum, eps, ddof, chunk, s1, s2,
                    stats[0], stats[1], rm_out, rv_out, vec)  # fmt: skip
    _affine(x, vec, rows, 0, ne, y)


@_jit_exact
def _backward_serial(dy, x, w, mean, invstd, training, chunk, rows,
                     dx, grads):  # fmt: skip  # pragma: no cover - compiled
    """The whole backward on the calling thread, for small inputs: dx, and ``(dweight,
    dbias)`` in ``grads``; the tables are allocated here."""
    c_ = x.shape[1]
    nr, ne = _items(x, chunk, rows)
    table = nr if x.shape[2] > 1 else nr * c_
    s1 = np.empty(table)
    s2 = np.empty(table)
    _sums(dy, x, mean, chunk, rows, 0, nr, s1, s2)
    vec = np.empty((4, c_), grads.dtype)
    _backward_finish(x, w, mean, invstd, training, chunk, s1, s2, grads[0], grads[1], vec)
    _grad(dy, x, vec, rows, training, 0, ne, dx)


@_jit_parallel
def _forward_parallel(x, w, b, rm, rv, training, momentum, eps, ddof, chunk, rows,
                      rm_out, rv_out, y, stats, threads):  # fmt: skip  # pragma: no cover
    """:func:`_forward_serial` with each pass split among ``threads`` threads of Numba's
    (TBB) layer: one compiled call, no Python between the passes. The items are those of
    the serial kernels, each writing its own place of the tables, so the bits do not
    depend on the split. Each pass is ``threads`` parts, one a thread (a ``prange`` of
    ``threads`` iterations: at most that many threads take part, whatever Numba's own
    count; calling ``numba.set_num_threads`` here would keep the function out of Numba's
    disk cache). Where the machine has taken a thread away, TBB's calling thread runs the
    part left waiting itself."""
    c_ = x.shape[1]
    nr, ne = _items(x, chunk, rows)
    table = nr if x.shape[2] > 1 else nr * c_
    s1 = np.empty(table)
    s2 = np.empty(table)
    if training:
        parts = min(nr, threads)
        for i in prange(parts):
            _stats(x, chunk, rows, nr * i // parts, nr * (i + 1) // parts, s1, s2)
    vec = np.empty((3, c_), stats.dtype)
    _forward_finish(x, w, b, rm, rv, training, momentum, eps, ddof, chunk, s1, s2,
                    stats[0], stats[1], rm_out, rv_out, vec)  # fmt: skip
    # elementwise: planes, or single rows (no table: any split will do)
    ne, step = (ne, rows) if x.shape[2] > 1 else (x.shape[0], 1)
    parts = min(ne, threads)
    for i in prange(parts):
        _affine(x, vec, step, ne * i // parts, ne * (i + 1) // parts, y)


@_jit_parallel
def _backward_parallel(dy, x, w, mean, invstd, training, chunk, rows,
                       dx, grads, threads):  # fmt: skip  # pragma: no cover - compiled
    """:func:`_backward_serial` with each pass split among ``threads`` threads (see
    :func:`_forward_parallel`)."""
    c_ = x.shape[1]
    nr, ne = _items(x, chunk, rows)
    table = nr if x.shape[2] > 1 else nr * c_
    s1 = np.empty(table)
    s2 = np.empty(table)
    parts = min(nr, threads)
    for i in prange(parts):
        _sums(dy, x, mean, chunk, rows, nr * i // parts, nr * (i + 1) // parts, s1, s2)
    vec = np.empty((4, c_), grads.dtype)
    _backward_finish(x, w, mean, invstd, training, chunk, s1, s2, grads[0], grads[1], vec)
    ne, step = (ne, rows) if x.shape[2] > 1 else (x.shape[0], 1)
    parts = min(ne, threads)
    for i in prange(parts):
        _grad(dy, x, vec, step, training, ne * i // parts, ne * (i + 1) // parts, dx)


def _parallel(fn: Any, items: int, head: tuple[Any, ...], tail: tuple[Any, ...]) -> None:
    """``fn(*head, i0, i1, *tail)`` over ``0:items``, split among the Python pool's threads
    (no GIL held): where Numba's TBB layer is not available."""
    pool, threads = _executor()
    parts = min(threads, items)
    bounds = [items * i // parts for i in range(parts + 1)]
    futures = [pool.submit(fn, *(*head, bounds[i], bounds[i + 1], *tail)) for i in range(1, parts)]
    # The caller's share runs here; results never depend on the split (fixed table places).
    try:
        fn(*head, bounds[0], bounds[1], *tail)
    finally:
        for f in futures:
            f.result()


# --- layout -----------------------------------------------------------------------------------


def _canonical(x: np.ndarray, axis: int) -> tuple[np.ndarray, tuple[int, ...] | None, int]:
    """``(x in memory order, perm or None, axis in it)``; a C-ordered copy if x has no order."""
    perm = _memory_order(x)
    if perm is not None:
        return x.transpose(perm), perm, perm.index(axis)
    if not x.flags.c_contiguous:
        x = np.ascontiguousarray(x)
    return x, None, axis


def _view3(a: np.ndarray, axis: int) -> np.ndarray:
    shape = a.shape
    return a.reshape(math.prod(shape[:axis]), shape[axis], math.prod(shape[axis + 1 :]))


def _rows_per_block(channels: int, itemsize: int) -> int:
    """Rows per reduction item: CHUNK values, and at least ``128 / itemsize`` rows, so that the
    two float64 partial-sum tables (16 bytes a channel an item) stay within 1/8 of x's bytes."""
    return max(1, CHUNK // channels, 128 // itemsize)


class _Layout(NamedTuple):
    """How the kernels see an input: what :func:`_layout` works out once per shape."""

    copy: bool  #: x has no C order under any permutation: the kernels get a C-ordered copy
    perm: tuple[int, ...] | None  #: ``x.transpose(perm)`` is C-ordered (None: x is)
    inverse: tuple[int, ...] | None  #: the permutation back to x's axes
    shape: tuple[int, ...]  #: the C-ordered array's shape
    view: tuple[int, int, int]  #: its ``(P, C, S)`` view (channels in the middle)
    compute: np.dtype  #: the dtype of the statistics and the arithmetic
    half: bool  #: float16 x, which the kernels read as its bits (see _raw; bfloat16 x is)
    rows: int  #: rows per reduction item
    nr: int  #: reduction items
    ne: int  #: elementwise items
    table: int  #: entries of each partial-sum table


#: Layouts by (shape, strides, dtype, axis): small calls skip recomputing them. Bounded:
#: cleared when full.
_LAYOUTS: dict[tuple[Any, ...], _Layout] = {}
_LAYOUTS_MAX = 256


def _layout(x: np.ndarray, axis: int) -> tuple[np.ndarray, _Layout]:
    """``(x in memory order, its layout)``: :func:`_canonical`, :func:`_view3`, tables."""
    key = (x.shape, x.strides, x.dtype, axis)
    lay = _LAYOUTS.get(key)
    if lay is not None:
        if lay.perm is not None:
            return x.transpose(lay.perm), lay
        return (np.ascontiguousarray(x) if lay.copy else x), lay
    xc, perm, ax = _canonical(x, axis)
    v = _view3(xc, ax)
    rows = _rows_per_block(v.shape[1], x.itemsize)
    p_, c_, s_ = v.shape
    if s_ > 1:
        nr = p_ * c_ * ((s_ + CHUNK - 1) // CHUNK)
        ne, table = p_ * c_, nr
    else:
        nr = ne = (p_ + rows - 1) // rows
        table = nr * c_
    inverse = None if perm is None else tuple(int(i) for i in np.argsort(perm))
    lay = _Layout(
        xc is not x and perm is None, perm, inverse, xc.shape, (p_, c_, s_),
        _compute_dtype(x.dtype), x.dtype == _HALF, rows, nr, ne, table,
    )  # fmt: skip
    if len(_LAYOUTS) >= _LAYOUTS_MAX:
        _LAYOUTS.clear()
    _LAYOUTS[key] = lay
    return xc, lay


def _threads(size: int) -> int:
    """How an input of ``size`` values runs: 1 on the calling thread, ``n > 1`` on ``n``
    threads of Numba's TBB layer, 0 on the Python pool's threads."""
    threads = get_num_threads()
    if threads == 1 or size < TBB_MIN:
        return 1
    if tbb_layer():
        return tbb_threads(threads)
    return 1 if size < PARALLEL_MIN else 0


_EMPTY = {dt: np.empty(0, dtype=dt) for dt in (np.float32, np.float64)}


def _vector(a: np.ndarray | None, dt: np.dtype) -> np.ndarray:
    """A per-channel vector for the kernels; None becomes an empty array (the kernels' "absent")."""
    if a is None:
        return _EMPTY[dt.type]
    return a if type(a) is np.ndarray and a.dtype in _FLOATS else np.asarray(a, dtype=dt)


def vectors_serve(*arrays: np.ndarray | None, dtype: np.dtype) -> bool:
    """Whether per-channel arrays reach the kernels as they are: NumPy arrays of ``dtype``
    (float32 or float64), or None (see :func:`forward_laid`)."""
    return dtype in _FLOATS and all(
        a is None or (type(a) is np.ndarray and a.dtype == dtype) for a in arrays
    )


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
    running_out: tuple[np.ndarray, np.ndarray] | None = None,
) -> tuple[Any, ...]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``; y laid out like x.

    The running variance accumulates ``M2 / (n - 1)`` (``var_estimator="unbiased"``)
    or ``M2 / n`` (``"biased"``). With ``running_out`` (two arrays of the running
    statistics' shape and dtype) an update is written there, rounded as by
    ``astype``, and those arrays are returned as the new statistics.
    """
    xc, lay = _layout(x, axis)
    dt = lay.compute
    update = training and running_mean is not None and running_var is not None
    rm = _vector(running_mean if (update or not training) else None, dt)
    rv = _vector(running_var if (update or not training) else None, dt)
    ddof = 1.0 if var_estimator == "unbiased" else 0.0
    out: tuple[np.ndarray, np.ndarray] | None = None
    if update and running_out is not None and vectors_serve(*running_out, dtype=dt):
        out = running_out  # the kernels write the update there (the same rounding as astype)
    elif update:
        out = (np.empty(lay.view[1]), np.empty(lay.view[1]))  # float64, cast below
    y, mean, invstd = forward_laid(
        xc, lay, rm, rv, _vector(weight, dt), _vector(bias, dt),
        training=bool(training), momentum=float(momentum), eps=float(eps), ddof=ddof,
        running_out=out,
    )  # fmt: skip
    new_rm, new_rv = running_mean, running_var
    if out is not None and out is running_out:
        new_rm, new_rv = running_out
    elif out is not None and running_out is not None:
        new_rm, new_rv = running_out
        np.copyto(new_rm, out[0])
        np.copyto(new_rv, out[1])
    elif out is not None:
        assert running_mean is not None and running_var is not None
        new_rm = out[0].astype(running_mean.dtype)
        new_rv = out[1].astype(running_var.dtype)
    return y, mean, invstd, new_rm, new_rv


def forward_laid(
    xc: np.ndarray,
    lay: _Layout,
    rm: np.ndarray,
    rv: np.ndarray,
    w: np.ndarray,
    b: np.ndarray,
    *,
    training: bool,
    momentum: float,
    eps: float,
    ddof: float,
    running_out: tuple[np.ndarray, np.ndarray] | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(y, mean, invstd)`` of x in memory order (``xc, lay = _layout(x, axis)``); y laid out
    like x.

    The per-channel arrays are the kernels' (:func:`_vector`: float32/float64, empty for
    "absent"); ``running_out``, float32 or float64 arrays, receives the running update
    (training only; None: no update). Nothing here needs NumPy's error state: the
    compiled code raises no floating-point warnings and nothing is cast.
    """
    view, compute = lay.view, lay.compute
    v = (xc.view(np.uint16) if lay.half else xc).reshape(view)
    if running_out is None:
        rm_out = rv_out = _EMPTY[np.float64]
        if training:  # (the kernels update where rm_out has the channels)
            rm = rv = _EMPTY[compute.type]
    else:
        rm_out, rv_out = running_out
    y = np.empty(lay.shape, dtype=xc.dtype)
    yv = (y.view(np.uint16) if lay.half else y).reshape(view)
    stats = np.empty((2, view[1]), dtype=compute)
    threads = 1 if xc.size < TBB_MIN else _threads(xc.size)
    if threads == 1:
        _forward_serial(v, w, b, rm, rv, training, momentum, eps, ddof, CHUNK, lay.rows,
                        rm_out, rv_out, yv, stats)  # fmt: skip
    elif threads > 1:
        _forward_parallel(v, w, b, rm, rv, training, momentum, eps, ddof, CHUNK, lay.rows,
                          rm_out, rv_out, yv, stats, threads)  # fmt: skip
    else:
        rows, s1, s2 = lay.rows, np.empty(lay.table), np.empty(lay.table)
        vec = np.empty((3, view[1]), dtype=compute)
        if training:
            _parallel(_stats, lay.nr, (v, CHUNK, rows), (s1, s2))
        _forward_finish(v, w, b, rm, rv, training, momentum, eps, ddof, CHUNK, s1, s2,
                        stats[0], stats[1], rm_out, rv_out, vec)  # fmt: skip
        _parallel(_affine, lay.ne, (v, vec, rows), (yv,))
    if lay.inverse is not None:
        y = y.transpose(lay.inverse)
    return y, stats[0], stats[1]


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
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dweight, dbias)``; dx laid out like x (dy is copied to x's layout if needed)."""
    xc, lay = _layout(x, axis)
    dt = lay.compute
    # dy in x's dtype; beside float16 x a float32/float64 dy is read as it is
    dy_dt = dy.dtype if x.dtype in _BITS and dy.dtype in _FLOATS else x.dtype
    return backward_laid(
        dy_laid(dy, lay, dy_dt), xc, lay, _vector(weight, dt), _vector(mean, dt),
        _vector(invstd, dt), training=bool(training),
    )  # fmt: skip


def dy_laid(dy: np.ndarray, lay: _Layout, dtype: np.dtype) -> np.ndarray:
    """dy in the memory order of x's layout, C-ordered, of ``dtype`` (a copy where needed)."""
    dyc = dy.transpose(lay.perm) if lay.perm is not None else dy
    if not dyc.flags.c_contiguous or dyc.dtype != dtype:
        dyc = np.ascontiguousarray(dyc, dtype=dtype)
    return dyc


def backward_laid(
    dyc: np.ndarray,
    xc: np.ndarray,
    lay: _Layout,
    w: np.ndarray,
    m: np.ndarray,
    s: np.ndarray,
    *,
    training: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(dx, dweight, dbias)`` of x and dy in memory order (:func:`dy_laid`); dx laid out like
    x. The per-channel arrays are the kernels' (:func:`_vector`)."""
    view, compute = lay.view, lay.compute
    v = (xc.view(np.uint16) if lay.half else xc).reshape(view)
    g = (dyc.view(np.uint16) if dyc.dtype == _HALF else dyc).reshape(view)
    dx = np.empty(lay.shape, dtype=xc.dtype)
    dxv = (dx.view(np.uint16) if lay.half else dx).reshape(view)
    grads = np.empty((2, view[1]), dtype=compute)
    threads = 1 if xc.size < TBB_MIN else _threads(xc.size)
    if threads == 1:
        _backward_serial(g, v, w, m, s, training, CHUNK, lay.rows, dxv, grads)
    elif threads > 1:
        _backward_parallel(g, v, w, m, s, training, CHUNK, lay.rows, dxv, grads, threads)
    else:
        rows, s1, s2 = lay.rows, np.empty(lay.table), np.empty(lay.table)
        vec = np.empty((4, view[1]), dtype=compute)
        _parallel(_sums, lay.nr, (g, v, m, CHUNK, rows), (s1, s2))
        _backward_finish(v, w, m, s, training, CHUNK, s1, s2, grads[0], grads[1], vec)
        _parallel(_grad, lay.ne, (g, v, vec, rows, training), (dxv,))
    if lay.inverse is not None:
        dx = dx.transpose(lay.inverse)
    return dx, grads[0], grads[1]


# --- the kernel protocol -------------------------------------------------------------------


def accepts(call: Call, x: Any) -> bool:
    """NumPy arrays, one channel axis, no mask, when Numba is installed."""
    return AVAILABLE and type(x) is np.ndarray and call.plain


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
