"""JAX: eager, jit, grad, vmap, jit(grad), hessian; gradients by anybn's backward (custom_vjp).

The oracle is a plain ``jax.numpy`` batch norm written from the definitions,
differentiated by JAX itself; second derivatives are also checked against
central finite differences of anybn's own gradient.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import anybn

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

EPS = 1e-5


@pytest.fixture(autouse=True)
def _x64() -> Any:
    """float64 here means float64 (the backend matrix turns x64 on too)."""
    jax.config.update("jax_enable_x64", True)
    yield


def definition(x: Any, w: Any, b: Any, mask: Any = None) -> Any:
    """Batch norm from its definition, channels on axis 1, optional mask."""
    axes = tuple(i for i in range(x.ndim) if i != 1)
    bshape = tuple(-1 if i == 1 else 1 for i in range(x.ndim))
    m = jnp.ones_like(x) if mask is None else jnp.broadcast_to(mask, x.shape).astype(x.dtype)
    n = m.sum(axes, keepdims=True)
    mean = (m * x).sum(axes, keepdims=True) / n
    var = (m * (x - mean) ** 2).sum(axes, keepdims=True) / n
    return (x - mean) / jnp.sqrt(var + EPS) * w.reshape(bshape) + b.reshape(bshape)


def data(shape: tuple[int, ...] = (4, 3, 5), seed: int = 0) -> tuple[Any, ...]:
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(2.0, 3.0, size=shape))
    c = shape[1]
    return (
        x,
        jnp.asarray(rng.normal(size=c)),
        jnp.asarray(rng.normal(size=c)),
        jnp.asarray(rng.normal(size=shape)),
    )


def loss_anybn(x: Any, w: Any, b: Any, g: Any, mask: Any = None) -> Any:
    y = anybn.batch_norm(x, None, None, w, b, training=True, mask=mask).y
    return jnp.sum(jnp.sin(y) * g)


def loss_definition(x: Any, w: Any, b: Any, g: Any, mask: Any = None) -> Any:
    return jnp.sum(jnp.sin(definition(x, w, b, mask)) * g)


MASKS = pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])


def _mask(masked: bool, shape: tuple[int, ...]) -> Any:
    if not masked:
        return None
    lengths = np.array([5, 2, 4, 3])[: shape[0]]
    return jnp.asarray(np.arange(shape[2])[None, None, :] < lengths[:, None, None])


@MASKS
def test_eager_jit_and_vmap_forward(masked: bool) -> None:
    x, w, b, _ = data()
    mask = _mask(masked, x.shape)
    want = definition(x, w, b, mask)
    eager = anybn.batch_norm(x, None, None, w, b, training=True, mask=mask).y
    jitted = jax.jit(lambda *a: anybn.batch_norm(*a, training=True, mask=mask).y)(
        x, None, None, w, b
    )
    for got in (eager, jitted):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-12, atol=1e-12)
    xs = jnp.stack([x, 3.0 * x - 1.0])
    vm = jax.vmap(lambda xx: anybn.batch_norm(xx, None, None, w, b, training=True, mask=mask).y)(xs)
    for i in range(2):
        np.testing.assert_allclose(
            np.asarray(vm[i]), np.asarray(definition(xs[i], w, b, mask)), rtol=1e-11, atol=1e-11
        )


@MASKS
def test_grad_and_jit_grad_match_autodiff_of_the_definition(masked: bool) -> None:
    x, w, b, g = data()
    mask = _mask(masked, x.shape)
    want = jax.grad(loss_definition, (0, 1, 2))(x, w, b, g, mask)
    for fn in (jax.grad(loss_anybn, (0, 1, 2)), jax.jit(jax.grad(loss_anybn, (0, 1, 2)))):
        got = fn(x, w, b, g, mask)
        for a, e in zip(got, want, strict=True):
            np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-10, atol=1e-10)


def test_vmap_of_grad() -> None:
    x, w, b, g = data()
    xs = jnp.stack([x, 0.5 * x + 4.0])
    got = jax.vmap(jax.grad(loss_anybn), in_axes=(0, None, None, None))(xs, w, b, g)
    for i in range(2):
        want = jax.grad(loss_definition)(xs[i], w, b, g)
        np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-10, atol=1e-10)


def test_gradients_use_anybns_backward() -> None:
    """The custom_vjp is in the graph: reverse mode calls anybn's analytic backward."""
    x, w, b, g = data()
    assert "custom_vjp" in str(jax.make_jaxpr(loss_anybn)(x, w, b, g))


