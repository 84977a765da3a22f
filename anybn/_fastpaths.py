"""Optional fast paths per backend, behind one switch.

The functional core validates its arguments, then asks :func:`batch_norm` or
:func:`batch_norm_backward` here for a fast path; ``None`` means "none applies",
and the generic array-API code runs. The fast paths compute the same formulas
with the same (or better) numerics and are tested against the generic path:

* NumPy arrays: cache-blocked, multi-threaded kernels, :mod:`anybn._numpy_kernels`.
* PyTorch float32/float64 CPU tensors that autograd does not track: torch's own
  fused kernels, with anybn's statistics and exact centring where torch's would
  lose accuracy, :mod:`anybn._torch_kernels`. Small tensors (a few torch calls
  cost more than the work) and float16 CPU tensors run the CPU kernels on NumPy
  views of the tensors (no copies).
* CuPy arrays and PyTorch CUDA tensors that autograd does not track
  (float16/32/64): numba-cuda kernels, :mod:`anybn._kernels.cuda`, when
  numba-cuda is installed (``pip install anybn[cuda]``).

Every kernel serves both running-variance estimators (``var_estimator``: the
denominator ``n - 1`` or ``n``). Everything else (masks, several channel axes,
array-api-strict, JAX, Dask, torch tensors that require grad, bfloat16, GPU arrays
without numba-cuda) takes the generic path.

Switching
---------
``ANYBN_FAST_PATHS=0`` in the environment turns every fast path off at import;
:func:`set_fast_paths` changes the process-wide default and :func:`fast_paths`
overrides it inside a ``with`` block (per thread/context), which is how the
tests run the generic path::

    >>> import numpy as np
    >>> import anybn
    >>> from anybn._fastpaths import fast_paths
    >>> x = np.arange(8.0).reshape(4, 2)
    >>> with fast_paths(False):
    ...     generic = anybn.batch_norm(x, training=True).y
    >>> bool(np.allclose(anybn.batch_norm(x, training=True).y, generic))
    True
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import Any

import array_api_compat as compat
import numpy as _np

from . import _numpy_kernels, _torch_kernels
from ._numpy_kernels import get_num_threads, set_num_threads

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "enabled",
    "fast_paths",
    "get_num_threads",
    "set_fast_paths",
    "set_num_threads",
]

Array = Any

_default = os.environ.get("ANYBN_FAST_PATHS", "1").strip().lower() not in (
    "0",
    "false",
    "no",
    "off",
)
_override: ContextVar[bool | None] = ContextVar("anybn_fast_paths", default=None)


def enabled() -> bool:
    """Whether fast paths are on in the current context."""
    value = _override.get()
    return _default if value is None else value


def set_fast_paths(on: bool) -> bool:
    """Turn fast paths on or off for the whole process; returns the previous default."""
    global _default
    previous, _default = _default, bool(on)
    return previous


@contextmanager
def fast_paths(on: bool) -> Iterator[None]:
    """Turn fast paths on or off inside a ``with`` block (this thread/context only)."""
    token = _override.set(bool(on))
    try:
        yield
    finally:
        _override.reset(token)


# --- PyTorch CPU tensors as NumPy arrays --------------------------------------------------
#
# These run on every call with tensors: a few hundred nanoseconds per attribute read, so they
# read as little as they can (the core has already checked dtypes, shapes and devices).

_torch: Any = None  # the torch module, bound on first eager use (torch is optional)


def _torch_module() -> Any:
    global _torch
    if _torch is not None:
        return _torch
    import torch

    # Not while torch.compile traces: a global bound there is a side effect, which an
    # autograd.Function's backward may not have (fullgraph=True then fails).
    if not torch.compiler.is_compiling():
        _torch = torch
    return torch


def torch_has_tangent(tensors: tuple[Array | None, ...]) -> bool:
    """Whether forward-mode AD is tracking any of these tensors."""
    forward_ad = _torch_module().autograd.forward_ad
    # No dual level entered (the common case): nothing to unpack. The level is
    # private to torch.autograd.forward_ad; without it, unpack every tensor.
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def _torch_transformed(arrays: tuple[Array | None, ...]) -> bool:
    """Whether torch.func or forward-mode AD is tracing these tensors.

    The fast paths read tensors as NumPy views, call ``.item()`` and update
    temporaries in place: under ``torch.func.vmap``/``grad``/``jvp`` that fails,
    and forward-AD tangents would be dropped silently. The generic path's torch
    operations compose with both.
    """
    if _torch_module()._C._functorch.maybe_current_level() is not None:
        return True
    return torch_has_tangent(arrays)


def _torch_as_numpy(arrays: tuple[Array | None, ...]) -> list[Any] | None:
    """NumPy views of the CPU tensors of a validated call that autograd does not track, or None.

    The core has checked that the tensors share x's device and a floating dtype;
    ``numpy()`` refuses what NumPy cannot view (other devices, bfloat16, sparse,
    conjugate or negative bits), and then None sends the call elsewhere.
    """
    grad = _torch_module().is_grad_enabled()
    out: list[Any] = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        if a.requires_grad:
            if grad:
                return None
            a = a.detach()
        try:
            out.append(a.numpy())
        except (RuntimeError, TypeError):
            return None
    return out


def _to_torch(
    results: tuple[Any, ...], views: list[Any] | tuple[()] = (), tensors: tuple[Any, ...] = ()
) -> tuple[Any, ...]:
    """Wrap NumPy results as tensors; a result that *is* one of ``views`` returns its tensor."""
    from_numpy = _torch_module().from_numpy
    out: list[Any] = []
    for r in results:
        if r is None:
            out.append(None)
            continue
        for v, t in zip(views, tensors, strict=True):
            if r is v:
                out.append(t)
                break
        else:
            out.append(from_numpy(r))
    return tuple(out)


# --- CuPy arrays and torch CUDA tensors: numba-cuda kernels ---------------------------------

_cuda_module: ModuleType | bool | None = False  # False: not imported yet; None: unavailable


def _cuda_kernels(arrays: tuple[Array | None, ...]) -> ModuleType | None:
    """:mod:`anybn._kernels.cuda` if it serves these arrays, else None (generic path).

    Torch tensors that autograd tracks stay on the generic path (autograd traces it);
    without numba-cuda every GPU array does.
    """
    global _cuda_module
    if _cuda_module is False:
        from ._kernels import cuda as module

        _cuda_module = module if module.AVAILABLE else None  # numba-cuda installed?
    if _cuda_module is None:
        return None
    x = arrays[0] if arrays[0] is not None else arrays[1]
    if compat.is_torch_array(x):
        import torch

        if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in arrays):
            return None
    present = [a for a in arrays if a is not None]
    cuda: Any = _cuda_module
    return cuda if cuda.supports(present[0], *present[1:]) else None


# --- NumPy arrays and torch CPU tensors: compiled (Numba) kernels ---------------------------

_cpu_module: ModuleType | bool | None = False  # False: not imported yet; None: unavailable


def _cpu_kernels() -> ModuleType | None:
    """:mod:`anybn._kernels.cpu` when Numba is installed (and ``ANYBN_NUMBA`` is not 0)."""
    global _cpu_module
    if _cpu_module is False:
        from ._kernels import cpu as module

        _cpu_module = module if module.AVAILABLE else None
    cpu: Any = _cpu_module
    return cpu


def _numpy_module(*arrays: Any) -> Any:
    """The kernels for these NumPy arrays: compiled where they serve them, else NumPy's."""
    cpu = _cpu_kernels()
    if cpu is not None and all(cpu.supports(a) for a in arrays):
        return cpu
    return _numpy_kernels


