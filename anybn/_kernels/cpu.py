"""The compiled CPU fast path: Numba kernels for float32/float64 NumPy arrays and CPU tensors.

Optional: used when Numba is installed (``pip install anybn[numba]``) and
``ANYBN_NUMBA`` is not ``0``; without it :mod:`anybn._numpy_kernels` serves the
same arrays. The kernels read and write memory the minimum number of times:

* forward, training: one pass reads x for the statistics, one reads x and writes y;
* backward: one pass reads x and dy for the two sums, one reads them and writes dx.

x is viewed without a copy as ``(P, C, S)`` in memory order (``S > 1``:
"planes", the NC... layout; ``S == 1``: "rows", channels last or (N, C)).

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
stays in its channel). Small inputs run on the calling thread; large ones on
Numba's threads (:func:`anybn._numpy_kernels.get_num_threads` of them), one
call at a time (a call that finds the threads busy runs serially).
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

import numpy as np

from .._numpy_kernels import _memory_order, _quietly, get_num_threads

__all__ = ["AVAILABLE", "PARALLEL_MIN", "backward", "forward", "supports"]


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

#: Inputs with at least this many values use Numba's threads.
PARALLEL_MIN = 1 << 16

#: Values per work item of a reduction (a block that stays in L1/L2 while it is read).
CHUNK = 1 << 14

_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def supports(x: Any) -> bool:
    """Whether the compiled kernels serve ``x``: a non-empty float32/float64 NumPy array."""
    return AVAILABLE and type(x) is np.ndarray and x.dtype in _FLOATS and x.size > 0


#: The loop that the work items run in: ``range`` here and in the serial kernels,
#: ``numba.prange`` in the parallel ones (:class:`_Compiled` rebinds it).
_range = range


# --- kernels (plain Python, compiled twice: serial ``range`` and parallel ``prange``) -------
# x, dy, y, dx are (P, C, S) views; S == 1 is the rows layout, whose loops run over the
# contiguous channel axis. Partial sums go to a table with a fixed place per work item
# and are reduced serially in a fixed order (results independent of the thread count).


def _forward_kernel(x, w, b, rm, rv, training, momentum, eps, chunk, rows,
                    y, mean_out, invstd_out, rm_out, rv_out, vec):  # fmt: skip  # pragma: no cover
    p_, c_, s_ = x.shape
    n = p_ * s_
    mean = np.empty(c_)
    invstd = np.empty(c_)
    if training:
        a = np.zeros(c_)
        q = np.zeros(c_)
        if s_ > 1:
            k_ = (s_ + chunk - 1) // chunk
            s1 = np.empty((p_, c_, k_))
            s2 = np.empty((p_, c_, k_))
            for item in _range(p_ * c_ * k_):
                p = item // (c_ * k_)
                c = (item // k_) % c_
                k = item % k_
                piv = np.float64(x[0, c, 0])
                t1 = 0.0
                t2 = 0.0
                for s in range(k * chunk, min(s_, (k + 1) * chunk)):
                    d = np.float64(x[p, c, s]) - piv
                    t1 += d
                    t2 += d * d
                s1[p, c, k] = t1
                s2[p, c, k] = t2
            for p in range(p_):
                for c in range(c_):
                    for k in range(k_):
                        a[c] += s1[p, c, k]
                        q[c] += s2[p, c, k]
        else:
            nb = (p_ + rows - 1) // rows
            s1 = np.empty((nb, c_))
            s2 = np.empty((nb, c_))
            for blk in _range(nb):
                t1 = np.zeros(c_)
                t2 = np.zeros(c_)
                piv = np.empty(c_)
                for c in range(c_):
                    piv[c] = x[0, c, 0]
                for r in range(blk * rows, min(p_, (blk + 1) * rows)):
                    for c in range(c_):
                        d = np.float64(x[r, c, 0]) - piv[c]
                        t1[c] += d
                        t2[c] += d * d
                for c in range(c_):
                    s1[blk, c] = t1[c]
                    s2[blk, c] = t2[c]
            for blk in range(nb):
                for c in range(c_):
                    a[c] += s1[blk, c]
                    q[c] += s2[blk, c]
        for c in range(c_):
            dmean = a[c] / n
            m2 = q[c] - a[c] * dmean
            if m2 < 0.0:
                m2 = 0.0
            mean[c] = np.float64(x[0, c, 0]) + dmean
            invstd[c] = 1.0 / np.sqrt(m2 / n + eps)
            if rm.shape[0] > 0:
                rm_out[c] = (1.0 - momentum) * np.float64(rm[c]) + momentum * mean[c]
                rv_out[c] = (1.0 - momentum) * np.float64(rv[c]) + momentum * (m2 / (n - 1))
    else:
        for c in range(c_):
            mean[c] = rm[c]
            invstd[c] = 1.0 / np.sqrt(np.float64(rv[c]) + eps)
    for c in range(c_):
        scale = invstd[c] * (np.float64(w[c]) if w.shape[0] > 0 else 1.0)
        vec[0, c] = mean[c]  # the centre, mean rounded to x's dtype
        vec[1, c] = scale
        shift = -(mean[c] - np.float64(vec[0, c])) * scale
        vec[2, c] = shift + (np.float64(b[c]) if b.shape[0] > 0 else 0.0)
        mean_out[c] = mean[c]
        invstd_out[c] = invstd[c]
    if s_ > 1:
        for item in _range(p_ * c_):
            p = item // c_
            c = item % c_
            m = vec[0, c]
            sc = vec[1, c]
            sh = vec[2, c]
            for s in range(s_):
                y[p, c, s] = (x[p, c, s] - m) * sc + sh
    else:
        for blk in _range((p_ + rows - 1) // rows):
            for r in range(blk * rows, min(p_, (blk + 1) * rows)):
                for c in range(c_):
                    y[r, c, 0] = (x[r, c, 0] - vec[0, c]) * vec[1, c] + vec[2, c]


def _backward_kernel(dy, x, w, mean_in, invstd_in, training, chunk, rows,
                     dx, dw_out, db_out, vec):  # fmt: skip  # pragma: no cover
    p_, c_, s_ = x.shape
    n = p_ * s_
    mean = np.empty(c_)
    for c in range(c_):
        mean[c] = mean_in[c]
    a = np.zeros(c_)
    q = np.zeros(c_)
    if s_ > 1:
        k_ = (s_ + chunk - 1) // chunk
        s1 = np.empty((p_, c_, k_))
        s2 = np.empty((p_, c_, k_))
        for item in _range(p_ * c_ * k_):
            p = item // (c_ * k_)
            c = (item // k_) % c_
            k = item % k_
            m = mean[c]
            t1 = 0.0
            t2 = 0.0
            for s in range(k * chunk, min(s_, (k + 1) * chunk)):
                g = np.float64(dy[p, c, s])
                t1 += g
                t2 += g * (np.float64(x[p, c, s]) - m)
            s1[p, c, k] = t1
            s2[p, c, k] = t2
        for p in range(p_):
            for c in range(c_):
                for k in range(k_):
                    a[c] += s1[p, c, k]
                    q[c] += s2[p, c, k]
    else:
        nb = (p_ + rows - 1) // rows
        s1 = np.empty((nb, c_))
        s2 = np.empty((nb, c_))
        for blk in _range(nb):
            t1 = np.zeros(c_)
            t2 = np.zeros(c_)
            for r in range(blk * rows, min(p_, (blk + 1) * rows)):
                for c in range(c_):
                    g = np.float64(dy[r, c, 0])
                    t1[c] += g
                    t2[c] += g * (np.float64(x[r, c, 0]) - mean[c])
            for c in range(c_):
                s1[blk, c] = t1[c]
                s2[blk, c] = t2[c]
        for blk in range(nb):
            for c in range(c_):
                a[c] += s1[blk, c]
                q[c] += s2[blk, c]
    for c in range(c_):
        invstd = np.float64(invstd_in[c])
        scale = invstd * (np.float64(w[c]) if w.shape[0] > 0 else 1.0)
        sum_dy_xhat = invstd * q[c]
        dw_out[c] = sum_dy_xhat
        db_out[c] = a[c]
        vec[0, c] = mean[c]
        vec[1, c] = -(scale * invstd * sum_dy_xhat) / n if training else 0.0
        vec[2, c] = a[c] / n if training else 0.0
        vec[3, c] = scale
    if training:
        if s_ > 1:
            for item in _range(p_ * c_):
                p = item // c_
                c = item % c_
                m = vec[0, c]
                k = vec[1, c]
                g = vec[2, c]
                sc = vec[3, c]
                for s in range(s_):
                    dx[p, c, s] = (x[p, c, s] - m) * k + (dy[p, c, s] - g) * sc
        else:
            for blk in _range((p_ + rows - 1) // rows):
                for r in range(blk * rows, min(p_, (blk + 1) * rows)):
                    for c in range(c_):
                        dx[r, c, 0] = (x[r, c, 0] - vec[0, c]) * vec[1, c] + (
                            dy[r, c, 0] - vec[2, c]
                        ) * vec[3, c]
    elif s_ > 1:
        for item in _range(p_ * c_):
            p = item // c_
            c = item % c_
            sc = vec[3, c]
            for s in range(s_):
                dx[p, c, s] = dy[p, c, s] * sc
    else:
        for blk in _range((p_ + rows - 1) // rows):
            for r in range(blk * rows, min(p_, (blk + 1) * rows)):
                for c in range(c_):
                    dx[r, c, 0] = dy[r, c, 0] * vec[3, c]


class _Compiled:
    """The kernels compiled lazily, serial (``range``) and parallel (``prange``)."""

    def __init__(self, parallel: bool) -> None:
        self.parallel = parallel
        self._done: dict[str, Any] = {}
        self._lock = threading.Lock()

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        with self._lock:
            fn = self._done.get(name)
            if fn is None:
                fn = self._done[name] = self._compile(name)
        return fn

    def _compile(self, name: str) -> Any:
        import types

        src = globals()["_" + name + "_kernel"]
        # The same source with ``_range`` bound to range or numba.prange.
        g = dict(src.__globals__)
        g["_range"] = numba.prange if self.parallel else range
        fn = types.FunctionType(src.__code__, g, src.__name__)
        # A name per variant: Numba's on-disk cache is keyed by the function's name.
        fn.__qualname__ = src.__qualname__ + ("_parallel" if self.parallel else "_serial")
        return numba.njit(
            parallel=self.parallel,
            fastmath={"reassoc", "contract"},
            nogil=True,
            cache=True,
            error_model="numpy",
        )(fn)


_serial = _Compiled(parallel=False) if AVAILABLE else None
_parallel = _Compiled(parallel=True) if AVAILABLE else None
_parallel_lock = threading.Lock()
_numba_threads = 0


class _Kernels:
    """The serial or the parallel kernels for one call, holding the parallel lock."""

    def __init__(self, size: int) -> None:
        self.held = False
        threads = min(get_num_threads(), numba.config.NUMBA_NUM_THREADS)
        if size >= PARALLEL_MIN and threads > 1 and _parallel_lock.acquire(blocking=False):
            self.held = True
            global _numba_threads
            if _numba_threads != threads:
                numba.set_num_threads(threads)
                _numba_threads = threads
            self.k: Any = _parallel
        else:
            self.k = _serial

    def __enter__(self) -> Any:
        return self.k

    def __exit__(self, *exc: object) -> None:
        if self.held:
            _parallel_lock.release()


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


def _rows_per_block(channels: int) -> int:
    return max(1, CHUNK // channels)


# --- forward and backward ---------------------------------------------------------------------


_EMPTY = {dt: np.empty(0, dtype=dt) for dt in (np.float32, np.float64)}


def _vector(a: np.ndarray | None, dt: np.dtype) -> np.ndarray:
    """A per-channel vector for the kernels; None becomes an empty array (the kernels' "absent")."""
    if a is None:
        return _EMPTY[dt.type]
    return a if type(a) is np.ndarray and a.dtype in _FLOATS else np.asarray(a, dtype=dt)


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
) -> tuple[Any, ...]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``; y laid out like x."""
    xc, perm, ax = _canonical(x, axis)
    v = _view3(xc, ax)
    dt = x.dtype
    channels = v.shape[1]
    y = np.empty(xc.shape, dtype=dt)
    stats = np.empty((2, channels), dtype=dt)
    update = training and running_mean is not None and running_var is not None
    new = np.empty((2, channels), dtype=np.float64) if update else None
    rm = _vector(running_mean if (update or not training) else None, dt)
    rv = _vector(running_var if (update or not training) else None, dt)
    with _Kernels(x.size) as k:
        k.forward(
            v, _vector(weight, dt), _vector(bias, dt), rm, rv, bool(training),
            float(momentum), float(eps), CHUNK, _rows_per_block(channels),
            _view3(y, ax), stats[0], stats[1],
            new[0] if new is not None else _EMPTY[np.float64],
            new[1] if new is not None else _EMPTY[np.float64],
            np.empty((3, channels), dtype=dt),
        )  # fmt: skip
    if perm is not None:
        y = y.transpose(np.argsort(perm))
    new_rm, new_rv = running_mean, running_var
    if new is not None:
        assert running_mean is not None and running_var is not None
        new_rm = new[0].astype(running_mean.dtype)
        new_rv = new[1].astype(running_var.dtype)
    return y, stats[0], stats[1], new_rm, new_rv


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
    xc, perm, ax = _canonical(x, axis)
    dt = x.dtype
    dyc = dy.transpose(perm) if perm is not None else dy
    if not dyc.flags.c_contiguous or dyc.dtype != dt:
        dyc = np.ascontiguousarray(dyc, dtype=dt)
    v = _view3(xc, ax)
    channels = v.shape[1]
    dx = np.empty(xc.shape, dtype=dt)
    grads = np.empty((2, channels), dtype=dt)
    with _Kernels(x.size) as k:
        k.backward(
            _view3(dyc, ax), v, _vector(weight, dt), _vector(mean, dt), _vector(invstd, dt),
            bool(training), CHUNK, _rows_per_block(channels),
            _view3(dx, ax), grads[0], grads[1], np.empty((4, channels), dtype=dt),
        )  # fmt: skip
    if perm is not None:
        dx = dx.transpose(np.argsort(perm))
    return dx, grads[0], grads[1]
