"""Train a small MLP with batch norm in plain NumPy (or CuPy) with anybn.BatchNorm.

    python examples/mlp_numpy.py                    # NumPy on the CPU
    python examples/mlp_numpy.py --backend cupy     # the same script on a GPU

The network is Linear -> BatchNorm -> ReLU -> Linear with a softmax
cross-entropy loss, trained by plain SGD on synthetic Gaussian blobs. Every
gradient is written out by hand; anybn supplies the batch-norm forward, its
backward and the running statistics. The code uses only the Python array API,
so ``--backend torch`` and ``--backend array_api_strict`` run it too.
"""

from __future__ import annotations

import argparse
import importlib
import math
from typing import Any, NamedTuple

import array_api_compat
import numpy as np

import anybn

BACKENDS = ("numpy", "cupy", "torch", "array_api_strict")
FEATURES, HIDDEN, CLASSES, SAMPLES = 10, 32, 3, 512


def make_data(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian blobs, one per class, far from the origin (so normalization matters)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLASSES, FEATURES)) * 1.5
    labels = rng.integers(0, CLASSES, SAMPLES)
    x = centers[labels] + rng.standard_normal((SAMPLES, FEATURES)) + 5.0
    return x, labels


def init_params(seed: int) -> dict[str, np.ndarray]:
    """PyTorch's nn.Linear initialization: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

    Weights are stored as (in, out), so a layer is ``x @ w + b``.
    """
    rng = np.random.default_rng(seed + 1)

    def uniform(fan_in: int, shape: tuple[int, ...]) -> np.ndarray:
        bound = 1.0 / math.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape)

    return {
        "w1": uniform(FEATURES, (FEATURES, HIDDEN)),
        "b1": uniform(FEATURES, (HIDDEN,)),
        "w2": uniform(HIDDEN, (HIDDEN, CLASSES)),
        "b2": uniform(HIDDEN, (CLASSES,)),
    }


class Trained(NamedTuple):
    """What :func:`train` returns."""

    losses: list[float]
    params: dict[str, Any]
    bn: anybn.BatchNorm
    accuracy: float


def _logits(xp: Any, params: dict[str, Any], bn: anybn.BatchNorm, x: Any) -> tuple[Any, ...]:
    """The forward pass: (logits, relu mask, relu output)."""
    z = bn(x @ params["w1"] + params["b1"])
    mask = xp.astype(z > 0, z.dtype)
    a = z * mask
    return a @ params["w2"] + params["b2"], mask, a


def train(
    xp: Any,
    *,
    device: Any = None,
    dtype: str = "float32",
    steps: int = 100,
    batch_size: int = 64,
    lr: float = 0.1,
    seed: int = 0,
) -> Trained:
    """Train the MLP on ``xp`` (an array namespace) and ``device``.

    The data and initial parameters are drawn with NumPy from ``seed`` and
    copied to ``xp``, so every backend (and a PyTorch twin) starts identically.
    The minibatches run through the data in order.
    """
    x_all, labels = make_data(seed)

    def to_xp(a: np.ndarray) -> Any:
        return xp.asarray(a, dtype=getattr(xp, dtype), device=device)

    x, onehot = to_xp(x_all), to_xp(np.eye(CLASSES)[labels])
    params = {k: to_xp(v) for k, v in init_params(seed).items()}
    bn = anybn.BatchNorm(HIDDEN, xp=xp, device=device, dtype=dtype)
    losses = []
    for step in range(steps):
        start = (step * batch_size) % SAMPLES
        xb, yb = x[start : start + batch_size, :], onehot[start : start + batch_size, :]
        # forward: logits, then a numerically stable log-softmax
        logits, mask, a = _logits(xp, params, bn, xb)
        shifted = logits - xp.max(logits, axis=1, keepdims=True)
        logp = shifted - xp.log(xp.sum(xp.exp(shifted), axis=1, keepdims=True))
        loss = -xp.sum(yb * logp) / batch_size
        # backward, layer by layer
        dlogits = (xp.exp(logp) - yb) / batch_size
        grads = {"w2": a.T @ dlogits, "b2": xp.sum(dlogits, axis=0)}
        bn_grads = bn.backward((dlogits @ params["w2"].T) * mask)
        grads["w1"] = xb.T @ bn_grads.dx
        grads["b1"] = xp.sum(bn_grads.dx, axis=0)
        # SGD
        for k, g in grads.items():
            params[k] = params[k] - lr * g
        bn.weight = bn.weight - lr * bn_grads.dweight
        bn.bias = bn.bias - lr * bn_grads.dbias
        losses.append(float(loss))
    bn.eval()  # accuracy on all data with the running statistics
    predicted = xp.argmax(_logits(xp, params, bn, x)[0], axis=1)
    truth = xp.asarray(labels, dtype=predicted.dtype, device=device)
    accuracy = float(xp.mean(xp.astype(predicted == truth, getattr(xp, dtype))))
    return Trained(losses, params, bn, accuracy)


#: How to install each backend that NumPy users may lack.
INSTALL = {
    "cupy": "pip install cupy-cuda12x (or cupy-cuda13x, matching your CUDA driver)",
    "torch": "pip install torch (see the README for the CPU-only build)",
    "array_api_strict": "pip install array-api-strict",
}


def namespace(backend: str) -> Any:
    """The array-API namespace of a library named on the command line."""
    lib = importlib.import_module(backend)
    return array_api_compat.array_namespace(lib.asarray(0.0))


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=BACKENDS, default="numpy")
    parser.add_argument("--dtype", choices=("float32", "float64"), default="float32")
    parser.add_argument("--steps", type=_positive, default=200, help="SGD steps (at least 1)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        xp = namespace(args.backend)
    except ImportError as exc:
        parser.error(f"--backend {args.backend}: {exc}; install it with {INSTALL[args.backend]}")
    except Exception as exc:  # installed, but no device (CuPy without a GPU or driver)
        parser.error(f"--backend {args.backend} cannot run here: {type(exc).__name__}: {exc}")
    result = train(xp, dtype=args.dtype, steps=args.steps, lr=args.lr, seed=args.seed)
    for step in range(0, args.steps, max(1, args.steps // 10)):
        print(f"step {step:4d}  loss {result.losses[step]:.4f}")
    print(f"final loss {result.losses[-1]:.4f}, accuracy {result.accuracy:.3f} ({args.backend})")


if __name__ == "__main__":
    main()
