"""Measure the float32 accuracy of anybn and of PyTorch's CPU batch norm.

For each offset, float32 data with standard deviation 1 and mean ``offset``
(seeded) is normalized in training mode by

* ``anybn.batch_norm`` (float32, NumPy),
* ``torch.nn.functional.batch_norm`` (float32, CPU), when torch is installed,
* the one-pass formula ``var = E[x^2] - E[x]^2`` in float32 (NumPy), for contrast,

and each result is compared with the same computation in float64 on the same
float32 input. The backward pass (``dx`` for a seeded ``dy``) is compared the
same way for anybn and for torch autograd. The output is a Markdown table of
the maximum absolute errors; ``docs/math.md`` quotes it.

Run from the repository root::

    python docs/scripts/accuracy.py
"""

from __future__ import annotations

import argparse
import platform

import numpy as np

import anybn
from anybn._testing.reference import reference_backward, reference_forward

OFFSETS = (1e2, 1e3, 1e4, 1e5)


def naive_forward(x: np.ndarray, eps: float) -> np.ndarray:
    """Training-mode batch norm with the one-pass variance, in x's dtype."""
    axes = (0, 2, 3)
    mean = x.mean(axis=axes, keepdims=True)
    var = (x * x).mean(axis=axes, keepdims=True) - mean * mean
    var = np.maximum(var, 0)  # what Flax does to hide negative variances
    return (x - mean) / np.sqrt(var + np.float32(eps))


def measure(shape: tuple[int, ...], seed: int, eps: float = 1e-5) -> list[dict[str, float]]:
    try:
        import torch
    except ImportError:  # pragma: no cover - the table then has no torch columns
        torch = None
    rows = []
    for offset in OFFSETS:
        rng = np.random.default_rng(seed)
        x = (rng.standard_normal(shape) + offset).astype(np.float32)
        dy = rng.standard_normal(shape).astype(np.float32)
        ref = reference_forward(x, training=True, eps=eps)
        dref = reference_backward(dy, x, None, training=True, eps=eps)

        out = anybn.batch_norm(x, training=True, eps=eps)
        grads = anybn.batch_norm_backward(dy, x, None, out.mean, out.invstd)
        row = {
            "offset": offset,
            "anybn_y": float(np.max(np.abs(out.y - ref.y))),
            "naive_y": float(np.max(np.abs(naive_forward(x, eps) - ref.y))),
            "anybn_dx": float(np.max(np.abs(grads.dx - dref.dx))),
        }
        if torch is not None:
            xt = torch.from_numpy(x).requires_grad_(True)
            yt = torch.nn.functional.batch_norm(xt, None, None, training=True, eps=eps)
            yt.backward(torch.from_numpy(dy))
            row["torch_y"] = float(np.max(np.abs(yt.detach().numpy() - ref.y)))
            row["torch_dx"] = float(np.max(np.abs(xt.grad.numpy() - dref.dx)))
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shape", type=int, nargs=4, default=(32, 16, 32, 32), metavar=("N", "C", "H", "W")
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rows = measure(tuple(args.shape), args.seed)

    versions = f"numpy {np.__version__}"
    try:
        import torch

        versions += f", torch {torch.__version__}"
    except ImportError:
        pass
    print(
        f"shape {tuple(args.shape)}, seed {args.seed}, float32, eps 1e-5; "
        f"{versions}; {platform.machine()} {platform.python_implementation()} "
        f"{platform.python_version()}"
    )
    print()
    has_torch = "torch_y" in rows[0]
    head = ["offset", "anybn y", "torch y", "E[x²]-E[x]² y", "anybn dx", "torch dx"]
    keys = ["anybn_y", "torch_y", "naive_y", "anybn_dx", "torch_dx"]
    if not has_torch:
        head = [h for h in head if not h.startswith("torch")]
        keys = [k for k in keys if not k.startswith("torch")]
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join("---:" for _ in head) + "|")
    for row in rows:
        cells = [f"{row['offset']:.0e}"] + [f"{row[k]:.2e}" for k in keys]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
