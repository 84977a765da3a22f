"""The kernels, one module per backend, and the dispatcher that walks them in order.

Every kernel module implements one protocol (:class:`Kernel`) on a resolved
call (:class:`anybn._call.Call`): ``accepts(call, x)`` says cheaply whether the
module is for x's library and the call's kind, and ``run_forward`` /
``run_backward`` compute, or return None where a finer condition fails (a
dtype, a layout, autograd tracking the tensors); the dispatcher then goes on
down the list. In order (:data:`KERNELS`):

* ``numba_cpu``: compiled (Numba) kernels for NumPy arrays, float16/32/64.
* ``numpy_blocks``: cache-blocked, multi-threaded NumPy kernels.
* ``torch_cpu``: PyTorch CPU tensors that autograd does not track: the compiled
  or NumPy kernels on NumPy views of the tensors (no copies), or torch's own
  fused kernels with anybn's statistics and exact centring where they are faster.
* ``numba_cuda``: CuPy arrays and PyTorch CUDA tensors that autograd does not
  track (float16/32/64), when numba-cuda is installed (``pip install anybn[cuda]``).
* ``dask``: Dask arrays, out of core (the generic formulas on chunked statistics).
* ``jax``: JAX arrays in training, a ``jax.custom_vjp`` with anybn's backward.
* ``generic``: the array-API kernel of :mod:`anybn._core.generic`: every call.

The first four are fast paths: they compute the generic kernel's formulas with
the same (or better) numerics, are tested against it, and serve one channel axis
without a mask (both running-variance estimators). Masks, several channel axes,
array-api-strict, torch tensors that require grad, bfloat16 and GPU arrays
without numba-cuda take the generic kernel. Adding a backend is adding one module
that implements the protocol to :data:`KERNELS`.

Switching
---------
``ANYBN_FAST_PATHS=0`` in the environment turns every fast path off at import;
:func:`set_fast_paths` changes the process-wide default and :func:`fast_paths`
overrides it inside a ``with`` block (per thread/context), which is how the
tests run the generic path::

    >>> import numpy as np
    >>> import anybn
    >>> from anybn._kernels import fast_paths
    >>> x = np.arange(8.0).reshape(4, 2)
    >>> with fast_paths(False):
    ...     generic = anybn.batch_norm(x, training=True).y
    >>> bool(np.allclose(anybn.batch_norm(x, training=True).y, generic))
    True
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol

import array_api_compat as compat
import numpy as _np

from .._core import generic as _generic
from .._core.outputs import BatchNormGrads, BatchNormOutput
from .._xp import stop_gradient
from .pool import get_num_threads, set_num_threads

if TYPE_CHECKING:
    from .._call import Call

__all__ = [
    "KERNELS",
    "Kernel",
    "backward",
    "enabled",
    "fast_paths",
    "forward",
    "get_num_threads",
    "kernels_for",
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


# --- the protocol and the list ------------------------------------------------------------


class Kernel(Protocol):
    """What every kernel module defines (module-level names)."""

    NAME: str  #: the module's short name
    FAST: bool  #: a fast path (off under ``fast_paths(False)``) or the only kernel for its arrays

    def accepts(self, call: Call, x: Any) -> bool:
        """Whether this kernel is for x's library and this kind of call (cheap)."""

    def run_forward(
        self, call: Call, x: Any, running_mean: Any, running_var: Any, weight: Any, bias: Any
    ) -> BatchNormOutput | None:
        """The forward, or None to let the next kernel compute."""

    def run_backward(
        self, call: Call, dy: Any, x: Any, weight: Any, mean: Any, invstd: Any
    ) -> BatchNormGrads | None:
        """The backward, or None to let the next kernel compute."""


def _numba_cpu() -> ModuleType:
    from . import numba_cpu

    return numba_cpu


def _numpy_blocks() -> ModuleType:
    from . import numpy_blocks

    return numpy_blocks


def _torch_cpu() -> ModuleType:
    from . import torch_cpu

    return torch_cpu


def _numba_cuda() -> ModuleType:
    from . import numba_cuda

    return numba_cuda


def _dask() -> ModuleType:
    from . import dask

    return dask


def _jax() -> ModuleType:
    from . import jax

    return jax


def _generic_kernel() -> ModuleType:
    from . import generic

    return generic


def _is_numpy(x: Any) -> bool:
    return isinstance(x, _np.ndarray)


def _is_gpu(x: Any) -> bool:
    return compat.is_torch_array(x) or compat.is_cupy_array(x)


