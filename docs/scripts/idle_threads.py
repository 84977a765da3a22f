"""Do anybn's threads busy-wait? CPU time while idle, and beside torch's threads.

Usage (from the repository root)::

    PYTHONPATH=. python docs/scripts/idle_threads.py [--shape 256,512] [--threads 2]

Three figures, for the compiled CPU kernels as they run here (on Numba's TBB layer where
Numba and tbb are installed, else on anybn's Python pool):

* the process's CPU time during a 1 s sleep right after a burst of anybn calls (a worker
  that spins between calls shows up here; torch's OpenMP workers spin for a while after
  each of torch's calls, which the same figure after a burst of torch calls shows);
* a loop that alternates one torch operation (``F.batch_norm`` on the same input) with one
  anybn forward, timed, ÷ the sum of each loop alone: far above 1 when one library's
  threads spin on the cores the other needs;
* which threading the kernels use.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from anybn import _kernels
from anybn._kernels import numba_cpu, pool


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def idle_cpu(burst: Callable[[], object], calls: int) -> float:
    """CPU seconds the process uses during a 1 s sleep right after ``calls`` of ``burst``."""
    for _ in range(calls):
        burst()
    c = cpu_seconds()
    time.sleep(1.0)
    return cpu_seconds() - c


def per_call(fn: Callable[[], object], calls: int, repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t) / calls)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="256,512")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    torch.set_num_threads(args.threads)
    _kernels.set_num_threads(args.threads)
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32) + 3
    tx = torch.from_numpy(x.copy())
    w = np.ones(shape[1], np.float32)

    def ours() -> object:
        return numba_cpu.forward(
            x, None, None, w, None, training=True, momentum=0.1, eps=1e-5, axis=1
        )

    def theirs() -> object:
        return torch.nn.functional.batch_norm(tx, None, None, training=True)

    def both() -> None:
        theirs()
        ours()

    ours(), theirs()
    calls = max(10, int(2e7 // x.size))
    threading = "Numba's TBB layer" if pool.tbb_layer() else "anybn's Python pool"
    print(f"input {shape}, {args.threads} threads; anybn's compiled kernels on {threading}")
    print(f"CPU seconds in a 1 s sleep after anybn calls: {idle_cpu(ours, calls):.3f}")
    print(f"CPU seconds in a 1 s sleep after torch calls: {idle_cpu(theirs, calls):.3f}")
    t_ours, t_theirs = per_call(ours, calls), per_call(theirs, calls)
    t_both = per_call(both, calls)
    print(f"anybn {t_ours * 1e6:.0f} us, torch {t_theirs * 1e6:.0f} us, alternating "
          f"{t_both * 1e6:.0f} us a pair: {t_both / (t_ours + t_theirs):.2f}x the sum")  # fmt: skip


if __name__ == "__main__":
    main()
