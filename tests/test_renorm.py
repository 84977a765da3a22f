"""Batch renormalization (``renorm=True``): the functional core against Keras 3 and a plain
float64 implementation.

Anchors: Keras 3's ``keras.layers.BatchNormalization(renorm=True)`` on its JAX backend
(``KERAS_BACKEND=jax``, set here unless the environment names another; skipped where
Keras is missing), step by step: outputs, the five moving statistics, and gradients
against ``jax.grad`` of the Keras layer. Everywhere: the formulas of Ioffe (2017, §3)
with the moving statistics of Keras 3 written out below in float64 NumPy, the backward
against torch autograd through that plain implementation and against finite differences.
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest

import anybn

os.environ.setdefault("KERAS_BACKEND", "jax")  # before Keras is first imported

#: Keras 3.15's variables warn under NumPy 2 (their __array__ takes no copy=): not anybn's.
KERAS_WARNINGS = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def reference(
    x: np.ndarray,
    state: dict[str, np.ndarray],
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    momentum: float,
    renorm_momentum: float,
    eps: float,
    clip: tuple[float, float, float],
    biased: bool,
    xp: Any = np,
) -> tuple[Any, Any, Any, dict[str, Any]]:
    """One renorm training step, channels last, written out: (y, r, d, new state).

    ``xp`` is NumPy, or torch for autograd through it (r and d detached there).
    """
    red = tuple(range(x.ndim - 1))
    n = math.prod(x.shape[:-1])
    mean = x.mean(red) if xp is np else x.mean(dim=red)
    var = ((x - mean) ** 2).mean(red) if xp is np else ((x - mean) ** 2).mean(dim=red)
    std = (var + eps) ** 0.5
    rstd = xp.maximum(state["renorm_std"], xp.full_like(state["renorm_std"], math.sqrt(eps)))
    rmin, rmax, dmax = clip
    r = xp.clip(std / rstd, rmin, rmax)
    d = xp.clip((mean - state["renorm_mean"]) / rstd, -dmax, dmax)
    if xp is not np:
        r, d = r.detach(), d.detach()
    y = ((x - mean) / std * r + d) * weight + bias
    est = var if biased else var * n / (n - 1)
    m, rm = momentum, renorm_momentum
    s = state["running_std"] * (1 - m) + (est + eps) ** 0.5 * m
    new = {
        "running_mean": state["running_mean"] * (1 - m) + mean * m,
        "running_std": s,
        "running_var": xp.maximum(s * s - eps, 0 * s),
        "renorm_mean": state["renorm_mean"] * (1 - rm) + mean * rm,
        "renorm_std": state["renorm_std"] * (1 - rm) + std * rm,
    }
    return y, r, d, new


def fresh(c: int, dtype: Any = np.float64) -> dict[str, np.ndarray]:
    return {
        "running_mean": np.zeros(c, dtype),
        "running_var": np.ones(c, dtype),
        "running_std": np.ones(c, dtype),
        "renorm_mean": np.zeros(c, dtype),
        "renorm_std": np.ones(c, dtype),
    }


def step(x: Any, state: dict[str, Any], weight: Any, bias: Any, **options: Any) -> Any:
    return anybn.batch_norm(
        x, state["running_mean"], state["running_var"], weight, bias, training=True,
        renorm=True, renorm_mean=state["renorm_mean"], renorm_std=state["renorm_std"],
        running_std=state["running_std"], **options,
    )  # fmt: skip


def advance(out: Any) -> dict[str, Any]:
    return {
        "running_mean": out.new_running_mean,
        "running_var": out.new_running_var,
        "running_std": out.new_running_std,
        "renorm_mean": out.new_renorm_mean,
        "renorm_std": out.new_renorm_std,
    }


# --- the float64 reference ---------------------------------------------------------------


@pytest.mark.parametrize("biased", [False, True], ids=["unbiased", "biased"])
def test_steps_match_reference(biased: bool) -> None:
    """Five steps with a schedule of rmax/dmax given per call (the paper's: relaxed over
    time), inputs drifting so that r and d are clipped in the first steps."""
    rng = np.random.default_rng(0)
    c = 3
    weight, bias = rng.uniform(0.5, 2, c), rng.normal(size=c)
    state, want = fresh(c), fresh(c)
    clipped = False
    for t in range(5):
        x = rng.normal(4.0 - t, 3.0, size=(6, 5, c))
        rmax, dmax = 1.0 + 0.5 * t, 0.5 * t
        clip = (1 / rmax, rmax, dmax)
        options = dict(momentum=0.2, renorm_momentum=0.3, eps=1e-3)
        out = step(
            x, state, weight, bias, axis=-1, renorm_clipping={"rmin": 1 / rmax, "rmax": rmax,
            "dmax": dmax}, var_estimator="biased" if biased else "unbiased", **options,
        )  # fmt: skip
        y, r, d, want = reference(x, want, weight, bias, clip=clip, biased=biased, **options)
        np.testing.assert_allclose(out.y, y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(out.r, r, rtol=1e-13)
        np.testing.assert_allclose(out.d, d, rtol=1e-13, atol=1e-13)
        clipped |= bool(np.any(r == rmax) or np.any(np.abs(d) == dmax))
        state = advance(out)
        for key in want:
            np.testing.assert_allclose(state[key], want[key], rtol=1e-13, err_msg=key)
    assert clipped  # the test exercised the clipping


def test_default_running_std_and_eval() -> None:
    """running_std omitted: sqrt(running_var + eps); eval is plain batch norm."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 2))
    rm, rv = rng.normal(size=2), rng.uniform(1, 2, 2)
    out = anybn.batch_norm(
        x, rm, rv, training=True, renorm=True, renorm_mean=rm, renorm_std=np.sqrt(rv),
        momentum=0.5,
    )  # fmt: skip
    batch_std = np.sqrt(x.var(0) * 8 / 7 + 1e-5)
    np.testing.assert_allclose(out.new_running_std, 0.5 * np.sqrt(rv + 1e-5) + 0.5 * batch_std)
    ev = anybn.batch_norm(
        x, rm, rv, training=False, renorm=True, renorm_mean=rm, renorm_std=rv,
    )  # fmt: skip
    np.testing.assert_array_equal(ev.y, anybn.batch_norm(x, rm, rv).y)
    assert ev.r is None and ev.new_renorm_mean is rm
    np.testing.assert_allclose(ev.new_running_std, np.sqrt(rv + 1e-5))


