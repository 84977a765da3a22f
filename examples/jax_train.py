"""Train a small MLP in JAX with anybn's batch norm, jit-compiled, the statistics as state.

    python examples/jax_train.py [--steps 200] [--seed 0]

JAX arrays are immutable and its transforms want pure functions, so the running statistics
are explicit state (as Flax keeps its ``batch_stats``): ``anybn.batch_norm`` takes them and
returns the updated ones, and ``jax.grad`` differentiates through anybn's analytic backward
(a ``jax.custom_vjp``). One training step is ``jax.jit(jax.value_and_grad(...))`` plus SGD;
the last lines evaluate with the running statistics.
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import anybn

FEATURES, HIDDEN, CLASSES, SAMPLES = 10, 32, 3, 512


def make_data(seed: int) -> tuple[jax.Array, jax.Array]:
    """Gaussian blobs, one per class, far from the origin (so normalization matters)."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((CLASSES, FEATURES)) * 1.5
    labels = rng.integers(0, CLASSES, SAMPLES)
    x = centers[labels] + rng.standard_normal((SAMPLES, FEATURES)) + 5.0
    return jnp.asarray(x, jnp.float32), jnp.asarray(labels)


def init(seed: int) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(params, state)``: the two linear layers and the batch norm's weight and bias, and
    its running statistics."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {
        "w1": jax.random.normal(k1, (FEATURES, HIDDEN)) / FEATURES**0.5,
        "b1": jnp.zeros(HIDDEN),
        "scale": jnp.ones(HIDDEN),
        "bias": jnp.zeros(HIDDEN),
        "w2": jax.random.normal(k2, (HIDDEN, CLASSES)) / HIDDEN**0.5,
        "b2": jnp.zeros(CLASSES),
    }
    state = {"mean": jnp.zeros(HIDDEN), "var": jnp.ones(HIDDEN)}
    return params, state


def forward(
    params: dict[str, jax.Array], state: dict[str, jax.Array], x: jax.Array, *, training: bool
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Logits, and the new running statistics (the same ones in eval)."""
    out = anybn.batch_norm(
        x @ params["w1"] + params["b1"], state["mean"], state["var"],
        params["scale"], params["bias"], training=training,
    )  # fmt: skip
    logits = jax.nn.relu(out.y) @ params["w2"] + params["b2"]
    return logits, {"mean": out.new_running_mean, "var": out.new_running_var}


def loss_fn(params: Any, state: Any, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Any]:
    logits, new_state = forward(params, state, x, training=True)
    loss = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))
    return loss, new_state


@jax.jit
def step(params: Any, state: Any, x: jax.Array, y: jax.Array, lr: float = 0.1) -> tuple:
    """One SGD step: ``(params, state, loss)``."""
    (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, x, y)
    params = jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)
    return params, state, loss


def train(steps: int, seed: int = 0, batch_size: int = 64) -> tuple[list[float], float]:
    """``(losses, eval accuracy)`` after ``steps`` steps through the data in order."""
    x, y = make_data(seed)
    params, state = init(seed)
    losses = []
    for i in range(steps):
        start = (i * batch_size) % SAMPLES
        params, state, loss = step(
            params, state, x[start : start + batch_size], y[start : start + batch_size]
        )
        losses.append(float(loss))
    logits, _ = forward(params, state, x, training=False)
    return losses, float(jnp.mean(jnp.argmax(logits, axis=1) == y))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error(f"--steps must be at least 1, got {args.steps}")
    losses, accuracy = train(args.steps, args.seed)
    for i in range(0, args.steps, max(1, args.steps // 10)):
        print(f"step {i:4d}  loss {losses[i]:.4f}")
    print(f"final loss {losses[-1]:.4f}, eval accuracy {accuracy:.3f} (JAX {jax.__version__})")


if __name__ == "__main__":
    main()
