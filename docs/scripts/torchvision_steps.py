"""One training step of torchvision models: converted with ``anybn.torch.convert`` / native.

Usage (from the repository root, in an environment with torchvision; on this project's
machines ``pip install torch==2.14.1 torchvision==0.29.1`` takes both from the local disk)::

    python docs/scripts/torchvision_steps.py [--models resnet18,...] [--batch 16]
        [--size 128] [--rounds 9] [--threads 2]

For each model: two copies with the same random weights (``weights=None``: nothing is
downloaded), one converted to the ``anybn.torch`` drop-ins; one SGD step each (forward,
cross-entropy loss, backward, ``optimizer.step()``) on the same batch, timed in rotation
(native, anybn, native, ...) after two warm-up steps. The figure is the median over rounds of
the per-round ratio of wall-clock time (anybn / native; below 1: anybn faster). The loss of
the first step is printed for both, as a check that the two models compute the same thing.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
import torchvision

import anybn.torch as abt
from anybn import _kernels as kernels

MODELS = ("resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121")


def _step(model: torch.nn.Module, x: torch.Tensor, target: torch.Tensor) -> Callable[[], float]:
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(model(x), target)
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    return step


def measure(name: str, batch: int, size: int, rounds: int) -> tuple[float, float, float, str]:
    """``(native s, anybn s, median ratio, first losses)`` for one model."""
    torch.manual_seed(0)
    native = getattr(torchvision.models, name)(weights=None, num_classes=10).train()
    converted = abt.convert(copy.deepcopy(native)).train()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, size, size, generator=gen)
    target = torch.randint(0, 10, (batch,), generator=gen)
    steps = {"native": _step(native, x, target), "anybn": _step(converted, x, target)}
    losses = {}
    for key, step in steps.items():
        torch.manual_seed(2)  # the same dropout and stochastic-depth draws for both models
        losses[key] = step()
    for step in steps.values():
        step()
    times: dict[str, list[float]] = {"native": [], "anybn": []}
    for r in range(rounds):
        order = ("native", "anybn") if r % 2 == 0 else ("anybn", "native")
        for key in order:
            t = time.perf_counter()
            steps[key]()
            times[key].append(time.perf_counter() - t)
    ratio = statistics.median(a / n for a, n in zip(times["anybn"], times["native"], strict=True))
    first = f"{losses['native']:.6f} / {losses['anybn']:.6f}"
    return statistics.median(times["native"]), statistics.median(times["anybn"]), ratio, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    kernels.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"{args.threads} threads, batch {args.batch}, {args.size}x{args.size}, "
        f"median of {args.rounds} rotated rounds, wall clock"
    )
    print("| model | native step | anybn step | anybn / native | first loss (native / anybn) |")
    print("| --- | --- | --- | --- | --- |")
    for name in args.models.split(","):
        native, ours, ratio, first = measure(name, args.batch, args.size, args.rounds)
        print(
            f"| {name} | {native * 1e3:.0f} ms | {ours * 1e3:.0f} ms | {ratio:.3f}x | {first} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