def test_unclipped_renorm_is_identity_at_fixed_point() -> None:
    """With the renorm statistics equal to the batch's, r = 1 and d = 0: plain batch norm."""
    rng = np.random.default_rng(2)
    x = rng.normal(2.0, 3.0, size=(10, 4))
    eps = 1e-5
    plain = anybn.batch_norm(x, training=True)
    out = anybn.batch_norm(
        x, np.zeros(4), np.ones(4), training=True, renorm=True, renorm_mean=x.mean(0),
        renorm_std=np.sqrt(x.var(0) + eps), eps=eps,
    )  # fmt: skip
    np.testing.assert_allclose(out.r, 1.0, rtol=1e-14)
    np.testing.assert_allclose(out.d, 0.0, atol=1e-14)
    np.testing.assert_allclose(out.y, plain.y, rtol=1e-13, atol=1e-13)


# --- the backward ------------------------------------------------------------------------


def _case(seed: int = 3) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = 3
    state = fresh(c)
    state["renorm_mean"] = rng.normal(size=c)
    state["renorm_std"] = rng.uniform(0.5, 2, c)
    return rng.normal(1.0, 2.0, size=(5, 4, c)), state, rng.uniform(0.5, 2, c), rng.normal(size=c)


CLIP = {"rmin": 0.8, "rmax": 1.5, "dmax": 0.4}


