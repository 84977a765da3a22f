"""The backend report behind ``python -m anybn``.

For every backend in :data:`anybn._testing.backends.BACKENDS` it says whether the
backend runs here (or why it is skipped), the largest forward and backward
error against the float64 reference in :mod:`anybn._testing.reference`, and the
forward and backward time on a standard shape.
"""

from __future__ import annotations

import argparse
import platform
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import _kernels as kernels
from .._api import batch_norm, batch_norm_backward
from .backends import BACKENDS, Backend
from .reference import reference_backward, reference_forward

__all__ = ["BackendResult", "check_backend", "main", "run_report"]

#: The shape timed by the report (N, C, H, W), float32.
STANDARD_SHAPE = (32, 64, 28, 28)
#: The shape whose results are compared with the float64 reference.
CHECK_SHAPE = (16, 8, 6, 6)
#: Largest error accepted, relative to the largest reference value (float32 data).
TOLERANCE = 1e-4


@dataclass
class BackendResult:
    """The outcome of checking one backend."""

    backend: str
    status: str  # "ok", "FAIL", "ERROR" or "skipped"
    detail: str = ""
    forward_error: float = float("nan")
    backward_error: float = float("nan")
    forward_ms: float = float("nan")
    backward_ms: float = float("nan")
    engine: str = ""  #: what computed the timed forward (:func:`anybn._kernels.engine`)

    @property
    def failed(self) -> bool:
        """Whether an available backend disagreed or raised."""
        return self.status in ("FAIL", "ERROR")


def _relative_error(got: np.ndarray, want: np.ndarray) -> float:
    scale = max(float(np.max(np.abs(want))), 1.0)
    return float(np.max(np.abs(got.astype(np.float64) - want))) / scale


def _errors(backend: Backend, seed: int) -> tuple[float, float]:
    """Largest relative forward and backward errors over train and eval."""
    rng = np.random.default_rng(seed)
    c = CHECK_SHAPE[1]
    x = (rng.standard_normal(CHECK_SHAPE) * 3 + 50).astype(np.float32)
    dy = rng.standard_normal(CHECK_SHAPE).astype(np.float32)
    w = rng.uniform(0.5, 1.5, c).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    rm = (rng.standard_normal(c) + 50).astype(np.float32)
    rv = rng.uniform(5, 15, c).astype(np.float32)
    a = backend.asarray
    fwd_err = bwd_err = 0.0
    for training in (True, False):
        out = batch_norm(a(x), a(rm), a(rv), a(w), a(b), training=training)
        grads = batch_norm_backward(a(dy), a(x), a(w), out.mean, out.invstd, training=training)
        ref = reference_forward(x, rm, rv, w, b, training=training)
        gref = reference_backward(dy, x, w, training=training, running_mean=rm, running_var=rv)
        assert out.new_running_mean is not None and out.new_running_var is not None
        assert ref.running_mean is not None and ref.running_var is not None
        fwd_err = max(
            fwd_err,
            _relative_error(backend.to_numpy(out.y), ref.y),
            _relative_error(backend.to_numpy(out.new_running_mean), ref.running_mean),
            _relative_error(backend.to_numpy(out.new_running_var), ref.running_var),
        )
        bwd_err = max(
            bwd_err,
            _relative_error(backend.to_numpy(grads.dx), gref.dx),
            _relative_error(backend.to_numpy(grads.dweight), gref.dweight),
            _relative_error(backend.to_numpy(grads.dbias), gref.dbias),
        )
    return fwd_err, bwd_err


def _best_ms(fn: Callable[[], object], backend: Backend, repeat: int) -> float:
    fn()  # warm-up (kernel compilation, allocator)
    backend.synchronize()
    best = float("inf")
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        backend.synchronize()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def _timings(backend: Backend, shape: Sequence[int], repeat: int) -> tuple[float, float, str]:
    rng = np.random.default_rng(0)
    x = backend.asarray(rng.standard_normal(shape, dtype=np.float32))
    engine = kernels.engine(x)
    dy = backend.asarray(rng.standard_normal(shape, dtype=np.float32))
    out = batch_norm(x, training=True)
    fwd = _best_ms(lambda: batch_norm(x, training=True), backend, repeat)
    bwd = _best_ms(lambda: batch_norm_backward(dy, x, None, out.mean, out.invstd), backend, repeat)
    return fwd, bwd, engine


