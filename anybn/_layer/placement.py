"""Where a layer's arrays live: their library (namespace), device and floating dtype.

:class:`Storage` names the place; :func:`convert` copies an array of any library there.
On Dask the layer holds computed values (:func:`materialised`), never graphs.
"""

from __future__ import annotations

from types import ModuleType
from typing import Any, NamedTuple

import array_api_compat as compat

from .._xp import Array, dtype_name, to_host

__all__ = ["Arrays", "Storage", "convert", "describe", "materialised"]


class Arrays(NamedTuple):
    """The per-channel arrays of a layer; ``None`` where the layer has none."""

    weight: Array | None
    bias: Array | None
    running_mean: Array | None
    running_var: Array | None
    #: batch renormalization's moving statistics (layers with ``renorm=True``)
    running_std: Array | None = None
    renorm_mean: Array | None = None
    renorm_std: Array | None = None


class Storage(NamedTuple):
    """Where a layer's arrays live: namespace, device and floating dtype."""

    xp: ModuleType
    device: Any
    dtype: Any


def materialised(*arrays: Array) -> tuple[Array, ...]:
    """Dask arrays computed (one pass over their shared graph) and wrapped back, chunk for chunk.

    What the layer stores must not hold the graph that made it: a running
    statistic is a function of the previous one and the batch, so a lazy one
    would chain every batch seen, and keep every batch alive.
    """
    import dask
    import dask.array as da

    values = dask.compute(*arrays)
    return tuple(da.from_array(v, chunks=a.chunks) for v, a in zip(values, arrays, strict=True))


def describe(a: object) -> str:
    t = type(a)
    return f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def namespace_of(xp: ModuleType) -> ModuleType:
    """The array-api-compat namespace for a library module (``numpy`` -> its wrapper)."""
    return compat.array_namespace(xp.asarray(0.0))


_FLOATING = ("float16", "bfloat16", "float32", "float64")


def check_dtype(dtype: object) -> object:
    """None, or a floating dtype given by name or as a dtype of any library."""
    if (
        dtype is not None
        and (dtype if isinstance(dtype, str) else dtype_name(dtype)) not in _FLOATING
    ):
        raise TypeError(f"dtype must be one of {', '.join(_FLOATING)} (or None), got {dtype!r}")
    return dtype


def resolve_dtype(xp: ModuleType, dtype: object) -> object:
    """``dtype`` (a name, or a dtype of any library) as a dtype of ``xp``."""
    name = dtype if isinstance(dtype, str) else dtype_name(dtype)
    resolved = getattr(xp, name, None)
    if resolved is None or not xp.isdtype(resolved, "real floating"):
        raise TypeError(f"dtype must be a real floating dtype of {xp.__name__}, got {dtype!r}")
    return resolved


def convert(a: Array, storage: Storage) -> Array:
    """A copy of ``a`` (any library) in the namespace, device and dtype of ``storage``."""
    xp, device, dtype = storage
    if compat.is_torch_array(a):
        a = a.detach()
    if compat.array_namespace(a) is xp:
        if device is not None:
            a = compat.to_device(a, device)
        return xp.astype(a, dtype, copy=True)
    return xp.asarray(to_host(a), dtype=dtype, device=device, copy=True)