def test_backward_matches_torch_autograd_of_plain_implementation() -> None:
    torch = pytest.importorskip("torch")
    x, state, weight, bias = _case()
    dy = np.random.default_rng(4).normal(size=x.shape)
    out = step(x, state, weight, bias, axis=-1, renorm_clipping=CLIP)
    g = anybn.batch_norm_backward(
        dy, x, weight, out.mean, out.invstd, axis=-1, renorm_r=out.r, renorm_d=out.d
    )
    tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
    ts = {k: torch.tensor(v) for k, v in state.items()}
    y, r, _d, _ = reference(
        tx, ts, tw, tb, momentum=0.1, renorm_momentum=0.01, eps=1e-5,
        clip=(CLIP["rmin"], CLIP["rmax"], CLIP["dmax"]), biased=False, xp=torch,
    )  # fmt: skip
    assert bool(((r == CLIP["rmax"]) | (r == CLIP["rmin"])).any())  # clipping active
    y.backward(torch.tensor(dy))
    np.testing.assert_allclose(out.y, y.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(g.dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.dweight, tw.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(g.dbias, tb.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_backward_matches_finite_differences() -> None:
    """With r and d held at the forward's values (constants by definition), the loss
    sum(dy * y) differentiated numerically in x, weight and bias."""
    x, state, weight, bias = _case(5)
    dy = np.random.default_rng(6).normal(size=x.shape)
    out = step(x, state, weight, bias, axis=-1, renorm_clipping=CLIP)
    g = anybn.batch_norm_backward(
        dy, x, weight, out.mean, out.invstd, axis=-1, renorm_r=out.r, renorm_d=out.d
    )

    def loss(x: np.ndarray, w: np.ndarray, b: np.ndarray) -> float:
        y = anybn.batch_norm(x, weight=w * out.r, bias=b + w * out.d, training=True, axis=-1).y
        return float((dy * y).sum())

    h = 1e-6
    for name, arr, grad in (("x", x, g.dx), ("weight", weight, g.dweight), ("bias", bias, g.dbias)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            args = {"x": x, "w": weight, "b": bias}
            key = {"x": "x", "weight": "w", "bias": "b"}[name]
            up, down = arr.copy(), arr.copy()
            up[i] += h
            down[i] -= h
            num[i] = (loss(**{**args, key: up}) - loss(**{**args, key: down})) / (2 * h)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("lib", ["torch", "jax"])
def test_autodiff_through_renorm(lib: str) -> None:
    """torch autograd and jax.grad through anybn.batch_norm(renorm=True) equal the analytic
    backward: r and d are constants, the gradient flows through the batch statistics."""
    x, state, weight, bias = _case(7)
    dy = np.random.default_rng(8).normal(size=x.shape)
    out = step(x, state, weight, bias, axis=-1, renorm_clipping=CLIP)
    g = anybn.batch_norm_backward(
        dy, x, weight, out.mean, out.invstd, axis=-1, renorm_r=out.r, renorm_d=out.d
    )
    if lib == "torch":
        torch = pytest.importorskip("torch")
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, weight, bias))
        ts = {k: torch.tensor(v) for k, v in state.items()}
        y = step(tx, ts, tw, tb, axis=-1, renorm_clipping=CLIP).y
        y.backward(torch.tensor(dy))
        got = [tx.grad.numpy(), tw.grad.numpy(), tb.grad.numpy()]
    else:
        jax = pytest.importorskip("jax")
        jnp = jax.numpy
        with jax.enable_x64(True):
            js = {k: jnp.asarray(v) for k, v in state.items()}

            def loss(x: Any, w: Any, b: Any) -> Any:
                y = step(x, js, w, b, axis=-1, renorm_clipping=CLIP).y
                return (y * jnp.asarray(dy)).sum()

            got = [
                np.asarray(a)
                for a in jax.grad(loss, argnums=(0, 1, 2))(
                    jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias)
                )
            ]
    for a, b, name in zip(got, g, ("dx", "dweight", "dbias"), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11, err_msg=name)


def test_masked_renorm_uses_masked_statistics() -> None:
    """A mask changes the batch statistics that r, d and the moving statistics see."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(6, 5, 2))
    mask = rng.random((6, 5, 1)) < 0.6
    mask[0] = True
    state = fresh(2)
    out = step(x, state, None, None, axis=-1, mask=mask, var_estimator="biased", momentum=0.5,
               renorm_momentum=0.5)  # fmt: skip
    m = np.broadcast_to(mask, x.shape)
    mean = (x * m).sum((0, 1)) / m.sum((0, 1))
    var = (m * (x - mean) ** 2).sum((0, 1)) / m.sum((0, 1))
    std = np.sqrt(var + 1e-5)
    np.testing.assert_allclose(out.r, std, rtol=1e-13)
    np.testing.assert_allclose(out.d, mean, rtol=1e-13)
    np.testing.assert_allclose(out.new_renorm_mean, 0.5 * mean, rtol=1e-13)
    np.testing.assert_allclose(out.y, ((x - mean) / std * out.r + out.d), rtol=1e-12, atol=1e-12)
    dy = rng.normal(size=x.shape)
    g = anybn.batch_norm_backward(
        dy, x, None, out.mean, out.invstd, axis=-1, mask=mask, renorm_r=out.r, renorm_d=out.d
    )
    plain = anybn.batch_norm_backward(dy, x, out.r, out.mean, out.invstd, axis=-1, mask=mask)
    np.testing.assert_allclose(g.dx, plain.dx, rtol=1e-14)
    np.testing.assert_allclose(g.dweight, out.r * plain.dweight + out.d * plain.dbias)


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"renorm_clipping": {"rmax": 0.5}}, ValueError, r"renorm_clipping\['rmax'\] must be >= 1"),
        ({"renorm_clipping": {"rmin": 1.5}}, ValueError, r"renorm_clipping\['rmin'\] must be in"),
        (
            {"renorm_clipping": {"dmax": -1.0}},
            ValueError,
            r"renorm_clipping\['dmax'\] must be >= 0",
        ),
        ({"renorm_clipping": {"r_max": 3.0}}, ValueError, "unknown keys \\['r_max'\\]"),
        ({"renorm_clipping": [3.0]}, TypeError, "renorm_clipping must be a dict"),
        ({"renorm_clipping": {"rmax": "3"}}, TypeError, "must be a real number"),
        ({"renorm_momentum": 1.5}, ValueError, "renorm_momentum must be in \\[0, 1\\]"),
        ({"renorm": 1}, TypeError, "renorm must be a bool"),
        ({"renorm_std": None}, ValueError, "renorm=True needs the running statistics"),
        ({"running_mean": None, "running_var": None}, ValueError, "needs the running statistics"),
        ({"renorm_mean": np.zeros(3)}, ValueError, "renorm_mean must have shape \\(2,\\)"),
    ],
)
def test_bad_input(options: dict[str, Any], error: type[Exception], match: str) -> None:
    x = np.random.default_rng(0).normal(size=(4, 2))
    args = {
        "running_mean": np.zeros(2), "running_var": np.ones(2), "renorm_mean": np.zeros(2),
        "renorm_std": np.ones(2), "renorm": True, **options,
    }  # fmt: skip
    before = {k: v.copy() for k, v in args.items() if isinstance(v, np.ndarray)}
    with pytest.raises(error, match=match):
        anybn.batch_norm(x, training=True, **args)
    for k, v in before.items():
        np.testing.assert_array_equal(args[k], v)


def test_renorm_arrays_without_renorm() -> None:
    with pytest.raises(ValueError, match="renorm_mean given without renorm=True"):
        anybn.batch_norm(np.ones((4, 2)), training=True, renorm_mean=np.zeros(2))


def test_backward_needs_r_and_d_together() -> None:
    x = np.random.default_rng(0).normal(size=(4, 2))
    out = anybn.batch_norm(x, training=True)
    with pytest.raises(ValueError, match="renorm_r and renorm_d must be given together"):
        anybn.batch_norm_backward(x, x, None, out.mean, out.invstd, renorm_r=np.ones(2))


# --- against Keras 3 ---------------------------------------------------------------------


def _keras() -> Any:
    try:
        import keras
    except ImportError as exc:  # keras missing, or its backend (tensorflow by default)
        pytest.skip(f"Keras not importable ({exc}); pip install keras (KERAS_BACKEND=jax)")
    if keras.backend.backend() != "jax":
        pytest.skip(f"the gradients are compared with jax.grad: KERAS_BACKEND is "
                    f"{keras.backend.backend()!r}, not 'jax'")  # fmt: skip
    return keras


@KERAS_WARNINGS
@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_against_keras_step_by_step(masked: bool) -> None:
    """keras.layers.BatchNormalization(renorm=True) and anybn.batch_norm(renorm=True) on the
    same float32 inputs for 4 steps, the clipping changed between steps (Keras reads its
    renorm_clipping dict at each call; anybn takes the values per call): y, the moving
    statistics (moving_mean, moving_variance, moving_stddev, renorm_mean, renorm_stddev),
    and the gradients of sum(dy * y) from jax.grad of the Keras layer against
    anybn.batch_norm_backward and jax.grad through anybn.batch_norm on JAX arrays."""
    keras = _keras()
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(11)
    c, momentum, renorm_momentum, eps = 3, 0.9, 0.8, 1e-3
    clipping = {"rmin": 0.5, "rmax": 2.0, "dmax": 1.0}
    layer = keras.layers.BatchNormalization(
        axis=-1, momentum=momentum, epsilon=eps, renorm=True, renorm_clipping=clipping,
        renorm_momentum=renorm_momentum,
    )  # fmt: skip
    layer.build((None, 5, c))
    clipping = layer.renorm_clipping  # Keras' own copy, read at each call
    layer.gamma.assign(rng.uniform(0.5, 2, c).astype(np.float32))
    layer.beta.assign(rng.normal(size=c).astype(np.float32))
    weight, bias = np.asarray(layer.gamma.value), np.asarray(layer.beta.value)
    state = fresh(c, np.float32)
    keys = {
        "moving_mean": "running_mean", "moving_variance": "running_var",
        "moving_stddev": "running_std", "renorm_mean": "renorm_mean",
        "renorm_stddev": "renorm_std",
    }  # fmt: skip
    options = dict(
        axis=-1, momentum=1 - momentum, renorm_momentum=1 - renorm_momentum, eps=eps,
        var_estimator="biased",
    )  # fmt: skip
    clipped = False
    for t in range(4):
        clipping.update({"rmax": 2.0 + t, "rmin": 1 / (2.0 + t), "dmax": 1.0 + t})  # schedule
        x = rng.normal(3.0 - t, 2.0 + t, size=(6, 5, c)).astype(np.float32)
        dy = rng.normal(size=x.shape).astype(np.float32)
        mask = None
        if masked:
            mask = rng.random((6, 5)) < 0.7
            mask[0] = True
        trainable = [v.value for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]

        def keras_loss(x: Any, trainable: list[Any], frozen: list[Any] = frozen,
                       dy: Any = dy, mask: Any = mask) -> Any:  # fmt: skip
            y, _ = layer.stateless_call(trainable, frozen, x, training=True, mask=mask)
            return (y * dy).sum()

        kdx, (kgamma, kbeta) = jax.grad(keras_loss, argnums=(0, 1))(jnp.asarray(x), trainable)
        y_keras = np.asarray(layer(x, training=True, mask=mask))
        amask = None if mask is None else mask[..., None]
        before = state
        out = step(x, state, weight, bias, renorm_clipping=dict(clipping), mask=amask, **options)
        np.testing.assert_allclose(out.y, y_keras, rtol=2e-5, atol=2e-5)
        clipped |= bool(np.any(out.r == clipping["rmax"]) | np.any(out.r == clipping["rmin"]))
        clipped |= bool(np.any(np.abs(out.d) == clipping["dmax"]))
        state = advance(out)
        for kname, aname in keys.items():
            np.testing.assert_allclose(
                state[aname], np.asarray(getattr(layer, kname).value), rtol=2e-6, atol=1e-6,
                err_msg=kname,
            )  # fmt: skip
        g = anybn.batch_norm_backward(
            dy, x, weight, out.mean, out.invstd, axis=-1, mask=amask, renorm_r=out.r,
            renorm_d=out.d,
        )  # fmt: skip
        for got, want, name in ((g.dx, kdx, "dx"), (g.dweight, kgamma, "dgamma"),
                                (g.dbias, kbeta, "dbeta")):  # fmt: skip
            np.testing.assert_allclose(got, np.asarray(want), rtol=1e-4, atol=1e-4, err_msg=name)

        def anybn_loss(x: Any, w: Any, b: Any, dy: Any = dy, amask: Any = amask,
                       before: dict[str, Any] = before) -> Any:  # fmt: skip
            prev = {k: jnp.asarray(v) for k, v in before.items()}
            o = step(x, prev, w, b, renorm_clipping=dict(clipping),
                     mask=None if amask is None else jnp.asarray(amask), **options)  # fmt: skip
            return (o.y * dy).sum()

        jdx, jw, jb = jax.grad(anybn_loss, argnums=(0, 1, 2))(
            jnp.asarray(x), jnp.asarray(weight), jnp.asarray(bias)
        )
        np.testing.assert_allclose(np.asarray(jdx), np.asarray(kdx), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(jw), np.asarray(kgamma), rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(np.asarray(jb), np.asarray(kbeta), rtol=1e-4, atol=1e-4)
    assert clipped


# --- the layer ---------------------------------------------------------------------------


def test_layer_renorm_steps_and_state() -> None:
    """anybn.BatchNorm(renorm=True): three steps equal the functional calls on explicit
    state (a schedule of the clipping between steps), backward uses r and d, the state dict
    carries the three renorm buffers, eval is plain batch norm on the running statistics."""
    rng = np.random.default_rng(12)
    bn = anybn.BatchNorm(
        3, axis=-1, momentum=0.2, renorm=True, renorm_momentum=0.3,
        renorm_clipping={"rmax": 1.5, "dmax": 0.5},
    )  # fmt: skip
    state = fresh(3)
    weight, bias = np.ones(3), np.zeros(3)
    for t in range(3):
        bn.renorm_clipping = {"rmax": 1.5 + t, "dmax": 0.5 + t}
        x = rng.normal(2.0, 3.0, size=(6, 4, 3))
        y = bn(x)
        out = step(x, state, weight, bias, axis=-1, momentum=0.2, renorm_momentum=0.3,
                   renorm_clipping={"rmax": 1.5 + t, "dmax": 0.5 + t})  # fmt: skip
        np.testing.assert_array_equal(y, out.y)
        state = advance(out)
        for key, value in state.items():
            np.testing.assert_array_equal(getattr(bn, key), value, err_msg=key)
        dy = rng.normal(size=x.shape)
        g = bn.backward(dy)
        want = anybn.batch_norm_backward(
            dy, x, weight, out.mean, out.invstd, axis=-1, renorm_r=out.r, renorm_d=out.d
        )
        for a, b in zip(g, want, strict=True):
            np.testing.assert_array_equal(a, b)
    assert bn.num_batches_tracked == 3
    sd = bn.state_dict()
    assert sorted(sd) == sorted(
        ["weight", "bias", "running_mean", "running_var", "num_batches_tracked",
         "running_std", "renorm_mean", "renorm_std"]
    )  # fmt: skip
    other = anybn.BatchNorm(3, axis=-1, renorm=True)
    other.load_state_dict(sd)
    np.testing.assert_array_equal(other.renorm_std, bn.renorm_std)
    x = rng.normal(size=(5, 4, 3))
    bn.eval()
    np.testing.assert_array_equal(
        bn(x), anybn.batch_norm(x, bn.running_mean, bn.running_var, axis=-1).y
    )
    assert "renorm=True" in repr(bn)


@KERAS_WARNINGS
def test_layer_renorm_matches_keras() -> None:
    """The layer and Keras 3's, both from their initial state, three float32 steps."""
    keras = _keras()
    rng = np.random.default_rng(13)
    layer = keras.layers.BatchNormalization(
        momentum=0.9, epsilon=1e-3, renorm=True, renorm_momentum=0.7,
        renorm_clipping={"rmax": 2.0, "dmax": 1.0},
    )  # fmt: skip
    bn = anybn.BatchNorm(
        axis=-1, momentum=0.1, eps=1e-3, renorm=True, renorm_momentum=0.3, dtype="float32",
        var_estimator="biased", renorm_clipping={"rmax": 2.0, "dmax": 1.0},
    )  # fmt: skip
    for t in range(3):
        x = rng.normal(1.0 + t, 2.0, size=(8, 3)).astype(np.float32)
        y_keras = np.asarray(layer(x, training=True))
        np.testing.assert_allclose(bn(x), y_keras, rtol=2e-5, atol=2e-5)
        for kname, aname in (("moving_mean", "running_mean"), ("moving_variance", "running_var"),
                             ("moving_stddev", "running_std"), ("renorm_mean", "renorm_mean"),
                             ("renorm_stddev", "renorm_std")):  # fmt: skip
            np.testing.assert_allclose(
                getattr(bn, aname), np.asarray(getattr(layer, kname).value), rtol=2e-6,
                atol=1e-6, err_msg=kname,
            )  # fmt: skip


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"renorm_clipping": {"rmax": 0.5}}, "must be >= 1"),
        ({"renorm_clipping": {"dmax": -1}}, "must be >= 0"),
        ({"renorm_clipping": {"bad": 1}}, "unknown keys"),
        ({"renorm_momentum": -0.1}, "renorm_momentum must be in"),
        ({"track_running_stats": False}, "renorm=True needs running statistics"),
    ],
)
def test_layer_bad_options(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        anybn.BatchNorm(2, renorm=True, **options)


def test_layer_bad_clipping_at_forward_leaves_state() -> None:
    """A clipping made invalid between steps raises in the forward; nothing changes."""
    bn = anybn.BatchNorm(2, renorm=True)
    x = np.random.default_rng(0).normal(size=(4, 2))
    bn(x)
    before = {k: np.copy(v) for k, v in bn.state_dict().items()}
    bn.renorm_clipping = {"rmax": 0.5}
    with pytest.raises(ValueError, match="must be >= 1"):
        bn(x + 1)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


# --- every backend -----------------------------------------------------------------------


def test_every_backend(backend: Any) -> None:
    """Forward (with a mask), the moving statistics and the backward on each backend of the
    matrix, float32, equal the float64 NumPy computation (jax:jit runs them jitted)."""
    rng = np.random.default_rng(20)
    x = rng.normal(1.0, 2.0, size=(6, 3, 4))
    dy = rng.normal(size=x.shape)
    mask = rng.random((6, 1, 4)) < 0.8
    mask[0] = True
    weight, bias = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    state = fresh(3)
    state["renorm_mean"], state["renorm_std"] = rng.normal(size=3), rng.uniform(0.5, 2, 3)

    def run(x: Any, dy: Any, m: Any, w: Any, b: Any, rm: Any, rv: Any, rs: Any, qm: Any,
            qs: Any) -> tuple[Any, ...]:  # fmt: skip
        o = anybn.batch_norm(
            x, rm, rv, w, b, training=True, renorm=True, renorm_mean=qm, renorm_std=qs,
            running_std=rs, mask=m, renorm_clipping=CLIP,
        )  # fmt: skip
        g = anybn.batch_norm_backward(
            dy, x, w, o.mean, o.invstd, mask=m, renorm_r=o.r, renorm_d=o.d
        )
        return (*o, *g)

    keys = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")
    args = (x, dy, mask, weight, bias, *(state[k] for k in keys))
    want = run(*args)
    conv = [backend.asarray(a) if a.dtype == bool else backend.asarray(a, "float32")
            for a in args]  # fmt: skip
    got = backend.call(run, *conv)
    for name, g, w in zip(
        (*anybn.RenormOutput._fields, "dx", "dweight", "dbias"), got, want, strict=True
    ):
        np.testing.assert_allclose(backend.to_numpy(g), w, rtol=2e-5, atol=2e-5, err_msg=name)


def test_jax_axis_name_equals_whole_batch() -> None:
    """renorm=True with axis_name= under jax.pmap (4 CPU devices, see conftest.py): the
    statistics of the whole batch, so y, r, d and the moving statistics equal one call on
    the concatenated batch, on every device."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    if jax.local_device_count() < 4:
        pytest.skip("needs 4 JAX devices (XLA_FLAGS=--xla_force_host_platform_device_count=4)")
    rng = np.random.default_rng(22)
    x = rng.normal(2.0, 3.0, size=(4, 3, 2))  # 4 devices x 3 samples x 2 channels
    z, o = np.zeros(2), np.ones(2)
    with jax.enable_x64(True):

        def f(xs: Any) -> Any:
            return anybn.batch_norm(
                xs, jnp.zeros(2), jnp.ones(2), training=True, axis=-1, renorm=True,
                renorm_mean=jnp.zeros(2), renorm_std=jnp.ones(2), renorm_clipping=CLIP,
                axis_name="d",
            )  # fmt: skip

        got = jax.pmap(f, axis_name="d")(jnp.asarray(x))
    want = anybn.batch_norm(
        x.reshape(12, 2), z, o, training=True, axis=-1, renorm=True, renorm_mean=z,
        renorm_std=o, renorm_clipping=CLIP,
    )  # fmt: skip
    np.testing.assert_allclose(np.asarray(got.y).reshape(12, 2), want.y, rtol=1e-12, atol=1e-12)
    for name in ("r", "d", "new_running_mean", "new_running_var", "new_running_std",
                 "new_renorm_mean", "new_renorm_std"):  # fmt: skip
        for device in range(4):
            np.testing.assert_allclose(
                np.asarray(getattr(got, name))[device], getattr(want, name), rtol=1e-12,
                atol=1e-14, err_msg=name,
            )  # fmt: skip


def test_layer_renorm_copies_and_pickles() -> None:
    import copy
    import pickle

    bn = anybn.BatchNorm(2, renorm=True, renorm_clipping={"rmax": 2.0})
    bn(np.random.default_rng(0).normal(3.0, 2.0, size=(6, 2)))
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        assert clone.renorm and clone.renorm_clipping == {"rmax": 2.0}
        for k, v in bn.state_dict().items():
            np.testing.assert_array_equal(clone.state_dict()[k], v, err_msg=k)
        x = np.random.default_rng(1).normal(size=(6, 2))
        np.testing.assert_array_equal(clone(x), copy.deepcopy(bn)(x))