#: The kernels in the order the dispatcher tries them: ``(name, is x of its library,
#: load the module)``. A module is imported only when an array of its library first
#: comes (numba, numba-cuda, torch, Dask and JAX are optional).
KERNELS: tuple[tuple[str, Callable[[Any], bool], Callable[[], ModuleType]], ...] = (
    ("numba_cpu", _is_numpy, _numba_cpu),
    ("numpy_blocks", _is_numpy, _numpy_blocks),
    ("torch_cpu", compat.is_torch_array, _torch_cpu),
    ("numba_cuda", _is_gpu, _numba_cuda),
    ("dask", compat.is_dask_array, _dask),
    ("jax", compat.is_jax_array, _jax),
    ("generic", lambda x: True, _generic_kernel),
)

#: type(x) -> the kernel modules for arrays of that type, in order
_BY_TYPE: dict[type, tuple[Any, ...]] = {}


def kernels_for(x: Any) -> tuple[Any, ...]:
    """The kernel modules for arrays of x's type, in the dispatcher's order (cached)."""
    found = _BY_TYPE.get(type(x))
    if found is None:
        found = _BY_TYPE[type(x)] = tuple(load() for _, claims, load in KERNELS if claims(x))
    return found


# --- dispatch -----------------------------------------------------------------------------


def forward(
    call: Call,
    x: Any,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None,
    bias: Any | None,
) -> BatchNormOutput:
    """The forward of a resolved call: the first kernel that computes it, then the post-conditions.

    The running statistics returned are never differentiable (cut from any
    autograd graph), and ``mean`` never aliases ``running_mean``: a later
    in-place update of the buffers cannot reach what a caller saved.
    """
    xp = call.xp
    kernel, out = _first_forward(call, x, running_mean, running_var, weight, bias)
    mean = out.mean
    if mean is running_mean:
        mean = xp.asarray(mean, copy=True)
    # Fast paths compute on untracked arrays: only the others' statistics need the cut.
    if kernel is not None and not kernel.FAST and call.training and running_mean is not None:
        return out._replace(
            mean=mean,
            new_running_mean=stop_gradient(out.new_running_mean),
            new_running_var=stop_gradient(out.new_running_var),
        )
    return out if mean is out.mean else out._replace(mean=mean)


def _first_forward(
    call: Call,
    x: Any,
    running_mean: Any | None,
    running_var: Any | None,
    weight: Any | None,
    bias: Any | None,
) -> tuple[Any, BatchNormOutput]:
    """The kernel that computes this forward (None for an empty batch), and its output."""
    if call.training and call.n == 0:
        return None, _generic.empty_forward(call, x, running_mean, running_var)
    fast = enabled()
    for kernel in kernels_for(x):
        if (fast or not kernel.FAST) and kernel.accepts(call, x):
            out = kernel.run_forward(call, x, running_mean, running_var, weight, bias)
            if out is not None:
                return kernel, out
    raise AssertionError("the generic kernel always computes")  # pragma: no cover


def engine(x: Any, /) -> str:
    """Which engine computes a training forward of ``x`` (no parameters) here, in words.

    What ``python -m anybn`` prints for each backend: the kernel module the dispatcher
    picks for this x, and for CPU arrays whether Numba's compiled kernels serve them and
    how they use threads.
    """
    from .._call import resolve_forward

    call, _ = resolve_forward(
        x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1,
        mask=None, var_estimator="unbiased", xp=None,
    )  # fmt: skip
    kernel, _ = _first_forward(call, x, None, None, None, None)
    name = "generic" if kernel is None else kernel.NAME
    if name in ("numba_cpu", "numpy_blocks", "torch_cpu"):
        from . import numba_cpu, pool

        hint = "" if numba_cpu.AVAILABLE else " (pip install anybn[numba] for compiled ones)"
        if name == "numpy_blocks":
            return "NumPy kernels" + hint
        if name == "torch_cpu" and not numba_cpu.AVAILABLE:
            return "torch's own kernels and NumPy's" + hint
        threads = "TBB threads" if pool.tbb_layer() else "Python thread pool"
        where = " on the tensors' memory" if name == "torch_cpu" else ""
        return f"compiled kernels (Numba, {threads}){where}"
    return {
        "numba_cuda": "CUDA kernels (numba-cuda)",
        "dask": "Dask graph of per-chunk kernels",
        "jax": "jax.numpy with a custom VJP",
        "generic": "generic array-API code",
    }.get(name, name)


def backward(
    call: Call, dy: Any, x: Any, weight: Any | None, mean: Any, invstd: Any
) -> BatchNormGrads:
    """The backward of a resolved call: the first kernel that computes it."""
    if call.n == 0:
        return _generic.empty_backward(call, dy, x)
    if not call.training and call.mask is not None:
        call = call._replace(mask=None)  # eval: the statistics are constants, no mask
    fast = enabled()
    for kernel in kernels_for(x):
        if (fast or not kernel.FAST) and kernel.accepts(call, x):
            out = kernel.run_backward(call, dy, x, weight, mean, invstd)
            if out is not None:
                return out
    raise AssertionError("the generic kernel always computes")  # pragma: no cover
