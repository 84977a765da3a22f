"""Keras 3 / Flax conventions: converters and the biased estimator, step for step.

Two oracles. Everywhere: a transcription of their training-mode update rules, from
Keras 3 ``keras/src/layers/normalization/batch_normalization.py`` (``call``:
``moving = moving * momentum + batch * (1 - momentum)``, biased ``ops.moments``,
masked moments weighted by the mask) and Flax ``flax/linen/normalization.py``
(``ra = momentum * ra + (1 - momentum) * batch``, biased variance). Where Keras
(on its JAX backend: ``KERAS_BACKEND=jax``, set here unless the environment names
another) and Flax are installed (``pip install keras flax``; CI's separate
"Keras and Flax" step), the libraries themselves: a converted anybn layer and the
real one trained side by side, step by step (outputs, moving statistics, eval),
with and without masks.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pytest

from anybn import convert

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is first imported


def keras_rule(
    x: np.ndarray, w: list[np.ndarray], momentum: float, eps: float, mask: np.ndarray | None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One training step of Keras 3 BatchNormalization(axis=-1), transcribed."""
    gamma, beta, mm, mv = w
    red = tuple(range(x.ndim - 1))
    m = np.ones_like(x) if mask is None else np.broadcast_to(mask, x.shape).astype(x.dtype)
    n = m.sum(red)
    mean = (m * x).sum(red) / n
    var = (m * (x - mean) ** 2).sum(red) / n
    y = (x - mean) / np.sqrt(var + eps) * gamma + beta
    return y, [
        gamma,
        beta,
        mm * momentum + mean * (1 - momentum),
        mv * momentum + var * (1 - momentum),
    ]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_keras_step_for_step(masked: bool) -> None:
    rng = np.random.default_rng(9)
    c = 4
    weights = [rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(1, 2, c)]
    bn = convert.from_keras(weights)
    want = [w.copy() for w in weights]
    for _ in range(3):
        x = rng.normal(3.0, 2.0, size=(6, 5, c))
        mask = (rng.random((6, 5, 1)) < 0.7) if masked else None
        mask = None if mask is None else mask | (np.arange(6)[:, None, None] < 2)
        y_want, want = keras_rule(x, want, 0.99, 1e-3, mask)
        y = bn(x, mask=mask)
        np.testing.assert_allclose(y, y_want, rtol=1e-10, atol=1e-10)
    for got, exp in zip(convert.to_keras(bn), want, strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-12)
    bn.eval()
    x = rng.normal(size=(3, 2, c))
    gamma, beta, mm, mv = want
    np.testing.assert_allclose(bn(x), (x - mm) / np.sqrt(mv + 1e-3) * gamma + beta, rtol=1e-12)


def test_flax_step_for_step() -> None:
    rng = np.random.default_rng(10)
    c = 3
    variables = {
        "params": {"scale": rng.uniform(0.5, 2, c), "bias": rng.normal(size=c)},
        "batch_stats": {"mean": rng.normal(size=c), "var": rng.uniform(1, 2, c)},
    }
    bn = convert.from_flax(variables, momentum=0.9)
    assert bn.eps == 1e-5 and bn.axis == -1 and bn.var_estimator == "biased"
    ra_mean, ra_var = (
        variables["batch_stats"]["mean"].copy(),
        variables["batch_stats"]["var"].copy(),
    )
    for _ in range(3):
        x = rng.normal(-1.0, 3.0, size=(7, c))
        ra_mean = 0.9 * ra_mean + 0.1 * x.mean(0)
        ra_var = 0.9 * ra_var + 0.1 * x.var(0)
        bn(x)
    out = convert.to_flax(bn)
    np.testing.assert_allclose(out["batch_stats"]["mean"], ra_mean, rtol=1e-12)
    np.testing.assert_allclose(out["batch_stats"]["var"], ra_var, rtol=1e-12)
    np.testing.assert_allclose(out["params"]["scale"], variables["params"]["scale"])


