"""Where a small ``anybn.torch`` module call spends its time, layer by layer.

Usage (from the repository root)::

    PYTHONPATH=. python docs/scripts/module_overhead.py [--shape 8,16] [--number 3000]

Each line is the best of 7 repeats of ``number`` calls, in microseconds per call, for one
layer of the stack (each includes the layers below it): the compiled kernels on NumPy views,
the core on tensors (``_torch_ops.*_impl``), the ``autograd.Function`` (on the compiled kernels'
lane where Numba is installed), the functional drop-in with PyTorch's argument rules, the module
(its kept call: no checks after the first); and torch's own functional and module beside them.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

import anybn.torch as abt
from anybn import _kernels as _fastpaths
from anybn._kernels import numba_cpu as cpu
from anybn.torch import function as _torch_function
from anybn.torch import ops as _torch_ops


def best(fn: Callable[[], object], number: int, repeat: int = 7) -> float:
    """Seconds per call of ``fn``: the best of ``repeat`` runs of ``number`` calls."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="8,16")
    ap.add_argument("--number", type=int, default=3000)
    args = ap.parse_args()
    torch.set_num_threads(2)
    _fastpaths.set_num_threads(2)
    shape = tuple(int(s) for s in args.shape.split(","))
    c, n = shape[1], args.number
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=gen, requires_grad=True)
    dy = torch.randn(shape, generator=gen)
    w = torch.ones(c, requires_grad=True)
    b = torch.zeros(c, requires_grad=True)
    rm, rv = torch.zeros(c), torch.ones(c)
    xd, wd, bd = x.detach(), w.detach(), b.detach()
    out = _torch_ops.batch_norm_impl(xd, wd, bd, rm.clone(), rv.clone(), True, 0.1, 1e-5)
    mean, invstd = out[1], out[2]
    views = [t.numpy() for t in (dy, xd, wd, mean, invstd)]
    fn = _torch_function
    lane = fn.lane(x, w, b, rm, rv, True, 0.1, 1e-5, (rm, rv)) or fn.Eager(
        rm, rv, True, 0.1, 1e-5, (rm, rv)
    )
    module_cls = abt.BatchNorm1d if len(shape) <= 3 else abt.BatchNorm2d
    nn_cls = torch.nn.BatchNorm1d if len(shape) <= 3 else torch.nn.BatchNorm2d
    mod, ref = module_cls(c), nn_cls(c)

    def step(m: torch.nn.Module) -> None:
        m(x).backward(dy)

    rows = [
        ("kernels, forward (NumPy views)", lambda: cpu.forward(
            views[1], rm.numpy(), rv.numpy(), views[2], bd.numpy(),
            training=True, momentum=0.1, eps=1e-5, axis=1)),
        ("kernels, backward (NumPy views)", lambda: cpu.backward(
            *views, training=True, axis=1)),
        ("core on tensors, forward", lambda: _torch_ops.batch_norm_impl(
            xd, wd, bd, rm, rv, True, 0.1, 1e-5)),
        ("core on tensors, backward", lambda: _torch_ops.batch_norm_backward_impl(
            dy, xd, wd, mean, invstd, True)),
        ("autograd.Function, forward", lambda: _torch_function._BatchNormFunction.apply(
            x, w, b, lane)),
        ("anybn.torch.batch_norm, forward", lambda: abt.batch_norm(
            x, rm, rv, w, b, True, 0.1, 1e-5)),
        ("anybn.torch module, forward", lambda: mod(x)),
        ("anybn.torch module, forward + backward", lambda: step(mod)),
        ("torch.nn.functional.batch_norm, forward", lambda: torch.nn.functional.batch_norm(
            x, rm, rv, w, b, True, 0.1, 1e-5)),
        ("torch.nn module, forward", lambda: ref(x)),
        ("torch.nn module, forward + backward", lambda: step(ref)),
    ]  # fmt: skip
    print(f"shape {shape}, float32, 2 threads, best of 7 x {n} calls, us per call")
    for name, fn in rows:
        print(f"| {name} | {best(fn, n) * 1e6:.1f} |", flush=True)


if __name__ == "__main__":
    main()