def check_backend(
    backend: Backend, *, shape: Sequence[int] = STANDARD_SHAPE, repeat: int = 5, seed: int = 0
) -> BackendResult:
    """Check one backend: availability, accuracy against float64, timings."""
    reason = backend.unavailable_reason()
    if reason is not None:
        return BackendResult(backend.id, "skipped", reason)
    try:
        fwd_err, bwd_err = _errors(backend, seed)
        fwd_ms, bwd_ms, engine = _timings(backend, shape, repeat)
    except Exception as exc:
        return BackendResult(backend.id, "ERROR", f"{type(exc).__name__}: {exc}")
    ok = fwd_err <= TOLERANCE and bwd_err <= TOLERANCE
    detail = "" if ok else f"error above tolerance {TOLERANCE:g}"
    return BackendResult(
        backend.id, "ok" if ok else "FAIL", detail, fwd_err, bwd_err, fwd_ms, bwd_ms, engine
    )


def run_report(
    backends: Sequence[Backend] = BACKENDS,
    *,
    shape: Sequence[int] = STANDARD_SHAPE,
    repeat: int = 5,
    out: Callable[[str], object] = print,
) -> list[BackendResult]:
    """Check every backend and print the report table."""
    import array_api_compat

    from .. import __version__

    out(
        f"anybn {__version__} | Python {platform.python_version()} | numpy {np.__version__} | "
        f"array-api-compat {array_api_compat.__version__} | {platform.machine()}"
    )
    out(
        f"accuracy: float32 train+eval on {CHECK_SHAPE} vs float64 reference "
        f"(max error relative to max |value|, tolerance {TOLERANCE:g})"
    )
    out(f"timing: float32 training forward / backward on {tuple(shape)}, best of {repeat}\n")
    header = (
        f"{'backend':<26} {'status':<8} {'fwd err':>9} {'bwd err':>9} {'fwd ms':>9} {'bwd ms':>9}"
        "  engine"
    )
    out(header)
    out("-" * len(header))
    results = []
    for backend in backends:
        r = check_backend(backend, shape=shape, repeat=repeat)
        results.append(r)
        if r.status == "skipped" or r.status == "ERROR":
            out(f"{r.backend:<26} {r.status:<8} {r.detail}")
        else:
            out(
                f"{r.backend:<26} {r.status:<8} {r.forward_error:>9.1e} {r.backward_error:>9.1e} "
                f"{r.forward_ms:>9.2f} {r.backward_ms:>9.2f}  {r.engine}"
                + (f"  {r.detail}" if r.detail else "")
            )
    ran = [r for r in results if r.status != "skipped"]
    failed = [r for r in results if r.failed]
    out(f"\n{len(ran)} backend(s) ran, {len(results) - len(ran)} skipped, {len(failed)} failed")
    return results


def parse_shape(text: str) -> tuple[int, ...]:
    """A shape written as ``8,3``, ``(8, 3)``, ``[8, 3]`` or ``8x3``.

    Examples
    --------
    >>> parse_shape("(32, 64, 28, 28)"), parse_shape("8x3"), parse_shape("8,3")
    ((32, 64, 28, 28), (8, 3), (8, 3))
    """
    parts = [p for p in re.split(r"[\s,x]+", text.strip().strip("()[]")) if p]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"a shape is positive integers such as 32,64,28,28 or '(32, 64, 28, 28)', got {text!r}"
        ) from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(
            f"a shape needs at least two positive sizes (N, C, ...), got {text!r}"
        )
    return shape


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m anybn``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m anybn",
        description="Check every array backend anybn can find: accuracy and speed.",
        epilog=(
            "python -m anybn gpu-check --out DIR: the one-command check of a CUDA machine "
            "(the GPU rows of the tests and benchmarks, figures written to DIR); "
            "python -m anybn gpu-check --help for its options"
        ),
    )
    parser.add_argument(
        "--backend",
        action="append",
        choices=[b.id for b in BACKENDS],
        help="check only this backend (repeatable); default: all",
    )
    parser.add_argument(
        "--shape",
        type=parse_shape,
        default=STANDARD_SHAPE,
        help=(
            "the shape to time (N, C, ...), written 32,64,28,28 or '(32, 64, 28, 28)' "
            f"(default: {','.join(map(str, STANDARD_SHAPE))})"
        ),
    )
    parser.add_argument("--repeat", type=int, default=5, help="timing repeats (default: 5)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    chosen = [b for b in BACKENDS if args.backend is None or b.id in args.backend]
    results = run_report(chosen, shape=args.shape, repeat=args.repeat)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
