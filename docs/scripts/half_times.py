"""float16 on the CPU: anybn's times per pass beside torch's native kernels.

Usage (from the repository root)::

    PYTHONPATH=. python docs/scripts/half_times.py [--rounds 9] [--threads 2] [--memory]

For each shape, milliseconds (median over interleaved rounds, each round the best of a few
calls) of the training forward, the backward and both, for anybn on NumPy float16 arrays
(``anybn.batch_norm`` / ``anybn.batch_norm_backward``), anybn on float16 CPU tensors, and
torch's native kernels (``torch.native_batch_norm``, ``aten.native_batch_norm_backward``,
``F.batch_norm`` + autograd for both); then anybn / native per pass. Weights and running
statistics are float32 beside float16 x, as mixed-precision training has them.
``--memory`` adds the peak of NumPy allocations (tracemalloc) during a forward+backward on
NumPy arrays, less y and dx, as a fraction of x's bytes.
"""

from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc
from collections.abc import Callable

import numpy as np
import torch

import anybn
from anybn import _kernels as _fastpaths

SHAPES = {
    "(32,64,56,56)": ((32, 64, 56, 56), False),
    "(32,64,56,56)-cl": ((32, 64, 56, 56), True),
    "(4096,1024)": ((4096, 1024), False),
    "(256,512)": ((256, 512), False),
    "(8,256,14,14)": ((8, 256, 14, 14), False),
}

COLS = ["np fwd", "np bwd", "np f+b", "tt fwd", "tt bwd", "tt f+b", "nat fwd", "nat bwd", "nat f+b"]
COLS += ["np/nat f+b", "tt/nat fwd", "tt/nat bwd", "tt/nat f+b"]


def _best(fn: Callable[[], object], number: int) -> float:
    best = float("inf")
    for _ in range(3):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def _medians(fns: dict[str, Callable[[], object]], rounds: int, number: int) -> dict[str, float]:
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for i in range(rounds):
        for k in names if i % 2 else reversed(names):
            times[k].append(_best(fns[k], number))
    return {k: statistics.median(v) * 1e3 for k, v in times.items()}


def _row(name: str, rounds: int, memory: bool) -> None:
    dims, cl = SHAPES[name]
    rng = np.random.default_rng(0)
    c = dims[1]
    tx = torch.from_numpy(rng.standard_normal(dims, dtype=np.float32) + 3).half()
    tdy = torch.from_numpy(rng.standard_normal(dims, dtype=np.float32)).half()
    if cl:
        tx = tx.contiguous(memory_format=torch.channels_last)
        tdy = tdy.contiguous(memory_format=torch.channels_last)
    nx, ndy, ax = tx.numpy(), tdy.numpy(), 1  # the same memory as the tensors
    if cl:
        nx, ndy, ax = np.moveaxis(nx, 1, -1), np.moveaxis(ndy, 1, -1), -1
    w = torch.from_numpy(rng.uniform(0.5, 1.5, c).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(c).astype(np.float32))
    rm, rv = torch.zeros(c), torch.ones(c)
    nw, nb, nrm, nrv = w.numpy(), b.numpy(), rm.numpy(), rv.numpy()
    o = anybn.batch_norm(nx, nrm, nrv, nw, nb, training=True, axis=ax)
    to = anybn.batch_norm(tx, rm, rv, w, b, training=True)
    _, smean, sinv = torch.native_batch_norm(tx, w, b, rm, rv, True, 0.1, 1e-5)
    xg = tx.detach().requires_grad_()

    def np_fb() -> None:
        out = anybn.batch_norm(nx, nrm, nrv, nw, nb, training=True, axis=ax)
        anybn.batch_norm_backward(ndy, nx, nw, out.mean, out.invstd, training=True, axis=ax)

    def tt_fb() -> None:
        out = anybn.batch_norm(tx, rm, rv, w, b, training=True)
        anybn.batch_norm_backward(tdy, tx, w, out.mean, out.invstd, training=True)

    def nat_fb() -> None:
        torch.nn.functional.batch_norm(xg, rm, rv, w, b, training=True).backward(tdy)
        xg.grad = None

    fns: dict[str, Callable[[], object]] = {
        "np fwd": lambda: anybn.batch_norm(nx, nrm, nrv, nw, nb, training=True, axis=ax),
        "np bwd": lambda: anybn.batch_norm_backward(
            ndy, nx, nw, o.mean, o.invstd, training=True, axis=ax
        ),
        "np f+b": np_fb,
        "tt fwd": lambda: anybn.batch_norm(tx, rm, rv, w, b, training=True),
        "tt bwd": lambda: anybn.batch_norm_backward(tdy, tx, w, to.mean, to.invstd, training=True),
        "tt f+b": tt_fb,
        "nat fwd": lambda: torch.native_batch_norm(tx, w, b, rm, rv, True, 0.1, 1e-5),
        "nat bwd": lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, w, rm, rv, smean, sinv, True, 1e-5, [True, True, True]
        ),
        "nat f+b": nat_fb,
    }
    number = max(1, int(2e6 // tx.numel()))
    t = _medians(fns, rounds, number)
    ratios = [t["np f+b"] / t["nat f+b"]]
    ratios += [t[f"tt {p}"] / t[f"nat {p}"] for p in ("fwd", "bwd", "f+b")]
    cells = [f"{t[k]:.2f}" for k in COLS[:9]] + [f"{r:.2f}" for r in ratios]
    print(f"| {name} | " + " | ".join(cells) + " |", flush=True)
    if memory:
        tracemalloc.start()
        np_fb()
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        out = anybn.batch_norm(nx, nrm, nrv, nw, nb, training=True, axis=ax)
        g = anybn.batch_norm_backward(ndy, nx, nw, out.mean, out.invstd, training=True, axis=ax)
        peak = tracemalloc.get_traced_memory()[1] - base
        tracemalloc.stop()
        temp = peak - out.y.nbytes - g.dx.nbytes
        print(f"  peak {peak / nx.nbytes:.3f} x's bytes, less y and dx {temp / nx.nbytes:.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=9)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--memory", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _fastpaths.set_num_threads(args.threads)
    print(f"float16, {args.threads} threads, ms: medians of {args.rounds} interleaved rounds")
    print("| input | " + " | ".join(COLS) + " |")
    print("|---" * (len(COLS) + 1) + "|")
    for name in args.shapes:
        _row(name, args.rounds, args.memory)


if __name__ == "__main__":
    main()
