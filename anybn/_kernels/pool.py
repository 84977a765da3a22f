"""The CPU kernels' worker threads and the helpers they share.

Two ways to share a pass among threads:

* Numba's TBB threading layer (:func:`tbb_layer`), where Numba and the ``tbb`` package
  are installed: the compiled kernels split each pass inside one compiled call, for a few
  microseconds a pass. TBB's workers sleep when there is no work (they do not spin as
  OpenMP's do beside torch's own OpenMP threads), and one call's split does not depend on
  what other threads run.
* A pool of Python threads (:func:`_executor`), which the NumPy block kernels use, and the
  compiled kernels where TBB is missing: NumPy and compiled code release the GIL inside
  their loops, but handing a thread its work costs tens of microseconds.

:func:`set_num_threads` sets the thread count of both.
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import numpy as np

__all__ = ["get_num_threads", "set_num_threads", "tbb_layer"]


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
    at most 8. Results do not depend on it. On Numba's TBB layer (:func:`tbb_layer`)
    a pass takes at most the threads Numba started with (``NUMBA_NUM_THREADS``: the
    CPUs); 1 runs every pass on the calling thread. Safe to call while other threads
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


# --- Numba's TBB threading layer -----------------------------------------------------------

#: Whether the compiled kernels use Numba's TBB threading layer: decided on first use.
_tbb: bool | None = None
_tbb_lock = threading.Lock()

#: The library the TBB layer links against, by platform (as Numba names it).
_LIBTBB = ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll")


def tbb_layer() -> bool:
    """Whether the compiled kernels split their passes with Numba's TBB threading layer.

    Decided once per process, on first use: True where Numba and TBB are installed,
    ``ANYBN_THREADING`` is not ``pool`` and the program's own Numba settings allow TBB
    (``NUMBA_THREADING_LAYER`` unset or a choice TBB satisfies, TBB first in the
    priority). Where Numba's parallel layer has already started, anybn uses it only if
    it is TBB. anybn never starts the OpenMP or workqueue layers: OpenMP's workers spin
    between calls, which beside torch's own OpenMP threads slowed a 2-core machine
    tens of times, and workqueue's launch costs as much as anybn's Python pool. False:
    the compiled kernels share passes among the Python pool's threads.
    """
    global _tbb
    if _tbb is None:
        with _tbb_lock:
            if _tbb is None:
                _tbb = _start_tbb()
    return _tbb


def _start_tbb() -> bool:
    if os.environ.get("ANYBN_THREADING", "").strip().lower() == "pool":
        return False
    try:
        import numba
    except ImportError:
        return False
    try:
        return bool(numba.threading_layer() == "tbb")  # already started
    except ValueError:  # not started yet
        pass
    config: Any = numba.config
    layer = str(config.THREADING_LAYER).lower()
    if layer not in ("default", "tbb", "safe", "threadsafe", "forksafe"):
        return False  # the program chose another layer
    if layer == "default" and list(config.THREADING_LAYER_PRIORITY)[:1] != ["tbb"]:
        return False
    if not _load_tbb():
        return False
    previous = config.THREADING_LAYER
    config.THREADING_LAYER = "tbb"  # this start gets TBB or nothing (never OpenMP)
    try:
        numba.get_num_threads()  # starts the layer
    except (ValueError, ImportError, OSError):
        return False
    finally:
        config.THREADING_LAYER = previous
    return bool(numba.threading_layer() == "tbb")


def _load_tbb() -> bool:
    """Whether Numba's TBB layer can be imported; loads the ``tbb`` wheel's library first.

    pip's ``tbb`` wheel installs ``libtbb`` into ``<prefix>/lib``, where the loader does
    not look from a virtual environment, so Numba's layer fails to import
    (numba/numba#6108): loading the library by its path first lets it link.
    """
    from importlib import import_module, metadata

    try:
        import_module("numba.np.ufunc.tbbpool")
    except ImportError:
        pass
    else:
        return True

    try:
        files = metadata.files("tbb") or []
    except metadata.PackageNotFoundError:
        return False
    for f in files:
        if f.name in _LIBTBB:
            try:
                ctypes.CDLL(str(f.locate()), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
            except OSError:
                return False
            break
    else:
        return False
    try:
        import_module("numba.np.ufunc.tbbpool")
    except ImportError:
        return False
    return True


def tbb_threads(n: int) -> int:
    """``n`` capped at the threads Numba's layer started with (``NUMBA_NUM_THREADS``)."""
    import numba

    config: Any = numba.config
    return max(1, min(n, int(config.NUMBA_NUM_THREADS)))


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
