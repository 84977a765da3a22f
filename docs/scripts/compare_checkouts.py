"""anybn's NumPy path in this checkout ÷ in another, in one process, candidates in rotation.

Usage (from the repository root)::

    git worktree add /tmp/anybn-base <commit>        # or any copy of another checkout
    PYTHONPATH=. python docs/scripts/compare_checkouts.py /tmp/anybn-base [--threads 1 2]

The other checkout's ``anybn`` package is copied to a temporary directory as
``anybn_base`` (its imports are relative) and imported beside this one; each has its own
compiled kernels (Numba's cache keys them by file). For each input of the layer sweep
(``asv_benchmarks/benchmarks/bench_sweep.py``) and each thread count, forward + backward
on NumPy arrays (float32, training, weight, bias, running statistics): the median over
rounds of this ÷ base, timed back to back in alternating order (below 1: this checkout is
faster).
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "asv_benchmarks"))

import sweep
from benchmarks.bench_sweep import SWEEP
from sweep import best, number_for

import anybn
from anybn import _kernels


def load_base(path: Path) -> tuple[Any, Any]:
    """``(anybn_base, anybn_base._kernels)`` from the other checkout."""
    tmp = Path(tempfile.mkdtemp(prefix="anybn-compare-"))
    shutil.copytree(path / "anybn", tmp / "anybn_base")
    sys.path.insert(0, str(tmp))
    return importlib.import_module("anybn_base"), importlib.import_module("anybn_base._kernels")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("base", type=Path, help="the other checkout (its root directory)")
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=list(SWEEP))
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: the calling thread's CPU time (one thread only)")  # fmt: skip
    args = ap.parse_args()
    if args.clock == "thread":
        if args.threads != [1]:
            ap.error("--clock thread measures the calling thread only: use --threads 1")
        sweep.CLOCK = time.thread_time
    base, base_kernels = load_base(args.base)
    print(f"this ÷ {args.base}, NumPy forward + backward, float32, medians of {args.rounds}, "
          f"{args.clock} clock")  # fmt: skip
    print("| input | " + " | ".join(f"{t} thread(s)" for t in args.threads) + " |")
    print("|---" * (len(args.threads) + 1) + "|", flush=True)
    for name in args.shapes:
        spec = SWEEP[name]
        dims = spec.dims
        axis = 1
        if spec.channels_last:
            dims, axis = (dims[0], *dims[2:], dims[1]), -1
        rng = np.random.default_rng(0)
        x = rng.standard_normal(dims, dtype=np.float32) + 3
        dy = rng.standard_normal(dims, dtype=np.float32)
        c = spec.channels
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)

        def run(lib: Any, x=x, dy=dy, w=w, b=b, rm=rm, rv=rv, axis=axis) -> None:
            out = lib.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
            lib.batch_norm_backward(dy, x, w, out.mean, out.invstd, training=True, axis=axis)

        number = number_for(x.size)
        cells = []
        for threads in args.threads:
            _kernels.set_num_threads(threads)
            base_kernels.set_num_threads(threads)
            run(anybn), run(base)
            ratios = []
            for i in range(args.rounds):
                order = (anybn, base) if i % 2 == 0 else (base, anybn)
                t = {id(lib): best(lambda lib=lib: run(lib), number) for lib in order}
                ratios.append(t[id(anybn)] / t[id(base)])
            cells.append(f"{statistics.median(ratios):.2f}")
        print(f"| {name.replace('-channels-last', ' CL')} | " + " | ".join(cells) + " |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
