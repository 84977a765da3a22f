"""Small-call ratios at (8, 16) float32, candidates timed in rotation (A B A B ...).

Usage (from the repository root)::

    python docs/scripts/small_call_ratios.py [--rounds 15] [--number 300] [--threads 1]

Each line is one pair: the median over rounds of the per-round ratio of CPU
thread time (``time.thread_time``), each round ``number`` calls of A then of B.
The pairs: ``anybn.torch.BatchNorm1d`` forward + ``backward()`` against
``nn.BatchNorm1d``; ``anybn.batch_norm`` + ``anybn.batch_norm_backward`` on
tensors against ``F.batch_norm`` + autograd; ``anybn.batch_norm`` on NumPy
against textbook NumPy (statistics, normalisation, running update); an
``anybn.BatchNorm`` training call against the functional call it makes; one SGD step of the
small CNN of asv's ``SmallCNN`` (batch 64) with the drop-ins against the same with ``nn``
(``number // 30`` steps a round).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

import anybn
import anybn.torch as abt

C = 16


def pairs() -> list[tuple[str, Callable[[], object], Callable[[], object]]]:
    """(name, A, B) for every comparison."""
    torch.manual_seed(0)
    xt = torch.randn(8, C, requires_grad=True)

    def module_step(m: torch.nn.Module) -> Callable[[], object]:
        return lambda: m(xt).sum().backward()

    rm_t, rv_t, w_t, b_t = torch.zeros(C), torch.ones(C), torch.ones(C), torch.zeros(C)
    w_g, b_g = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    dy_t = torch.ones(8, C)

    def anybn_tensors() -> None:
        x = xt.detach()
        out = anybn.batch_norm(x, rm_t, rv_t, w_t, b_t, training=True)
        anybn.batch_norm_backward(dy_t, x, w_t, out.mean, out.invstd, training=True)

    def torch_functional() -> None:
        f = torch.nn.functional.batch_norm
        f(xt, torch.zeros(C), torch.ones(C), w_g, b_g, training=True).sum().backward()

    xn = np.random.default_rng(0).standard_normal((8, C)).astype(np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)

    def anybn_numpy() -> None:
        anybn.batch_norm(xn, rm, rv, training=True)

    def textbook_numpy() -> None:
        m, v = xn.mean(0), xn.var(0)
        (xn - m) / np.sqrt(v + 1e-5)
        0.9 * rm + 0.1 * m, 0.9 * rv + 0.1 * v * 8 / 7

    layer = anybn.BatchNorm(C)
    return [
        ("anybn.torch.BatchNorm1d vs nn.BatchNorm1d, f+b", module_step(abt.BatchNorm1d(C)),
         module_step(torch.nn.BatchNorm1d(C))),
        ("anybn functional on tensors vs F.batch_norm + autograd, f+b", anybn_tensors,
         torch_functional),
        ("anybn.batch_norm vs textbook NumPy, training forward", anybn_numpy, textbook_numpy),
        ("anybn.BatchNorm vs anybn.batch_norm (NumPy), training forward", lambda: layer(xn),
         anybn_numpy),
        ("small CNN training step (batch 64, 8x8): drop-ins vs nn", *cnn_steps()),
    ]  # fmt: skip


def cnn_steps() -> tuple[Callable[[], object], Callable[[], object]]:
    """One SGD step of asv's SmallCNN (Conv-BN-ReLU twice, Linear-BN1d), drop-ins and nn."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parents[2] / "asv_benchmarks"))
    from benchmarks.bench_training import small_cnn

    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.standard_normal((64, 1, 8, 8), dtype=np.float32))
    target = torch.from_numpy(rng.integers(0, 10, 64))
    loss = torch.nn.CrossEntropyLoss()

    def step_of(drop_in: bool) -> Callable[[], object]:
        torch.manual_seed(0)
        model = small_cnn(drop_in).train()
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def step() -> None:
            opt.zero_grad()
            loss(model(x), target).backward()
            opt.step()

        return step

    return step_of(True), step_of(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--number", type=int, default=300)
    parser.add_argument(
        "--threads", type=int, default=None,
        help="torch's and anybn's CPU threads (default: torch's default). 1 on a busy machine: "
        "torch splits even (8, 16) among its OpenMP threads, whose barrier then spins",
    )  # fmt: skip
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
        anybn.set_num_threads(args.threads)
    print(f"(8, {C}) float32, {torch.get_num_threads()} torch threads, median of {args.rounds} "
          f"rounds of {args.number} calls, A/B ratio of thread time")  # fmt: skip
    for name, a, b in pairs():
        number = args.number if "CNN" not in name else max(1, args.number // 30)
        for f in (a, b):
            for _ in range(min(50, number)):
                f()
        ta: list[float] = []
        tb: list[float] = []
        for _ in range(args.rounds):
            for f, out in ((a, ta), (b, tb)):
                t = time.thread_time()
                for _ in range(number):
                    f()
                out.append((time.thread_time() - t) / number)
        ratio = statistics.median(x / y for x, y in zip(ta, tb, strict=True))
        print(f"| {name} | {statistics.median(ta) * 1e6:.1f} us | "
              f"{statistics.median(tb) * 1e6:.1f} us | {ratio:.2f}x |")  # fmt: skip


if __name__ == "__main__":
    main()
