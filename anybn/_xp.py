"""Namespace, device and dtype helpers shared by every layer of anybn.

Everything backend-specific that the core needs lives here, one small helper
per concern, so that the numerical code reads like its formulas.
"""

from __future__ import annotations

import math
import operator
from types import ModuleType
from typing import Any

import array_api_compat as compat

__all__ = [
    "Array",
    "channel_shape",
    "check_floating",
    "check_namespace",
    "compute_dtype",
    "dtype_name",
    "is_concrete",
    "is_half",
    "normalize_axes",
    "normalize_axis",
    "reduction_axes",
    "resolve_namespace",
    "same_dtype",
    "stop_gradient",
    "to_host",
    "values_per_channel",
    "wraps",
    "writeable",
]

#: Any array-API array (NumPy, CuPy, PyTorch, array-api-strict, ...).
Array = Any


def _describe(a: object) -> str:
    """Return ``module.Type`` for an object, for error messages."""
    t = type(a)
    return f"{t.__module__.split('.')[0]}.{t.__qualname__}"


def _check_array(a: object, name: str) -> None:
    """Raise TypeError unless ``a`` is an array anybn can process as it is.

    NumPy masked arrays pass as arrays, but NumPy's functions apply their mask
    only in part (a masked value is left out of a sum, yet counted): refuse them
    rather than return statistics of the wrong values, and name ``mask=``, which
    does what their mask means (True there is a value that counts, the inverse
    of NumPy's mask). Routing them silently would return a plain array where a
    masked one came in.
    """
    if not compat.is_array_api_obj(a):
        raise TypeError(f"{name} must be an array (NumPy, CuPy, PyTorch, ...), got {_describe(a)}")
    if compat.is_numpy_array(a) and type(a).__module__.startswith("numpy.ma"):
        raise TypeError(
            f"{name} is a NumPy masked array, whose mask anybn does not apply; pass "
            f"{name}.data with mask=~numpy.ma.getmaskarray({name}) to leave its masked "
            f"values out of the statistics, or {name}.filled(value)"
        )


def check_namespace(xp: object, name: str = "xp") -> ModuleType:
    """``xp`` must be an array namespace module (``numpy``, ``array_api_compat.torch``, ...)."""
    if not isinstance(xp, ModuleType) or not hasattr(xp, "asarray"):
        raise TypeError(
            f"{name} must be an array namespace module (numpy, torch, cupy, "
            f"array_api_strict, ...), got {_describe(xp)}"
        )
    return xp


def resolve_namespace(
    x: Array,
    others: dict[str, Array | None],
    *,
    x_name: str = "x",
    xp: ModuleType | None = None,
) -> ModuleType:
    """Resolve the array namespace of ``x`` and check every other array against it.

    Parameters
    ----------
    x : array
        The array that decides the namespace and the device.
    others : dict of str to array or None
        The other array arguments, by argument name; ``None`` values are skipped.
    x_name : str, optional
        The name of ``x`` in error messages.
    xp : module, optional
        A namespace to use instead of resolving one from ``x``.

    Returns
    -------
    module
        The array-API-compatible namespace of ``x``.

    Raises
    ------
    TypeError
        If ``x`` is not an array, or another argument is not an array of the
        same library as ``x``.
    ValueError
        If another argument lives on a different device than ``x``.
    """
    _check_array(x, x_name)
    xp = compat.array_namespace(x) if xp is None else check_namespace(xp)
    x_type = type(x)
    x_device = None
    for name, a in others.items():
        if a is None:
            continue
        if type(a) is not x_type:
            _check_array(a, name)
            if wraps(x, a):
                continue  # converted to x's library by the caller (see `wraps`)
            if compat.array_namespace(a) is not compat.array_namespace(x):
                raise TypeError(
                    f"{name} must be an array of the same library as {x_name} "
                    f"({_describe(x)}), got {_describe(a)}"
                )
        if x_device is None:
            x_device = compat.device(x)
        a_device = compat.device(a)
        # A JAX tracer has no device (None): jit places the computation, not anybn.
        if a_device != x_device and a_device is not None and x_device is not None:
            raise ValueError(
                f"{name} is on device {a_device!r} but {x_name} is on device "
                f"{x_device!r}; move them to one device first"
            )
    return xp


