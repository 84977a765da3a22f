"""The Dask kernel: out-of-core training-mode forward and backward.

The generic kernel's formulas (:mod:`anybn._core.generic`) with out-of-core
statistics and sums. Imported by the dispatcher when ``x`` is a Dask array.
Everything stays lazy and chunked:

* the statistics are one pass over ``x``: each chunk gives its own
  ``(count, mean, M2)`` (the corrected two-pass algorithm on that chunk, in
  float64 for float32 data), and the chunks' triples are merged by the
  many-way form of Chan's update (:func:`anybn.chan_merge`)::

      n    = sum_b n_b
      mean = sum_b n_b * mean_b / n
      M2   = sum_b (M2_b + n_b * (mean_b - mean)^2)

  which Dask evaluates as a tree of reductions over small per-chunk arrays;
* ``y`` (and, in the backward, ``dx``) is computed from a *clone* of x's graph
  (:func:`dask.graph_manipulation.clone`) when that graph is shallow (loading
  plus a few elementwise steps per chunk): each chunk of ``x`` is produced
  once for the statistics and once for the output, and never held between
  the passes. Without the clone, Dask keeps every chunk of ``x`` in memory
  until the statistics (which need all of them) are known: ``x`` would be
  materialised. The price is computing x's graph twice; a Dask array that
  wraps data already in memory (``da.from_array``) costs nothing more.
"""

from __future__ import annotations

import functools
from types import ModuleType
from typing import TYPE_CHECKING, Any

import array_api_compat as compat
import numpy as np

from .._core import generic
from .._core.generic import Moments, Sums, as_dtype
from .._core.outputs import BatchNormGrads, BatchNormOutput
from .._xp import Array, channel_shape, param_shape, reduction_axes

if TYPE_CHECKING:
    from .._call import Call

__all__ = ["accepts", "backward_sums", "clone", "moments", "run_backward", "run_forward"]

NAME = "dask"
FAST = False  # not a fast path: the only kernel that keeps Dask arrays lazy and chunked


#: Clone a graph for the second pass only when it has at most this many tasks per
#: chunk of the array: data loading plus a few elementwise steps, cheap to recompute.
SHALLOW_TASKS_PER_CHUNK = 8


def _shallow(a: Any) -> bool:
    return len(a.__dask_graph__()) <= SHALLOW_TASKS_PER_CHUNK * max(1, a.npartitions)


def clone(*arrays: Any, second: bool = False) -> Any:
    """Independent copies of shallow Dask graphs (see the module docstring), one per array.

    Only arrays whose graphs are shallow (:data:`SHALLOW_TASKS_PER_CHUNK`) are
    cloned: recomputing a deep graph (an ``x`` that depends on earlier
    computations, such as a network's previous layers within a lazy training
    loop) would cost more than holding its chunks, and clones of clones grow
    exponentially over a chain of such calls. Deep ones are returned as they are:
    Dask then keeps their chunks between the two passes.

    ``second=True``: the copies are the second pass, whose chunks are only of use
    once the statistics of the first are known: their tasks are annotated with a
    lower priority (``dask.annotate(priority=-1)``), so that ``dask.distributed``,
    whose workers otherwise load ready chunks as soon as a thread is free, runs
    every task of the first pass first instead of loading the second pass's chunks
    early and holding them until the statistics come (x again). The local
    schedulers ignore the annotation; their ordering never does that. (Making the
    copies depend on the statistics, ``dask.graph_manipulation.bind``, would do it
    too, but it changes ``dask.order``'s ordering for the local schedulers, which
    then hold x.)
    """
    from dask.graph_manipulation import clone as dask_clone

    def copy(a: Any) -> Any:
        if not _shallow(a):
            return a
        copied = dask_clone(a)
        if second:
            original = set(a.__dask_graph__().layers)
            for name, layer in copied.__dask_graph__().layers.items():
                if name not in original:
                    layer.annotations = {**(layer.annotations or {}), "priority": -1}
        return copied

    out = tuple(copy(a) for a in arrays)
    return out if len(arrays) > 1 else out[0]


def _chunk_moments(axes: tuple[int, ...], xb: np.ndarray, wb: np.ndarray | None = None) -> Any:
    """``(n, mean, M2)`` of one chunk, stacked on a new leading axis, float64.

    With a mask the values left out are selected away (``where``), never
    multiplied by 0: a NaN or inf there does not reach the statistics.
    """
    xb = np.asarray(xb, dtype=np.float64)
    n: Any
    if wb is None:
        keep = None
        n = np.full([1 if i in axes else s for i, s in enumerate(xb.shape)],
                    float(np.prod([xb.shape[a] for a in axes])))  # fmt: skip
    else:
        keep = np.broadcast_to(np.asarray(wb, dtype=bool), xb.shape)
        n = np.sum(keep, axis=axes, keepdims=True, dtype=np.float64)

    def kept(a: np.ndarray) -> Any:
        return a if keep is None else np.where(keep, a, 0.0)

    safe = np.where(n > 0, n, 1.0)
    m1 = np.sum(kept(xb), axis=axes, keepdims=True) / safe
    centered = kept(xb - m1)
    corr = np.sum(centered, axis=axes, keepdims=True) / safe
    m2 = np.sum(centered * centered, axis=axes, keepdims=True) - n * corr * corr
    return np.stack([n, m1 + corr, m2])


