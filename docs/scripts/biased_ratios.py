"""Speed of ``var_estimator="biased"`` against the unbiased estimator: interleaved ratios.

Usage (from the repository root)::

    PYTHONPATH=. python docs/scripts/biased_ratios.py [--rounds 11] [--threads 2]
        [--shape 16,28,28,64] [--axis -1] [--dtypes float32 float16] [--libraries numpy torch]

The training forward with running statistics (the only call the estimator changes), on NumPy
arrays and torch CPU tensors of the same shape and layout. Per library and dtype it prints the
median over interleaved rounds (A B, B A, ...; :func:`speed_ratios.ratio`) of:

* ``generic/unbiased``: ``var_estimator="biased"`` on the generic array-API path, fully
  validated (``xp=`` given, fast paths off: the route every biased call took before the fast
  paths served it) / the unbiased call on its fast path;
* ``biased/unbiased``: the biased call as it runs now / the unbiased call;
* ``biased/generic``: the biased call now / on the generic path (below 1: faster now).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import array_api_compat
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from speed_ratios import ratio

import anybn
from anybn._kernels import fast_paths
from anybn._kernels import numpy_blocks as _numpy_kernels


def measure(library: str, dtype: str, args: argparse.Namespace) -> list[float]:
    shape = tuple(int(s) for s in args.shape.split(","))
    c = shape[args.axis]
    rng = np.random.default_rng(0)
    vec = "float32" if dtype == "float16" else dtype
    x = (rng.standard_normal(shape, dtype=np.float32) + 3).astype(dtype)
    stats = [np.zeros(c, vec), np.ones(c, vec), rng.uniform(0.5, 1.5, c).astype(vec),
             rng.standard_normal(c).astype(vec)]  # fmt: skip
    if library == "torch":
        x, stats = torch.from_numpy(x), [torch.from_numpy(a) for a in stats]
    xp = array_api_compat.array_namespace(x)
    kw = {"training": True, "axis": args.axis}
    number = max(1, int(3e6 // np.prod(shape)))

    def unbiased() -> object:
        return anybn.batch_norm(x, *stats, **kw)

    def biased() -> object:
        return anybn.batch_norm(x, *stats, **kw, var_estimator="biased")

    def generic() -> object:
        with fast_paths(False):
            return anybn.batch_norm(x, *stats, **kw, var_estimator="biased", xp=xp)

    pairs = [(generic, unbiased), (biased, unbiased), (biased, generic)]
    return [ratio(a, b, args.rounds, number) for a, b in pairs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--shape", default="16,28,28,64")
    ap.add_argument("--axis", type=int, default=-1)
    ap.add_argument("--dtypes", nargs="*", default=["float32", "float16"])
    ap.add_argument("--libraries", nargs="*", default=["numpy", "torch"])
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _numpy_kernels.set_num_threads(args.threads)
    print(f"training forward, shape ({args.shape}) axis {args.axis}, {args.threads} threads, "
          f"medians of {args.rounds} interleaved rounds")  # fmt: skip
    cols = ["generic/unbiased", "biased/unbiased", "biased/generic"]
    print("| library | dtype | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 2) + "|")
    for library in args.libraries:
        for dtype in args.dtypes:
            row = measure(library, dtype, args)
            print(f"| {library} | {dtype} | " + " | ".join(f"{r:.2f}" for r in row) + " |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
