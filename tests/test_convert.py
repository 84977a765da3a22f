"""Keras 3 / Flax conventions: converters and the biased estimator, step for step.

Keras and Flax are not installed in CI (each pulls a large framework), so the
oracle is a recorded transcription of their training-mode update rules, from
Keras 3 ``keras/src/layers/normalization/batch_normalization.py`` (``call``:
``moving = moving * momentum + batch * (1 - momentum)``, biased ``ops.moments``,
masked moments weighted by the mask) and Flax ``flax/linen/normalization.py``
(``ra = momentum * ra + (1 - momentum) * batch``, biased variance). Where
Keras or Flax is importable the same checks run against the real layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from anybn import convert


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


def test_against_keras_if_installed() -> None:
    keras = pytest.importorskip("keras")
    rng = np.random.default_rng(12)
    layer = keras.layers.BatchNormalization()
    x = rng.normal(size=(8, 3)).astype("float32")
    layer.build(x.shape)
    bn = convert.from_keras(layer.get_weights())
    y_k = np.asarray(layer(x, training=True))
    y_a = bn(x)
    np.testing.assert_allclose(y_a, y_k, rtol=1e-4, atol=1e-5)
    for got, exp in zip(convert.to_keras(bn), layer.get_weights(), strict=True):
        np.testing.assert_allclose(got, exp, rtol=1e-5, atol=1e-6)
