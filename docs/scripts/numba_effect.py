"""What ``anybn[numba]`` brings: the drop-in module's training step with and without Numba.

Usage (from the repository root)::

    PYTHONPATH=. python docs/scripts/numba_effect.py [--rounds 7] [--shape 32,64,56,56]

For float32 and float16 x (float16 module parameters and buffers), the forward +
``backward()`` of ``anybn.torch.BatchNorm2d`` ÷ that of ``nn.BatchNorm2d`` on the same CPU
tensors, timed in rotation in one process (the median over rounds of each round's best of
3), once in a process with Numba's compiled kernels and once with ``ANYBN_NUMBA=0`` (the
NumPy kernels and torch's own, what an install without the extra runs). ``dy`` is random,
and also ``ones`` (the gradient of ``y.sum()``), whose exact dx is zero: the computed one
is rounding noise, in float16 mostly subnormal numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def measure(shape: tuple[int, ...], rounds: int) -> dict[str, float]:
    """Ratios module ÷ nn in this process (ANYBN_NUMBA as set)."""
    import torch
    from torch import nn

    import anybn.torch

    torch.set_num_threads(2)
    out = {}
    for dtype in (torch.float32, torch.float16):
        x = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(dtype)
        x.requires_grad_(True)
        for dy_name in ("random", "ones"):
            dy = torch.ones_like(x) if dy_name == "ones" else torch.randn_like(x)
            pair = [anybn.torch.BatchNorm2d(shape[1]).to(dtype), nn.BatchNorm2d(shape[1]).to(dtype)]

            def step(m: nn.Module, x: torch.Tensor = x, dy: torch.Tensor = dy) -> None:
                x.grad = None
                m(x).backward(dy)

            for m in pair:
                step(m)  # warm-up: compilation, allocator
            times: list[list[float]] = [[], []]
            for _ in range(rounds):
                for i in (0, 1) if len(times[0]) % 2 == 0 else (1, 0):
                    best = float("inf")
                    for _ in range(3):
                        start = time.perf_counter()
                        step(pair[i])
                        best = min(best, time.perf_counter() - start)
                    times[i].append(best)
            a, b = (statistics.median(t) for t in times)
            out[f"{str(dtype).removeprefix('torch.')} dy={dy_name}"] = a / b
            out[f"{str(dtype).removeprefix('torch.')} dy={dy_name} nn ms"] = b * 1e3
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--shape", default="32,64,56,56")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    if args.child:
        print(json.dumps(measure(shape, args.rounds)))
        return
    results = {}
    for label, numba in (("with Numba", "1"), ("ANYBN_NUMBA=0", "0")):
        env = {**os.environ, "ANYBN_NUMBA": numba}
        cmd = [sys.executable, __file__, "--child", "--rounds", str(args.rounds)]
        cmd += ["--shape", args.shape]
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
        results[label] = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"anybn.torch.BatchNorm2d ÷ nn.BatchNorm2d, forward + backward(), {shape}, "
          f"median of {args.rounds} rounds in rotation")  # fmt: skip
    print("| x, dy | with Numba | ANYBN_NUMBA=0 | nn (ms) |")
    print("|---|---|---|---|")
    for key in results["with Numba"]:
        if key.endswith(" nn ms"):
            continue
        a, b = results["with Numba"][key], results["ANYBN_NUMBA=0"][key]
        ms = results["with Numba"][key + " nn ms"]
        print(f"| {key} | {a:.2f} | {b:.2f} | {ms:.1f} |")


if __name__ == "__main__":
    main()