def wraps(x: Array, a: Array) -> bool:
    """Whether ``x``'s library wraps ``a``'s, so that ``a`` may stand beside ``x``.

    A Dask array is made of NumPy (or other) chunks and a pydata-sparse array
    holds NumPy data: a user rightly expects NumPy weights and running
    statistics to work with them. Such an ``a`` is converted with
    ``xp.asarray`` (lazily, for Dask) by the caller; every other mix of
    libraries stays a TypeError.
    """
    return compat.is_numpy_array(a) and (
        compat.is_dask_array(x) or compat.is_pydata_sparse_array(x)
    )


def adopt(xp: ModuleType, x: Array, a: Array | None) -> Array | None:
    """``a`` in x's library where x's library wraps a's (see :func:`wraps`), else ``a``."""
    if a is None or not wraps(x, a):
        return a
    if compat.is_pydata_sparse_array(x):
        import sparse

        return sparse.COO.from_numpy(a)
    return xp.asarray(a)


def to_host(a: Array) -> Any:
    """A NumPy array with the values of ``a``, an array of any library.

    The one host conversion of anybn (the layer's cross-library copies, the
    backend report and the tests use it): a view where the library allows one
    (NumPy, CPU torch), else a copy. torch's bfloat16, which NumPy lacks, comes
    back as float32 (exactly); CuPy through ``.get()``; Dask and sparse are
    computed/densified; anything else through DLPack (array-api-strict on any
    of its devices, JAX), or ``np.asarray`` as a last resort.
    """
    import numpy as np

    if compat.is_numpy_array(a):
        return np.asarray(a)
    if compat.is_torch_array(a):
        import torch

        a = a.detach().cpu()
        if a.dtype == torch.bfloat16:
            a = a.float()
        return a.resolve_conj().resolve_neg().numpy()
    if compat.is_cupy_array(a):
        return a.get()
    if compat.is_dask_array(a):
        return np.asarray(a.compute())
    if compat.is_pydata_sparse_array(a):
        return a.todense()
    if compat.is_array_api_strict_namespace(compat.array_namespace(a)):
        import array_api_strict as strict

        a = a.to_device(strict.Device("CPU_DEVICE"))
    try:
        return np.from_dlpack(a)
    except (TypeError, BufferError, RuntimeError, AttributeError):
        return np.asarray(a)


def dtype_name(dtype: object) -> str:
    """Return a short name for a dtype (``float32``, ``bfloat16``, ...).

    NumPy dtypes of either byte order give their name (``>f4`` is ``float32``).
    """
    name = getattr(dtype, "name", None)
    if isinstance(name, str) and name:
        return name
    return str(dtype).rsplit(".", 1)[-1].strip("'>")


def same_dtype(a: object, b: object) -> bool:
    """Whether two dtypes are the same type of number (byte order aside)."""
    return bool(a == b) or dtype_name(a) == dtype_name(b)


def check_floating(xp: ModuleType, a: Array, name: str) -> None:
    """Raise TypeError unless ``a`` has a real floating-point dtype."""
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(
            f"{name} must have a real floating-point dtype (float16, bfloat16, "
            f"float32 or float64), got {dtype_name(a.dtype)}"
        )


def is_half(xp: ModuleType, dtype: object) -> bool:
    """Whether ``dtype`` is a floating type narrower than 32 bits."""
    return bool(xp.finfo(dtype).bits < 32)


def compute_dtype(xp: ModuleType, dtype: object) -> object:
    """The dtype anybn accumulates in: float32 for half types, else ``dtype``."""
    return xp.float32 if is_half(xp, dtype) else dtype


def normalize_axis(axis: object, ndim: int) -> int:
    """Return ``axis`` as a non-negative int, or raise a clear error."""
    if isinstance(axis, bool):
        raise TypeError(f"axis must be an int, got {axis!r}")
    try:
        axis = operator.index(axis)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"axis must be an int, got {type(axis).__name__}") from None
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"axis {axis} is out of range for an input with {ndim} dimensions "
            f"(expected -{ndim} <= axis < {ndim})"
        )
    return axis % ndim