@MASKS
def test_hessian_matches_finite_differences(masked: bool) -> None:
    """Double backward: jax.hessian (and jacrev of jacrev) against central differences."""
    x, w, b, g = data((3, 2, 3), seed=1)
    mask = (
        None if not masked else jnp.asarray(np.array([[[1, 1, 0]], [[1, 0, 1]], [[1, 1, 1]]], bool))
    )

    def f(xw: Any) -> Any:
        return loss_anybn(xw[:-2].reshape(x.shape), xw[-2:], b, g, mask)

    z = jnp.concatenate([x.ravel(), w])
    hess = np.asarray(jax.hessian(f)(z))
    hess_rev = np.asarray(jax.jacrev(jax.jacrev(f))(z))
    grad = jax.grad(f)
    h = 1e-5
    fd = np.stack(
        [
            (np.asarray(grad(z.at[i].add(h))) - np.asarray(grad(z.at[i].add(-h)))) / (2 * h)
            for i in range(z.size)
        ]
    )
    np.testing.assert_allclose(hess, fd, atol=1e-6 * max(1.0, np.abs(fd).max()))
    np.testing.assert_allclose(hess_rev, hess, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(hess, hess.T, atol=1e-8)
    want = np.asarray(
        jax.hessian(lambda z: loss_definition(z[:-2].reshape(x.shape), z[-2:], b, g, mask))(z)
    )
    np.testing.assert_allclose(hess, want, rtol=1e-8, atol=1e-8)


def test_gradient_through_returned_statistics() -> None:
    """mean and invstd are outputs too: their cotangents reach x."""
    x, w, b, _ = data()

    def f(x: Any) -> Any:
        out = anybn.batch_norm(x, None, None, w, b, training=True)
        return jnp.sum(out.mean**2) + jnp.sum(out.invstd)

    def ref(x: Any) -> Any:
        mean = x.mean((0, 2))
        return jnp.sum(mean**2) + jnp.sum(1 / jnp.sqrt(x.var((0, 2)) + EPS))

    np.testing.assert_allclose(np.asarray(jax.grad(f)(x)), np.asarray(jax.grad(ref)(x)), atol=1e-12)


def test_running_stats_are_not_differentiable_and_update() -> None:
    x, w, b, _ = data()

    def f(rm: Any) -> Any:
        out = anybn.batch_norm(x, rm, jnp.ones(3), w, b, training=True)
        return jnp.sum(out.new_running_mean) + jnp.sum(out.y)

    assert np.all(np.asarray(jax.grad(f)(jnp.zeros(3))) == 0.0)
    out = jax.jit(lambda x: anybn.batch_norm(x, jnp.zeros(3), jnp.ones(3), training=True))(x)
    np.testing.assert_allclose(np.asarray(out.new_running_mean), 0.1 * np.asarray(x).mean((0, 2)))


def test_eval_grad_is_jax_autodiff() -> None:
    x, w, b, g = data()
    rm, rv = jnp.asarray([0.5, -1.0, 2.0]), jnp.asarray([1.5, 0.5, 2.0])

    def f(x: Any, rv: Any) -> Any:
        return jnp.sum(anybn.batch_norm(x, rm, rv, w, b).y * g)

    gx, grv = jax.grad(f, (0, 1))(x, rv)
    scale = np.asarray(w / jnp.sqrt(rv + EPS))
    np.testing.assert_allclose(np.asarray(gx), np.asarray(g) * scale[None, :, None], rtol=1e-12)
    assert np.any(np.asarray(grv) != 0.0)  # eval: y depends on running_var


def test_lazy_mask_with_too_few_values_gives_nan() -> None:
    """Under jit the count cannot be inspected: a starved channel gives NaN (eager raises)."""
    x, *_ = data()
    mask = jnp.zeros((4, 3, 5), bool).at[:, 1:, :].set(True).at[0, 0, 0].set(True)
    with pytest.raises(ValueError, match="counted value"):
        anybn.batch_norm(x, training=True, mask=mask)
    y = jax.jit(lambda x, m: anybn.batch_norm(x, training=True, mask=m).y)(x, mask)
    assert np.all(np.isnan(np.asarray(y[:, 0]))) and np.all(np.isfinite(np.asarray(y[:, 1:])))


def test_layer_with_jax_arrays() -> None:
    """anybn.BatchNorm holds JAX arrays and updates them (eager use)."""
    x, *_ = data()
    bn = anybn.BatchNorm(3)
    y = bn(x)
    assert isinstance(y, jax.Array) and isinstance(bn.running_mean, jax.Array)
    np.testing.assert_allclose(np.asarray(bn.running_mean), 0.1 * np.asarray(x).mean((0, 2)))
