"""The backends anybn knows how to exercise: one registry for the report and the tests.

Each :class:`Backend` knows how to tell whether it can run here (and why not),
how to move a NumPy array onto it, how to bring a result back, and how to wait
for queued device work. ``python -m anybn`` and the test matrix both iterate
over :data:`BACKENDS`, so a new backend is added in one place.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any

import numpy as np

from .._xp import to_host

__all__ = ["BACKENDS", "Backend", "get_backend"]


def _try_import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        return importlib.import_module(name), None
    except Exception as exc:  # ImportError, or a broken CUDA install
        return None, f"{name} is not installed ({type(exc).__name__}: {exc})"


@dataclass(frozen=True)
class Backend:
    """One array library on one device.

    Attributes
    ----------
    id : str
        The id used in test ids and the report: ``numpy``, ``torch:cuda``, ...
    module : str
        The library to import.
    half_dtypes : tuple of str
        The half-precision dtypes this backend has (``float16``, ``bfloat16``).
    gpu : bool
        Whether the backend needs a GPU.
    """

    id: str
    module: str
    half_dtypes: tuple[str, ...] = ()
    gpu: bool = False
    _check: Callable[[ModuleType], str | None] = field(default=lambda lib: None, repr=False)
    _asarray: Callable[[ModuleType, np.ndarray], Any] = field(default=None, repr=False)  # type: ignore[assignment]
    _to_numpy: Callable[[Any], np.ndarray] = field(default=None, repr=False)  # type: ignore[assignment]
    _sync: Callable[[ModuleType], None] = field(default=lambda lib: None, repr=False)
    _call: Callable[..., Any] | None = field(default=None, repr=False)

    @property
    def dtypes(self) -> tuple[str, ...]:
        """Every floating dtype name this backend supports."""
        return ("float32", "float64", *self.half_dtypes)

    def unavailable_reason(self) -> str | None:
        """``None`` if the backend runs here, else why it does not."""
        lib, reason = _try_import(self.module)
        if lib is None:
            return reason
        return self._check(lib)

    @property
    def lib(self) -> ModuleType:
        """The imported library."""
        return importlib.import_module(self.module)

    def asarray(self, a: np.ndarray, dtype: str | None = None) -> Any:
        """Copy a NumPy array onto this backend, optionally casting to ``dtype``."""
        a = np.asarray(a)
        if dtype is not None and dtype != "bfloat16":
            a = a.astype(dtype)
        out = self._asarray(self.lib, a)
        if dtype == "bfloat16":
            out = out.to(self.lib.bfloat16)
        return out

    def to_numpy(self, a: Any) -> np.ndarray:
        """Copy an array of this backend back to a NumPy array (bfloat16 as float32)."""
        return self._to_numpy(a)

    def call(self, fn: Callable[..., Any], /, *arrays: Any, **options: Any) -> Any:
        """``fn(*arrays, **options)`` the way this backend runs code (``jax:jit``: jitted)."""
        if self._call is None:
            return fn(*arrays, **options)
        return self._call(fn, arrays, options)

    def synchronize(self) -> None:
        """Wait until queued device work has finished (a no-op on the CPU)."""
        self._sync(self.lib)


def _strict_device(lib: ModuleType, name: str | None) -> Any:
    return None if name is None else lib.Device(name)


def _strict(device_name: str | None) -> Backend:
    def asarray(lib: ModuleType, a: np.ndarray) -> Any:
        return lib.asarray(a, device=_strict_device(lib, device_name))

    def to_numpy(a: Any) -> np.ndarray:
        return np.array(to_host(a), copy=True)

    return Backend(
        id="array_api_strict" if device_name is None else f"array_api_strict:{device_name}",
        module="array_api_strict",
        _asarray=asarray,
        _to_numpy=to_numpy,
    )


def _torch(device: str) -> Backend:
    def check(lib: ModuleType) -> str | None:
        if device == "cuda" and not lib.cuda.is_available():
            return "torch.cuda.is_available() is False (no CUDA GPU)"
        return None

    def asarray(lib: ModuleType, a: np.ndarray) -> Any:
        return lib.from_numpy(np.ascontiguousarray(a)).to(device)

    def to_numpy(a: Any) -> np.ndarray:
        return np.array(to_host(a), copy=True)

    def sync(lib: ModuleType) -> None:
        if device == "cuda":
            lib.cuda.synchronize()

    return Backend(
        id="torch" if device == "cpu" else f"torch:{device}",
        module="torch",
        half_dtypes=("float16", "bfloat16"),
        gpu=device != "cpu",
        _check=check,
        _asarray=asarray,
        _to_numpy=to_numpy,
        _sync=sync,
    )


def _jax_check(lib: ModuleType) -> str | None:
    # The matrix's float64 rows need float64 arrays: JAX makes float32 ones unless
    # x64 is on (a process-wide switch; only the tests and the report turn it on).
    lib.config.update("jax_enable_x64", True)
    return None


def _jax(jit: bool) -> Backend:
    def call(fn: Callable[..., Any], arrays: tuple[Any, ...], options: dict[str, Any]) -> Any:
        import functools

        import jax

        return jax.jit(functools.partial(fn, **options))(*arrays)

    return Backend(
        id="jax:jit" if jit else "jax",
        module="jax",
        half_dtypes=("float16",),
        _check=_jax_check,
        _asarray=lambda lib, a: lib.numpy.asarray(a),
        _to_numpy=lambda a: np.array(to_host(a), copy=True),  # DLPack views are read-only
        _sync=lambda lib: None,
        _call=call if jit else None,
    )


def _dask_asarray(lib: ModuleType, a: np.ndarray) -> Any:
    import dask.array as da

    # Several chunks along every axis: the statistics must merge chunks correctly.
    return da.from_array(a, chunks=tuple(max(1, (s + 1) // 2) for s in a.shape))


def _cupy_check(lib: ModuleType) -> str | None:
    try:
        if lib.cuda.runtime.getDeviceCount() < 1:
            return "cupy found no CUDA device"
    except Exception as exc:
        return f"cupy cannot reach a CUDA device ({type(exc).__name__}: {exc})"
    return None


def _cupy_sync(lib: ModuleType) -> None:
    lib.cuda.get_current_stream().synchronize()


BACKENDS: tuple[Backend, ...] = (
    Backend(
        id="numpy",
        module="numpy",
        half_dtypes=("float16",),
        _asarray=lambda lib, a: a.copy(),
        _to_numpy=lambda a: np.array(to_host(a), copy=True),
    ),
    _strict(None),
    _strict("device1"),
    _torch("cpu"),
    _torch("cuda"),
    Backend(
        id="cupy",
        module="cupy",
        half_dtypes=("float16",),
        gpu=True,
        _check=_cupy_check,
        _asarray=lambda lib, a: lib.asarray(a),
        _to_numpy=to_host,
        _sync=_cupy_sync,
    ),
    _jax(jit=False),
    _jax(jit=True),
    Backend(
        id="dask",
        module="dask.array",
        half_dtypes=("float16",),
        _asarray=_dask_asarray,
        _to_numpy=lambda a: np.array(to_host(a), copy=True),
    ),
)


def get_backend(backend_id: str) -> Backend:
    """Look up a backend by id (``numpy``, ``torch:cuda``, ...)."""
    for b in BACKENDS:
        if b.id == backend_id:
            return b
    raise KeyError(f"unknown backend {backend_id!r}; known: {[b.id for b in BACKENDS]}")