def moments(
    xp: ModuleType, x: Array, mask: Array | None, axis: int | tuple[int, ...]
) -> tuple[Array, Array, Array]:
    """Per-channel ``(n, mean, M2)`` of a Dask array, lazily; each keepdims-shaped, float64.

    ``mask`` is None or a boolean Dask array of x's shape (True counts).
    """
    import dask.array as da

    axes = reduction_axes(x.ndim, axis)
    index = tuple(range(x.ndim))
    args: list[Any] = [x, index]
    if mask is not None:
        args += [da.asarray(mask).rechunk(x.chunks), index]
    parts = da.blockwise(
        functools.partial(_chunk_moments, axes),  # a module-level function: graphs pickle
        (x.ndim, *index),
        *args,
        new_axes={x.ndim: 3},
        adjust_chunks={a: 1 for a in axes},
        dtype=np.float64,
        meta=np.empty((0,) * (x.ndim + 1), dtype=np.float64),
    )
    n_b, mean_b, m2_b = parts[0], parts[1], parts[2]
    n = da.sum(n_b, axis=axes, keepdims=True)
    mean = da.sum(n_b * mean_b, axis=axes, keepdims=True) / n
    delta = mean_b - mean
    m2 = da.sum(m2_b + n_b * delta * delta, axis=axes, keepdims=True)
    return n, mean, m2


def backward_sums(
    xp: ModuleType,
    dy: Array,
    x: Array,
    mean_b: Array,
    axis: int | tuple[int, ...],
    mask: Array | None = None,
) -> tuple[Array, Array]:
    """``sum(dy)`` and ``sum(dy * (x - mean))`` per channel, keepdims-shaped, in one pass.

    With a mask, a masked-out position whose ``dy`` is 0 adds nothing to the
    second sum whatever its ``x`` (see :func:`anybn._core.stats.reaching_loss`).
    """
    from .._core.stats import reaching_loss

    axes = reduction_axes(x.ndim, axis)
    wide = np.float64 if x.dtype == np.float32 else x.dtype
    centered = x - mean_b
    if mask is not None:
        centered = reaching_loss(xp, centered, mask, dy)
    sum_dy = xp.sum(dy, axis=axes, keepdims=True, dtype=wide)
    sum_dy_centered = xp.sum(dy * centered, axis=axes, keepdims=True, dtype=wide)
    return sum_dy, sum_dy_centered


def shapes(x: Array, axis: int | tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``(param_shape, broadcast_shape)`` of x's channels."""
    channels = param_shape(tuple(x.shape), axis)
    return channels, channel_shape(x.ndim, axis, channels)


# --- the kernel protocol -------------------------------------------------------------------


def accepts(call: Call, x: Array) -> bool:
    """Dask arrays, every call."""
    return compat.is_dask_array(x)


def _moments(call: Call, x: Array, xc: Array) -> Moments:
    xp = call.xp
    cdt = xc.dtype
    n64, mean64, m2_64 = moments(xp, xc, call.mask, call.axis)
    n = call.n if call.mask is None else as_dtype(xp, n64, cdt)
    mean_b, m2 = as_dtype(xp, mean64, cdt), as_dtype(xp, m2_64, cdt)
    # centre on the rounded mean, fold its rounding error into the shift (as the generic does)
    corr = as_dtype(xp, mean64 - as_dtype(xp, mean_b, mean64.dtype), cdt)
    return Moments(n, mean_b, m2, clone(xc, second=True) - mean_b, corr, None)


def _sums(call: Call, dy: Array, dyc: Array, x: Array, centered: Array, mean_b: Array) -> Sums:
    if not call.training:
        return generic.batch_sums(call, dy, dyc, x, centered, mean_b)
    # the sums in one pass, dx from clones of the graphs of x, dy and the mask
    xp = call.xp
    cdt = dyc.dtype
    mask = call.mask
    sum_dy, sum_dy_centered = (
        as_dtype(xp, s, cdt)
        for s in backward_sums(xp, dyc, as_dtype(xp, x, cdt), mean_b, call.axis, mask)
    )
    if mask is not None:
        mask = clone(mask, second=True)
    x_again, dy_again = clone(x, dy, second=True)
    centered = as_dtype(xp, x_again, cdt) - mean_b
    return Sums(sum_dy, sum_dy_centered, centered, as_dtype(xp, dy_again, cdt), mask)


def run_forward(
    call: Call,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
) -> BatchNormOutput:
    """The generic forward with out-of-core statistics."""
    return generic.forward(call, x, running_mean, running_var, weight, bias, moments=_moments)


def run_backward(
    call: Call, dy: Array, x: Array, weight: Array | None, mean: Array, invstd: Array
) -> BatchNormGrads:
    """The generic backward with the training sums in one out-of-core pass."""
    return generic.backward(call, dy, x, weight, mean, invstd, sums=_sums)