def _native_order(a: Array) -> Array:
    """A float NumPy array in the machine's byte order (a copy only for a swapped one)."""
    if type(a) is _np.ndarray and a.dtype.kind == "f" and not a.dtype.isnative:
        return a.astype(a.dtype.newbyteorder("="))
    return a


# --- dispatch -----------------------------------------------------------------------------


def batch_norm(
    xp: ModuleType,
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
) -> tuple[Any, ...] | None:
    """The forward on a fast path, or None; arguments are already validated.

    ``var_estimator`` ("unbiased" or "biased") is the running variance's denominator,
    ``n - 1`` or ``n``: every kernel takes it.
    """
    args = (x, running_mean, running_var, weight, bias)
    options = {
        "training": training, "momentum": momentum, "eps": eps, "axis": axis,
        "var_estimator": var_estimator,
    }  # fmt: skip
    if type(x) is _np.ndarray:
        x = _native_order(x)
        if not _numpy_kernels.supports(x):
            return None
        return _numpy_module(x).forward(x, running_mean, running_var, weight, bias, **options)
    if compat.is_torch_array(x):
        if _torch_transformed(args):
            return None
        if x.is_cpu:
            return _torch_cpu_forward(args, options)
        if not x.is_cuda:
            return None
    elif not compat.is_cupy_array(x):
        return None
    cuda = _cuda_kernels(args)  # CuPy arrays and torch CUDA tensors
    return None if cuda is None else cuda.forward(*args, **options)


