"""Same-process speed ratios (docs/benchmarks.md): anybn / peer, interleaved, median of rounds.

Usage (from the repository root; 2 threads for torch and anybn, as in asv)::

    PYTHONPATH=. python docs/scripts/speed_ratios.py [--rounds 15] [--shapes "(8,16)" ...]

Each round times anybn and its peer back to back (the order alternates), each as the best of a
few repeats of ``number`` calls; the ratio per round is anybn / peer and the figure printed is the
median over rounds (below 1: anybn faster). Columns, forward+backward (training):

* ``np/torch``: anybn on NumPy arrays / ``F.batch_norm`` + autograd on torch CPU tensors;
* ``np/textbook``: anybn on NumPy / the hand-written NumPy batch norm (asv's ``TextbookNumPy``);
* ``torch/torch``: ``anybn.batch_norm`` + ``anybn.batch_norm_backward`` on torch tensors / native;
* ``module/nn``: ``anybn.torch.BatchNorm{1,2}d`` forward + ``backward()`` / ``nn.BatchNorm{1,2}d``;
* ``fwd`` and ``bwd`` ratios per pass for the NumPy and torch-tensor columns.

Timings are noisy on a shared machine: the interleaving makes the ratios fair, not exact.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "asv_benchmarks"))

from benchmarks.bench_peers import textbook_backward, textbook_forward

import anybn
import anybn.torch as abt
from anybn._kernels import numpy_blocks as _numpy_kernels

SHAPES = {
    "(8,16)": ((8, 16), False),
    "(256,512)": ((256, 512), False),
    "(8,256,14,14)": ((8, 256, 14, 14), False),
    "(4096,1024)": ((4096, 1024), False),
    "(32,64,56,56)": ((32, 64, 56, 56), False),
    "(32,64,56,56)-cl": ((32, 64, 56, 56), True),
}


def _best(fn: Callable[[], object], number: int, repeat: int = 3) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t) / number)
    return best


def ratio(a: Callable[[], object], b: Callable[[], object], rounds: int, number: int) -> float:
    a(), b()
    r = []
    for i in range(rounds):
        if i % 2:
            tb, ta = _best(b, number), _best(a, number)
        else:
            ta, tb = _best(a, number), _best(b, number)
        r.append(ta / tb)
    return statistics.median(r)


def measure(name: str, args: argparse.Namespace) -> list[float]:
    """The ratios of one row of the table."""
    tdt = getattr(torch, args.dtype)
    dims, cl = SHAPES[name]
    rng = np.random.default_rng(0)
    c = dims[1]
    x32 = rng.standard_normal(dims, dtype=np.float32) + 3
    dy32 = rng.standard_normal(dims, dtype=np.float32)
    w, b = rng.uniform(0.5, 1.5, c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    tx, tdy = torch.from_numpy(x32).to(tdt), torch.from_numpy(dy32).to(tdt)
    if cl:
        tx = tx.contiguous(memory_format=torch.channels_last)
        tdy = tdy.contiguous(memory_format=torch.channels_last)
    ax = 1
    nx, ndy = tx.numpy(), tdy.numpy()  # same memory layout as the torch tensors
    if cl:
        nx, ndy = np.moveaxis(nx, 1, -1), np.moveaxis(ndy, 1, -1)
        ax = -1
    tw = torch.from_numpy(w).requires_grad_()
    tb = torch.from_numpy(b).requires_grad_()
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    number = max(1, int(3e6 // x32.size))
    if x32.size <= 4096:
        number = 200

    def np_fwd():
        return anybn.batch_norm(nx, rm, rv, w, b, training=True, axis=ax)

    o = np_fwd()

    def np_bwd():
        return anybn.batch_norm_backward(ndy, nx, w, o.mean, o.invstd, training=True, axis=ax)

    def np_fb():
        out = np_fwd()
        anybn.batch_norm_backward(ndy, nx, w, out.mean, out.invstd, training=True, axis=ax)

    def text_fb():
        _, cache = textbook_forward(nx, rm, rv, w, b, ax, True)
        textbook_backward(ndy, cache)

    def nat_fwd():
        with torch.no_grad():
            return torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=True)

    xl = tx.detach().requires_grad_()
    yg = torch.nn.functional.batch_norm(xl, trm, trv, tw, tb, training=True)

    def nat_bwd():
        yg.backward(tdy, retain_graph=True)

    def nat_fb():
        xi = tx.detach().requires_grad_()
        torch.nn.functional.batch_norm(xi, trm, trv, tw, tb, training=True).backward(tdy)

    tw0, tb0 = tw.detach(), tb.detach()

    def tt_fwd():
        return anybn.batch_norm(tx, trm, trv, tw0, tb0, training=True)

    to = tt_fwd()

    def tt_bwd():
        return anybn.batch_norm_backward(tdy, tx, tw0, to.mean, to.invstd, training=True)

    def tt_fb():
        out = tt_fwd()
        anybn.batch_norm_backward(tdy, tx, tw0, out.mean, out.invstd, training=True)

    nn_cls = torch.nn.BatchNorm1d if len(dims) == 2 else torch.nn.BatchNorm2d
    ab_cls = abt.BatchNorm1d if len(dims) == 2 else abt.BatchNorm2d
    m_nn, m_ab = nn_cls(c).to(tdt), ab_cls(c).to(tdt)

    def mod(m: torch.nn.Module) -> Callable[[], None]:
        def run() -> None:
            xi = tx.detach().requires_grad_()
            m(xi).backward(tdy)

        return run

    pairs = [
        (np_fb, nat_fb), (np_fb, text_fb), (tt_fb, nat_fb), (mod(m_ab), mod(m_nn)),
        (np_fwd, nat_fwd), (np_bwd, nat_bwd), (tt_fwd, nat_fwd), (tt_bwd, nat_bwd),
    ]  # fmt: skip
    return [ratio(a, b, args.rounds, number) for a, b in pairs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=11)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    _numpy_kernels.set_num_threads(args.threads)
    print(
        f"dtype {args.dtype}, {args.threads} threads, medians of {args.rounds} interleaved rounds"
    )
    cols = ["np/torch", "np/textbook", "torch/torch", "module/nn", "np fwd/torch", "np bwd/torch",
            "tt fwd/torch", "tt bwd/torch"]  # fmt: skip
    print("| input | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name in args.shapes:
        row = measure(name, args)
        print(f"| {name} | " + " | ".join(f"{r:.2f}" for r in row) + " |", flush=True)


if __name__ == "__main__":
    main()