def normalize_axes(axis: object, ndim: int) -> tuple[int, ...]:
    """``axis`` (an int, or a tuple/list of ints) as a sorted tuple of non-negative axes.

    Several channel axes (Keras' list ``axis``, Chainer's ``param_shape``) give
    per-channel arrays of the shape of those axes, in increasing axis order.
    """
    if isinstance(axis, (tuple, list)):
        if not axis:
            raise ValueError("axis must name at least one channel axis, got an empty sequence")
        axes = tuple(normalize_axis(a, ndim) for a in axis)
        if len(set(axes)) != len(axes):
            raise ValueError(f"axis {tuple(axis)!r} names an axis twice")
        if len(axes) == ndim:
            raise ValueError(
                f"axis {tuple(axis)!r} names every axis of an input with {ndim} dimensions: "
                "nothing is left to reduce over"
            )
        return tuple(sorted(axes))
    return (normalize_axis(axis, ndim),)


def _as_axes(axis: int | tuple[int, ...]) -> tuple[int, ...]:
    return (axis,) if isinstance(axis, int) else tuple(axis)


def reduction_axes(ndim: int, axis: int | tuple[int, ...]) -> tuple[int, ...]:
    """Every axis but the channel axis (or axes)."""
    axes = _as_axes(axis)
    return tuple(i for i in range(ndim) if i not in axes)


def param_shape(shape: tuple[int, ...], axis: int | tuple[int, ...]) -> tuple[int, ...]:
    """The shape of a per-channel array: the extents of the channel axes of ``shape``."""
    return tuple(shape[a] for a in _as_axes(axis))


def channel_shape(
    ndim: int, axis: int | tuple[int, ...], channels: int | tuple[int, ...]
) -> tuple[int, ...]:
    """The shape that broadcasts a per-channel array along ``axis`` (one axis or several)."""
    axes = _as_axes(axis)
    extents = (channels,) if isinstance(channels, int) else tuple(channels)
    by_axis = dict(zip(axes, extents, strict=True))
    return tuple(by_axis.get(i, 1) for i in range(ndim))


def check_known_shape(shape: tuple[Any, ...], name: str = "x") -> None:
    """Raise ValueError when a lazy array's shape is not known (None or NaN extents).

    Dask gives NaN extents after boolean indexing (unknown chunk sizes), ndonnx
    None for a symbolic dimension. Both would otherwise give NaN statistics.
    """
    unknown = [s for s in shape if s is None or (isinstance(s, float) and math.isnan(s))]
    if unknown:
        raise ValueError(
            f"{name} has a shape of unknown extents {tuple(shape)}: anybn needs the number of "
            f"values per channel. For a Dask array call {name}.compute_chunk_sizes() first "
            "(after boolean indexing its chunk sizes are unknown); for a symbolic dimension "
            "(ndonnx) give the batch size a concrete value"
        )


def values_per_channel(shape: tuple[int | None, ...], axis: int | tuple[int, ...]) -> int:
    """The number of values per channel: the product of every other extent."""
    check_known_shape(tuple(shape))
    axes = _as_axes(axis)
    extents: list[int] = [int(s) for i, s in enumerate(shape) if i not in axes]  # type: ignore[arg-type]
    return math.prod(extents)


def is_concrete(a: Array) -> bool:
    """Whether the values of ``a`` can be read now without computing a graph.

    Eager arrays (JAX's included) can; JAX tracers (under ``jit``, ``grad``,
    ``vmap``) and Dask/ndonnx arrays cannot: the core never branches on them.
    """
    if compat.is_jax_array(a):
        import jax

        return not isinstance(a, jax.core.Tracer)
    return not compat.is_lazy_array(a)


def stop_gradient(a: Array) -> Array:
    """``a`` cut from any autograd graph (running statistics are never differentiable).

    PyTorch: ``detach()``; JAX: ``jax.lax.stop_gradient``; other libraries have
    no autograd and get ``a`` back.
    """
    if compat.is_torch_array(a):
        return a.detach()
    if compat.is_jax_array(a):
        import jax

        return jax.lax.stop_gradient(a)
    return a


def writeable(xp: ModuleType, a: Array) -> bool:
    """Whether a freshly computed temporary ``a`` may be updated in place.

    NumPy and CuPy arrays can; PyTorch tensors can unless autograd records
    them (an in-place update would invalidate tensors saved for backward) or a
    ``torch.func`` transform is active (under vmap an unbatched temporary cannot
    absorb a batched operand in place); immutable libraries (JAX,
    array-api-strict's read-only policy) cannot.
    """
    if compat.is_numpy_array(a) or compat.is_cupy_array(a):
        return True
    if compat.is_torch_array(a):
        from torch._C import _functorch

        return not a.requires_grad and _functorch.maybe_current_level() is None
    return False