def test_keras_list_axis_and_partial_affine() -> None:
    """Keras axis=[1, 2] and center=False: param shape (3, 4), bias 0."""
    rng = np.random.default_rng(11)
    weights = [rng.uniform(1, 2, (3, 4)), np.zeros((3, 4)), np.ones((3, 4))]
    bn = convert.from_keras(weights, axis=[1, 2], center=False)
    assert bn.num_features == (3, 4) and bn.axis == (1, 2)
    x = rng.normal(size=(5, 3, 4))
    y = bn(x)
    mean, var = x.mean(0), x.var(0)
    np.testing.assert_allclose(y, (x - mean) / np.sqrt(var + 1e-3) * weights[0], rtol=1e-10)
    back = convert.to_keras(bn, center=False)
    assert [a.shape for a in back] == [(3, 4)] * 3


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: convert.from_keras([np.ones(2)] * 3), "must have 4 arrays"),
        (lambda: convert.from_keras([np.ones(2)] * 4, momentum=1.5), "momentum"),
        (lambda: convert.from_flax({"params": {}}), "batch_stats"),
    ],
)
def test_bad_conversions(call: Any, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        call()


# --- against the real libraries --------------------------------------------------------


#: Keras 3.15's variables warn under NumPy 2 (their __array__ takes no copy=): not anybn's.
KERAS_WARNINGS = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def _keras() -> Any:
    try:
        import keras
    except ImportError as exc:  # keras missing, or its backend (tensorflow by default)
        pytest.skip(f"Keras not importable ({exc}); pip install keras (KERAS_BACKEND=jax)")
    return keras


@KERAS_WARNINGS
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_against_keras_step_by_step(masked: bool) -> None:
    """keras.layers.BatchNormalization and convert.from_keras of its weights: y and the
    moving statistics after each of 4 training steps, then eval, then to_keras. float32,
    Keras' floating type on its JAX backend (which has no float64 unless JAX's x64 is on)."""
    keras = _keras()
    dtype = "float32"
    rng = np.random.default_rng(12)
    c = 4
    layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, dtype=dtype)
    layer.build((None, 5, c))
    layer.set_weights([
        rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(1, 2, c)
    ])  # fmt: skip
    bn = convert.from_keras(layer.get_weights(), momentum=0.9, epsilon=1e-3)
    tol = 2e-5
    for step in range(4):
        x = (rng.normal(3.0, 2.0, size=(6, 5, c)) * (step + 1)).astype(dtype)
        mask = (rng.random((6, 5)) < 0.7) | (np.arange(6)[:, None] < 2) if masked else None
        y_k = np.asarray(layer(x, training=True, mask=mask))
        y_a = bn(x, mask=None if mask is None else mask[..., None])
        np.testing.assert_allclose(y_a, y_k, rtol=tol, atol=tol, err_msg=f"y, step {step}")
        for got, want in zip(convert.to_keras(bn), layer.get_weights(), strict=True):
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"step {step}")
    x = rng.normal(size=(3, 5, c)).astype(dtype)
    bn.eval()
    np.testing.assert_allclose(bn(x), np.asarray(layer(x, training=False)), rtol=tol, atol=tol)


@KERAS_WARNINGS
def test_keras_weights_round_trip_into_a_fresh_layer() -> None:
    """to_keras(bn) loads into a new Keras layer that computes what bn computes."""
    keras = _keras()
    rng = np.random.default_rng(13)
    bn = convert.from_keras([rng.uniform(1, 2, 3), rng.normal(size=3), np.zeros(3), np.ones(3)])
    for _ in range(3):
        bn(rng.normal(5.0, 3.0, size=(8, 3)))
    layer = keras.layers.BatchNormalization()
    layer.build((None, 3))
    layer.set_weights(convert.to_keras(bn))
    x = rng.normal(size=(4, 3)).astype("float32")
    bn.eval()
    y = bn(x.astype("float64"))
    np.testing.assert_allclose(np.asarray(layer(x, training=False)), y, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("fast_variance", [False, True], ids=["two-pass", "fast-variance"])
def test_against_flax_step_by_step(masked: bool, fast_variance: bool) -> None:
    """flax.linen.BatchNorm and convert.from_flax of its variables: y and batch_stats after
    each of 4 training steps, then eval. Flax's default use_fast_variance=True computes
    E[x^2] - E[x]^2, which agrees here (moderate means) to float64's cancellation."""
    pytest.importorskip("flax", reason="Flax not installed; pip install flax")
    import jax
    import jax.numpy as jnp
    from flax import linen as nn

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(14)
    c = 3
    model = nn.BatchNorm(momentum=0.9, epsilon=1e-5, use_fast_variance=fast_variance)
    scale, bias = rng.uniform(0.5, 2, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(1, 2, c)
    variables = {
        "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
        "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)},
    }
    bn = convert.from_flax(variables, momentum=0.9)
    tol = 1e-10 if not fast_variance else 1e-8
    for step in range(4):
        x = rng.normal(-1.0, 3.0, size=(7, 4, c)) * (step + 1)
        mask = (rng.random((7, 4, c)) < 0.7) | (np.arange(7)[:, None, None] < 2) if masked else None
        y_f, state = model.apply(
            variables, jnp.asarray(x), use_running_average=False,
            mask=None if mask is None else jnp.asarray(mask), mutable=["batch_stats"],
        )  # fmt: skip
        variables = {"params": variables["params"], "batch_stats": state["batch_stats"]}
        y_a = bn(x, mask=mask)
        np.testing.assert_allclose(y_a, np.asarray(y_f), rtol=tol, atol=tol, err_msg=f"y {step}")
        out = convert.to_flax(bn)
        for k in ("mean", "var"):
            np.testing.assert_allclose(
                out["batch_stats"][k], np.asarray(variables["batch_stats"][k]), rtol=tol,
                atol=tol, err_msg=f"{k}, step {step}",
            )  # fmt: skip
    x = rng.normal(size=(5, 4, c))
    y_eval = model.apply(variables, jnp.asarray(x), use_running_average=True)
    bn.eval()
    np.testing.assert_allclose(bn(x), np.asarray(y_eval), rtol=tol, atol=tol)


def test_calling_the_module_names_the_torch_converter() -> None:
    """``anybn.convert(model)`` (the Keras/Flax module called like ``anybn.torch.convert``)
    says which function converts a PyTorch model, instead of "'module' object is not
    callable"; the module's functions stay where they are."""
    import anybn

    with pytest.raises(TypeError, match=r"anybn\.torch\.convert\(model\)"):
        anybn.convert(object())  # type: ignore[operator]
    assert anybn.convert.from_keras is convert.from_keras
