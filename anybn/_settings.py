"""What a user may set: the CPU kernels' threads and the fast paths.

Both act on the kernels (:mod:`anybn._kernels`); neither changes a result: the fast paths
compute the generic array-API path's formulas with the same or better numerics, and the
CPU kernels' results do not depend on the number of threads.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from . import _kernels as kernels

__all__ = ["fast_paths", "get_num_threads", "set_fast_paths", "set_num_threads"]


def get_num_threads() -> int:
    """The number of threads anybn's CPU kernels use for large arrays.

    Returns
    -------
    int
        ``$ANYBN_NUM_THREADS`` if set, else the CPUs this process may run on (at most 8),
        unless :func:`set_num_threads` changed it.

    Examples
    --------
    >>> import anybn
    >>> anybn.get_num_threads() >= 1
    True
    """
    return kernels.get_num_threads()


def set_num_threads(n: int) -> int:
    """Use ``n`` threads for large arrays in anybn's CPU kernels; returns the previous number.

    Results do not depend on it (each thread's share of a sum has a fixed place, reduced
    in a fixed order). Small inputs run on the calling thread whatever ``n`` is. Safe to
    call while other threads run anybn.

    Parameters
    ----------
    n : int
        The number of threads, at least 1.

    Returns
    -------
    int
        The previous number.

    Raises
    ------
    TypeError
        ``n`` is not an int.
    ValueError
        ``n`` is below 1.

    Examples
    --------
    >>> import anybn
    >>> previous = anybn.set_num_threads(1)
    >>> anybn.get_num_threads()
    1
    >>> _ = anybn.set_num_threads(previous)
    """
    return kernels.set_num_threads(n)


def set_fast_paths(on: bool) -> bool:
    """Turn the fast paths on or off for the whole process; returns the previous setting.

    The fast paths are the compiled, NumPy, torch and CUDA kernels for the backends that
    have them; off, every call takes the generic array-API path (the reference they are
    tested against). ``ANYBN_FAST_PATHS=0`` in the environment turns them off at import.

    Parameters
    ----------
    on : bool
        True for the fast paths (the default), False for the generic path.

    Returns
    -------
    bool
        The previous process-wide setting.

    Examples
    --------
    >>> import anybn
    >>> previous = anybn.set_fast_paths(False)
    >>> _ = anybn.set_fast_paths(previous)
    """
    return kernels.set_fast_paths(on)


@contextmanager
def fast_paths(on: bool) -> Iterator[None]:
    """Turn the fast paths on or off inside a ``with`` block (this thread or context only).

    Parameters
    ----------
    on : bool
        True for the fast paths, False for the generic array-API path.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.arange(8.0).reshape(4, 2)
    >>> with anybn.fast_paths(False):
    ...     generic = anybn.batch_norm(x, training=True).y
    >>> bool(np.allclose(anybn.batch_norm(x, training=True).y, generic))
    True
    """
    with kernels.fast_paths(on):
        yield
