"""The CPU kernels' worker threads and the helpers they share.

One pool of Python threads serves the NumPy block kernels and the compiled
(Numba) CPU kernels: NumPy and compiled code release the GIL inside their loops.
"""

from __future__ import annotations

import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

__all__ = ["get_num_threads", "set_num_threads"]


#: Non-finite input gives non-finite output in its channel (inf - inf is NaN), as in
#: the generic path and in PyTorch, without a RuntimeWarning from anybn's internals.
#: (np.errstate also restores the ufunc buffer size that a block loop sets.) A new
#: errstate per use: one instance entered on two threads at once would mix up their states.
def _quiet() -> np.errstate:
    return np.errstate(invalid="ignore", divide="ignore", over="ignore")


_F = TypeVar("_F", bound=Callable[..., Any])


def _quietly(fn: _F) -> _F:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with _quiet():
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


# --- threads ------------------------------------------------------------------------------


def _default_threads() -> int:
    env = os.environ.get("ANYBN_NUM_THREADS")
    if env:
        return max(1, int(env))
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        n = os.cpu_count() or 1
    return max(1, min(n, 8))


_threads = _default_threads()
_pool: ThreadPoolExecutor | None = None
_pool_pid = -1
_pool_lock = threading.Lock()


def get_num_threads() -> int:
    """The number of threads the CPU fast path uses for large arrays."""
    return _threads


def set_num_threads(n: int) -> int:
    """Use ``n`` threads (>= 1) for large arrays; returns the previous number.

    The default is ``$ANYBN_NUM_THREADS`` or the CPUs this process may run on,
    at most 8. Results do not depend on it. Safe to call while other threads
    run anybn: a call already running keeps the pool it started with, and the
    old pool's workers exit once nothing uses it.
    """
    global _threads, _pool
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"the number of threads must be an int >= 1, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"the number of threads must be an int >= 1, got {n!r}")
    with _pool_lock:
        previous, _threads = _threads, n
        # Never shut the old pool down: a call on another thread may be about to
        # submit to it. Dropped, it is garbage-collected and its workers exit.
        _pool = None
    return previous


def _executor() -> tuple[ThreadPoolExecutor, int]:
    """The worker pool and the thread count it serves, created on first use and after a fork."""
    global _pool, _pool_pid
    with _pool_lock:
        if _pool is None or _pool_pid != os.getpid():
            _pool = ThreadPoolExecutor(max_workers=max(1, _threads - 1), thread_name_prefix="anybn")
            _pool_pid = os.getpid()
        return _pool, _threads


def _memory_order(x: np.ndarray) -> tuple[int, ...] | None:
    """The axes of x from the largest stride down, if that order is C-contiguous and not x's.

    ``x.transpose(order)`` is then a C-ordered view of x's memory: a channels-last
    ``(N, C, H, W)`` array gives ``(0, 2, 3, 1)``. None for C-ordered x, and for
    layouts that no permutation makes C-ordered (slices, negative strides).
    """
    if x.flags.c_contiguous or x.ndim < 2:
        return None
    order = tuple(sorted(range(x.ndim), key=lambda i: -x.strides[i]))
    return order if x.transpose(order).flags.c_contiguous else None


def native_order(a: Any) -> Any:
    """A float NumPy array in the machine's byte order (a copy only for a swapped one)."""
    if type(a) is np.ndarray and a.dtype.kind == "f" and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a
