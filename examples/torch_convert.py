"""Train a small PyTorch CNN whose batch norms are anybn's, next to the same model with torch's.

    python examples/torch_convert.py [--steps 60] [--seed 0]

``anybn.torch.convert`` swaps every ``nn.BatchNorm1d/2d/3d`` of a model for anybn's drop-in
(a subclass of the same torch module, keeping the very parameters and buffers), so the rest
of a training loop is unchanged: optimizer, ``loss.backward()``, ``state_dict``. The script
trains both copies on the same synthetic images (one bright quadrant per class) with SGD and
prints the two losses side by side; they agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import copy

import torch
from torch import nn

import anybn.torch

CLASSES, SIZE = 4, 8


def model() -> nn.Module:
    """Conv-BN-ReLU twice, then Linear-BN1d, for 1x8x8 images."""
    return nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Flatten(), nn.Linear(8 * SIZE * SIZE, 16), nn.BatchNorm1d(16), nn.ReLU(),
        nn.Linear(16, CLASSES),
    )  # fmt: skip


def batch(generator: torch.Generator, size: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise images with one bright quadrant, the label saying which."""
    labels = torch.randint(0, CLASSES, (size,), generator=generator)
    x = torch.randn(size, 1, SIZE, SIZE, generator=generator)
    half = SIZE // 2
    for i, label in enumerate(labels.tolist()):
        r, c = divmod(label, 2)
        x[i, 0, r * half : (r + 1) * half, c * half : (c + 1) * half] += 2.0
    return x, labels


def train(steps: int, seed: int = 0) -> tuple[list[float], list[float], float]:
    """``(torch's losses, anybn's losses, anybn's eval accuracy)`` over ``steps`` SGD steps."""
    torch.manual_seed(seed)
    native = model()
    ours = anybn.torch.convert(copy.deepcopy(native))
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9) for m in (native, ours)]
    losses: tuple[list[float], list[float]] = ([], [])
    generator = torch.Generator().manual_seed(seed + 1)
    for _ in range(steps):
        x, y = batch(generator)
        for m, opt, out in zip((native, ours), optimizers, losses, strict=True):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(m(x), y)
            loss.backward()
            opt.step()
            out.append(loss.item())
    ours.eval()  # the running statistics, as after training
    x, y = batch(torch.Generator().manual_seed(seed + 2), 256)
    with torch.no_grad():
        accuracy = (ours(x).argmax(1) == y).float().mean().item()
    return losses[0], losses[1], accuracy


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    theirs, ours, accuracy = train(args.steps, args.seed)
    for step in range(0, args.steps, max(1, args.steps // 6)):
        print(f"step {step:4d}  torch loss {theirs[step]:.4f}  anybn loss {ours[step]:.4f}")
    print(f"final: torch {theirs[-1]:.4f}, anybn {ours[-1]:.4f}; anybn accuracy {accuracy:.3f}")


if __name__ == "__main__":
    main()