def _torch_cpu_forward(args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, ...] | None:
    """The forward on CPU tensors: compiled kernels on NumPy views, torch's, or NumPy's."""
    x = args[0]
    compiled = _cpu_kernels() is not None
    views = _torch_as_numpy(args) if compiled else None
    if views is not None:
        module = _numpy_module(views[0])
        if module is not _numpy_kernels:
            return _to_torch(module.forward(*views, **options), views, args)
    if _torch_kernels.wanted(x, options["axis"]) and _torch_kernels.supports(*args):
        return _torch_kernels.forward(*args, **options)
    if views is None:
        views = _torch_as_numpy(args)
    if views is None or not _numpy_kernels.supports(views[0]):
        return None
    return _to_torch(_numpy_kernels.forward(*views, **options), views, args)


def batch_norm_backward(
    xp: ModuleType,
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool,
    axis: int,
) -> tuple[Any, ...] | None:
    """The backward on a fast path, or None; arguments are already validated."""
    args = (dy, x, weight, mean, invstd)
    options = {"training": training, "axis": axis}
    if type(x) is _np.ndarray:
        x, dy = _native_order(x), _native_order(dy)
        if not (_numpy_kernels.supports(x) and _numpy_kernels.supports(dy)):
            return None
        return _numpy_module(x, dy).backward(dy, x, weight, mean, invstd, **options)
    if compat.is_torch_array(x):
        if _torch_transformed(args):
            return None
        if x.is_cpu:
            return _torch_cpu_backward(args, options)
        if not x.is_cuda:
            return None
    elif not compat.is_cupy_array(x):
        return None
    cuda = _cuda_kernels(args)  # CuPy arrays and torch CUDA tensors
    return None if cuda is None else cuda.backward(*args, **options)


def _torch_cpu_backward(args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, ...] | None:
    """The backward on CPU tensors: compiled kernels on NumPy views, torch's, or NumPy's."""
    dy, x = args[0], args[1]
    compiled = _cpu_kernels() is not None
    views = _torch_as_numpy(args) if compiled else None
    if views is not None:
        module = _numpy_module(views[0], views[1])
        if module is not _numpy_kernels:
            return _to_torch(module.backward(*views, **options))
    if (
        options["training"]
        and dy.dtype == x.dtype
        and _torch_kernels.wanted(x, options["axis"])
        and _torch_kernels.supports(x, dy, *args[2:])
    ):
        return _torch_kernels.backward(*args, axis=options["axis"])
    if views is None:
        views = _torch_as_numpy(args)
    if views is None or not (
        _numpy_kernels.supports(views[0]) and _numpy_kernels.supports(views[1])
    ):
        return None
    return _to_torch(_numpy_kernels.backward(*views, **options))
