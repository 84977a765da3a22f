"""Does anybn's worker pool pay at a size? Compiled kernels threaded / serial, per pass.

Usage (from the repository root)::

    PYTHONPATH=. python docs/scripts/thread_split.py [--dtype float32] [--rounds 7]

For each shape, the forward and the backward of the compiled CPU kernels run once with every
input on the calling thread and once split among anybn's threads (2), interleaved; printed:
the median over rounds of threaded / serial time (below 1: the threads pay) and the serial time.
"""

from __future__ import annotations

import argparse
import statistics

import numpy as np
from module_overhead import best  # docs/scripts/, the directory of this script

from anybn import _kernels as _fastpaths
from anybn._kernels import numba_cpu as cpu

SHAPES = [(256, 512), (8, 256, 14, 14), (4096, 1024), (32, 64, 56, 56)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    _fastpaths.set_num_threads(2)
    threshold = cpu.PARALLEL_MIN
    rng = np.random.default_rng(0)
    print(f"{args.dtype}, 2 threads; threaded / serial, median of {args.rounds} rounds")
    for shape in SHAPES:
        x = (rng.standard_normal(shape) + 3).astype(args.dtype)
        w = np.ones(shape[1], np.float32 if args.dtype == "float16" else args.dtype)
        out = cpu.forward(x, None, None, w, None, training=True, momentum=0.1, eps=1e-5, axis=1)

        def fwd(x: np.ndarray = x, w: np.ndarray = w) -> object:
            opts = {"training": True, "momentum": 0.1, "eps": 1e-5, "axis": 1}
            return cpu.forward(x, None, None, w, None, **opts)

        def bwd(x: np.ndarray = x, w: np.ndarray = w, out: tuple = out) -> object:
            return cpu.backward(x, x, w, out[1], out[2], training=True, axis=1)

        number = max(3, int(3e6 / x.size))
        ratios: dict[str, list[float]] = {"forward": [], "backward": []}
        serial: dict[str, float] = {}
        try:
            for _ in range(args.rounds):
                for name, fn in (("forward", fwd), ("backward", bwd)):
                    cpu.PARALLEL_MIN = 1 << 62
                    s = best(fn, number, repeat=3)
                    cpu.PARALLEL_MIN = 1
                    ratios[name].append(best(fn, number, repeat=3) / s)
                    serial[name] = min(serial.get(name, s), s)
        finally:
            cpu.PARALLEL_MIN = threshold
        cells = [
            f"{name} {statistics.median(ratios[name]):.2f} (serial {serial[name] * 1e6:.0f} us)"
            for name in ("forward", "backward")
        ]
        print(f"| {shape} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
