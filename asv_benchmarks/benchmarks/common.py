"""Shared set-up for the benchmarks: backends, shapes, dtypes, data and thread counts.

Environment variables (read at import, so that asv sees the filtered parameters):

``ANYBN_BENCH_BACKENDS``
    Comma-separated backend ids to benchmark (default: all of ``BACKENDS``). CI uses
    ``numpy,torch,array_api_strict``. A backend that is not installed, or whose
    device is missing, is skipped anyway (``NotImplementedError`` in ``setup``).
``ANYBN_BENCH_SHAPES``
    Shape names separated by commas (default: all of ``SHAPES``; with the quick
    profile, :data:`QUICK_SHAPES`). Names contain commas themselves, so the value is
    split only at commas outside parentheses: ``"(8,16),(256,512)"`` names two shapes.
``ANYBN_BENCH_PROFILE``
    ``full`` (default), ``quick``: every benchmark on the small and mid-size shapes with
    short timing (one round, up to 3 repeats; CI uses it), or ``results``: every shape,
    one round of up to 5 repeats (the benchmark page's run).
``ANYBN_BENCH_THREADS``
    CPU threads for torch and for anybn's NumPy kernels (default 2). NumPy's own
    BLAS is not on anybn's hot path; set ``OPENBLAS_NUM_THREADS`` to match if you
    time BLAS-based peers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from anybn._testing.backends import Backend, get_backend

ALL_BACKENDS = ("numpy", "torch", "array_api_strict", "torch:cuda", "cupy")


@dataclass(frozen=True)
class Shape:
    """A benchmark input: its logical (N, C, ...) shape and whether it is channels-last."""

    dims: tuple[int, ...]
    channels_last: bool = False

    @property
    def channels(self) -> int:
        return self.dims[1]


SHAPES: dict[str, Shape] = {
    "(32,64,56,56)": Shape((32, 64, 56, 56)),
    "(8,256,14,14)": Shape((8, 256, 14, 14)),
    "(256,512)": Shape((256, 512)),
    "(32,64,56,56)-channels-last": Shape((32, 64, 56, 56), channels_last=True),
    "(4096,1024)": Shape((4096, 1024)),
    "(8,16)": Shape((8, 16)),
}
DTYPES = ("float32", "float16")


#: The quick profile's shapes: per-call overhead and the two mid sizes.
QUICK_SHAPES = ("(8,16)", "(256,512)", "(8,256,14,14)")


def split_names(value: str) -> list[str]:
    """``value`` split at the commas outside parentheses: ``"(8,16),a"`` -> ``["(8,16)", "a"]``."""
    names, depth, current = [], 0, []
    for ch in value:
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            names.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    names.append("".join(current).strip())
    return [n for n in names if n]


def _selected(
    env: str, known: tuple[str, ...], default: tuple[str, ...] | None = None
) -> list[str]:
    value = os.environ.get(env, "").strip()
    if not value:
        return list(known if default is None else default)
    chosen = split_names(value)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise ValueError(f"{env}: unknown {unknown}; known: {list(known)}")
    return chosen


PROFILE = os.environ.get("ANYBN_BENCH_PROFILE", "full").strip().lower() or "full"
if PROFILE not in ("full", "quick", "results"):
    raise ValueError(
        f"ANYBN_BENCH_PROFILE must be 'full', 'quick' or 'results', got {PROFILE!r}"
    )
QUICK = PROFILE == "quick"
#: The benchmark page's run: every shape, asv's samples cut to one round of up to 5 repeats.
SHORT = PROFILE in ("quick", "results")

BACKENDS = _selected("ANYBN_BENCH_BACKENDS", ALL_BACKENDS)
SHAPE_NAMES = _selected("ANYBN_BENCH_SHAPES", tuple(SHAPES), QUICK_SHAPES if QUICK else None)

#: asv timing attributes for every timing class: the quick profile takes one round of a few
#: short repeats (asv's defaults: 2 rounds, up to 10 repeats, a warm-up of up to 10 s).
TIMING: dict[str, object] = (
    {"rounds": 1, "repeat": (1, 3, 1.0), "warmup_time": 0.05, "min_run_count": 1}
    if QUICK
    else {"rounds": 1, "repeat": (1, 5, 2.0), "warmup_time": 0.1, "min_run_count": 1}
    if SHORT
    else {}
)


if SHORT:
    # asv forks every benchmark from a server that imported this module: importing torch
    # and loading anybn's compiled kernels here, once, saves seconds per benchmark.
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    from anybn._kernels import numba_cpu  # noqa: F401  (loads the compiled kernels)


def timing(cls: type) -> type:
    """Apply :data:`TIMING` to a benchmark class (a no-op in the full profile)."""
    for k, v in TIMING.items():
        setattr(cls, k, v)
    return cls


THREADS = int(os.environ.get("ANYBN_BENCH_THREADS", "2"))


def set_threads() -> None:
    """The same number of CPU threads for torch and for anybn's NumPy kernels."""
    from anybn._kernels import numpy_blocks as _numpy_kernels

    _numpy_kernels.set_num_threads(THREADS)
    try:
        import torch
    except ImportError:
        return
    torch.set_num_threads(THREADS)


def require(backend_id: str, dtype: str) -> Backend:
    """The backend, or ``NotImplementedError`` (asv: skipped) when it cannot run this."""
    backend = get_backend(backend_id)
    reason = backend.unavailable_reason()
    if reason is not None:
        raise NotImplementedError(reason)
    if dtype not in backend.dtypes:
        raise NotImplementedError(f"{backend_id} has no {dtype}")
    return backend


@dataclass
class Data:
    """One benchmark's arrays on a backend, in the layout the shape asks for."""

    x: Any
    dy: Any
    weight: Any
    bias: Any
    running_mean: Any
    running_var: Any
    axis: int


def make_data(backend: Backend, shape: Shape, dtype: str, seed: int = 0) -> Data:
    """Normal data (mean 3, std 1), affine parameters and running statistics.

    Channels-last means what each library's users write: for PyTorch a
    ``(N, C, H, W)`` tensor in ``torch.channels_last`` memory format with
    ``axis=1``; for the others an ``(N, H, W, C)`` array with ``axis=-1``. Both
    have the same memory layout.
    """
    rng = np.random.default_rng(seed)
    dims = shape.dims
    torch_like = backend.module == "torch"
    axis = 1
    if shape.channels_last and not torch_like:
        dims = (dims[0], *dims[2:], dims[1])
        axis = -1
    x = rng.standard_normal(dims, dtype=np.float32) + 3.0
    dy = rng.standard_normal(dims, dtype=np.float32)
    c = shape.channels
    vec_dtype = "float32" if dtype in ("float16", "bfloat16") else dtype
    vecs = [
        rng.uniform(0.5, 1.5, c).astype(np.float32),
        rng.standard_normal(c).astype(np.float32),
        rng.standard_normal(c).astype(np.float32),
        rng.uniform(0.5, 2.0, c).astype(np.float32),
    ]
    xs, dys = backend.asarray(x, dtype), backend.asarray(dy, dtype)
    if shape.channels_last and torch_like:
        import torch

        xs = xs.contiguous(memory_format=torch.channels_last)
        dys = dys.contiguous(memory_format=torch.channels_last)
    w, b, rm, rv = (backend.asarray(v, vec_dtype) for v in vecs)
    return Data(xs, dys, w, b, rm, rv, axis)
