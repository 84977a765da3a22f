"""Ghost batch norm (``virtual_batch_size=k``) against Keras 2's documented rule.

Keras 2 (``tf.keras.layers.BatchNormalization(virtual_batch_size=k)``, Keras 2.x
``normalization/batch_normalization.py``) reshapes x of shape ``(N, ...)`` to
``(k, N // k, ...)`` ("Will cause errors if virtual_batch_size does not divide the batch
size"), reduces over every axis but the group axis 1 and the channel axes (so sample ``i``
is in group ``i % (N // k)``), and updates the moving statistics once per step from the
mean over the groups of their mean and variance (``tf.reduce_mean(mean, axis=1)``,
``tf.reduce_mean(variance, axis=1)``). That rule is written out below in float64 NumPy;
Keras 3 dropped the option, so no library runs it here. The backward is checked against
torch autograd through the same plain implementation and against finite differences.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import anybn


def keras2_rule(
    x: np.ndarray,
    rm: np.ndarray,
    rv: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    *,
    k: int,
    axis: int,
    momentum: float,
    eps: float,
    biased: bool,
    mask: np.ndarray | None = None,
    xp: Any = np,
) -> tuple[Any, Any, Any]:
    """y and the new running statistics of one training step, Keras 2's ghost batches.

    ``momentum`` is the batch's weight (Keras' momentum is ``1 - momentum``); the running
    variance accumulates the groups' unbiased variance unless ``biased`` (Keras: biased).
    """
    axis %= x.ndim
    g = x.shape[0] // k
    xg = x.reshape((k, g, *x.shape[1:]))
    caxis = axis + 1
    red = tuple(i for i in range(xg.ndim) if i not in (1, caxis))
    m = (
        xp.ones_like(xg)
        if mask is None
        else xp.broadcast_to(mask, x.shape).reshape(xg.shape).astype(xg.dtype)
        if xp is np
        else mask.broadcast_to(x.shape).reshape(xg.shape).to(xg.dtype)
    )
    n = m.sum(red, keepdims=True) if xp is np else m.sum(dim=red, keepdim=True)
    mean = (
        (m * xg).sum(red, keepdims=True) / n
        if xp is np
        else (m * xg).sum(dim=red, keepdim=True) / n
    )
    dev = m * (xg - mean) ** 2
    var = (dev.sum(red, keepdims=True) if xp is np else dev.sum(dim=red, keepdim=True)) / n
    shape = [1] * xg.ndim
    shape[caxis] = x.shape[axis]
    y = (xg - mean) / (var + eps) ** 0.5 * weight.reshape(shape) + bias.reshape(shape)
    est = var if biased else var * n / (n - 1)
    batch_mean = mean.mean(1).reshape(-1) if xp is np else mean.mean(dim=1).reshape(-1)
    batch_var = est.mean(1).reshape(-1) if xp is np else est.mean(dim=1).reshape(-1)
    return (
        y.reshape(x.shape),
        (1 - momentum) * rm + momentum * batch_mean,
        (1 - momentum) * rv + momentum * batch_var,
    )


CASES = [
    pytest.param((8, 3), 1, 4, id="NC-k4"),
    pytest.param((12, 3, 5), 1, 3, id="NCL-k3"),
    pytest.param((6, 2, 3, 3), 1, 2, id="NCHW-k2"),
    pytest.param((8, 5, 3), -1, 2, id="NLC-k2"),
    pytest.param((8, 3, 3, 2), -1, 4, id="NHWC-k4"),
]


@pytest.mark.parametrize(("shape", "axis", "k"), CASES)
@pytest.mark.parametrize("biased", [False, True], ids=["unbiased", "biased"])
def test_forward_matches_keras2_rule(
    shape: tuple[int, ...], axis: int, k: int, biased: bool
) -> None:
    rng = np.random.default_rng(0)
    c = shape[axis]
    x = rng.normal(2.0, 3.0, size=shape)
    rm, rv, w, b = (
        rng.normal(size=c),
        rng.uniform(1, 2, c),
        rng.uniform(0.5, 2, c),
        rng.normal(size=c),
    )
    est = "biased" if biased else "unbiased"
    out = anybn.batch_norm(
        x, rm, rv, w, b, training=True, momentum=0.3, axis=axis, virtual_batch_size=k,
        var_estimator=est,
    )  # fmt: skip
    y, new_rm, new_rv = keras2_rule(
        x, rm, rv, w, b, k=k, axis=axis, momentum=0.3, eps=1e-5, biased=biased
    )
    np.testing.assert_allclose(out.y, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.new_running_mean, new_rm, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(out.new_running_var, new_rv, rtol=1e-13)
    assert out.mean.shape == (shape[0] // k, c)
    # the groups differ from the whole batch: the test would fail on plain batch norm
    whole = anybn.batch_norm(x, None, None, w, b, training=True, axis=axis)
    assert not np.allclose(out.y, whole.y)
    # eval is unchanged: the running statistics, whatever the batch size
    ev = anybn.batch_norm(x[:5], rm, rv, w, b, axis=axis, virtual_batch_size=k)
    np.testing.assert_array_equal(ev.y, anybn.batch_norm(x[:5], rm, rv, w, b, axis=axis).y)


def test_masked_ghost_batches() -> None:
    """Each group's statistics over its counted values; the update averages the groups."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(8, 5, 3))
    mask = rng.random((8, 5, 1)) < 0.7
    mask[:, :2] = True
    rm, rv, w, b = np.zeros(3), np.ones(3), rng.uniform(0.5, 2, 3), rng.normal(size=3)
    out = anybn.batch_norm(
        x, rm, rv, w, b, training=True, axis=-1, mask=mask, virtual_batch_size=2, momentum=0.5
    )
    y, new_rm, new_rv = keras2_rule(
        x, rm, rv, w, b, k=2, axis=-1, momentum=0.5, eps=1e-5, biased=False, mask=mask
    )
    np.testing.assert_allclose(out.y, y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.new_running_mean, new_rm, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(out.new_running_var, new_rv, rtol=1e-13)


@pytest.mark.parametrize(("shape", "axis", "k"), CASES[1:4])
def test_backward_matches_torch_autograd(shape: tuple[int, ...], axis: int, k: int) -> None:
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(2)
    c = shape[axis]
    x, dy = rng.normal(size=shape), rng.normal(size=shape)
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    mask = rng.random(shape) < 0.8
    for m in (None, mask):
        out = anybn.batch_norm(x, None, None, w, b, training=True, axis=axis, mask=m,
                               virtual_batch_size=k)  # fmt: skip
        g = anybn.batch_norm_backward(
            dy, x, w, out.mean, out.invstd, axis=axis, mask=m, virtual_batch_size=k
        )
        tx, tw, tb = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        y, _, _ = keras2_rule(
            tx, torch.zeros(c), torch.ones(c), tw, tb, k=k, axis=axis, momentum=0.1, eps=1e-5,
            biased=False, mask=None if m is None else torch.tensor(m), xp=torch,
        )  # fmt: skip
        y.backward(torch.tensor(dy))
        np.testing.assert_allclose(g.dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g.dweight, tw.grad.numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(g.dbias, tb.grad.numpy(), rtol=1e-10, atol=1e-12)
        # torch autograd through anybn.batch_norm itself gives the same
        tx2, tw2, tb2 = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
        anybn.batch_norm(
            tx2, None, None, tw2, tb2, training=True, axis=axis,
            mask=None if m is None else torch.tensor(m), virtual_batch_size=k,
        ).y.backward(torch.tensor(dy))  # fmt: skip
        np.testing.assert_allclose(tx2.grad.numpy(), g.dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(tw2.grad.numpy(), g.dweight, rtol=1e-10, atol=1e-12)


def test_backward_matches_finite_differences() -> None:
    rng = np.random.default_rng(3)
    x, dy = rng.normal(size=(6, 2, 3)), rng.normal(size=(6, 2, 3))
    w, b = rng.uniform(0.5, 2, 2), rng.normal(size=2)
    out = anybn.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=3)
    g = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, virtual_batch_size=3)

    def loss(x: np.ndarray) -> float:
        y = anybn.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=3).y
        return float((dy * y).sum())

    num = np.zeros_like(x)
    h = 1e-6
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        num[i] = (loss(up) - loss(down)) / (2 * h)
    np.testing.assert_allclose(g.dx, num, rtol=1e-6, atol=1e-7)


def test_jax_grad_through_ghost_batches() -> None:
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(4)
    x, dy = rng.normal(size=(8, 3, 2)), rng.normal(size=(8, 3, 2))
    w, b = rng.uniform(0.5, 2, 3), rng.normal(size=3)
    out = anybn.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=4)
    g = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, virtual_batch_size=4)
    with jax.enable_x64(True):

        def loss(x: Any, w: Any, b: Any) -> Any:
            y = anybn.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=4).y
            return (y * jnp.asarray(dy)).sum()

        got = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(
            jnp.asarray(x), jnp.asarray(w), jnp.asarray(b)
        )
    for a, want in zip(got, g, strict=True):
        np.testing.assert_allclose(np.asarray(a), want, rtol=1e-10, atol=1e-12)


def test_ghost_with_renorm() -> None:
    """r and d from the groups' mean statistics (Keras 2 applied renorm to them), each group
    normalised by its own statistics."""
    rng = np.random.default_rng(5)
    x = rng.normal(1.0, 2.0, size=(8, 5, 2))
    eps = 1e-3
    out = anybn.batch_norm(
        x, np.zeros(2), np.ones(2), training=True, axis=-1, virtual_batch_size=4, renorm=True,
        renorm_mean=np.zeros(2), renorm_std=np.ones(2), eps=eps, var_estimator="biased",
        renorm_clipping={"rmax": 1.5, "dmax": 0.5},
    )  # fmt: skip
    xg = x.reshape(4, 2, 5, 2)
    mean, var = xg.mean((0, 2)), xg.var((0, 2))  # (groups, C)
    std = np.sqrt(var.mean(0) + eps)
    r, d = np.clip(std, 0, 1.5), np.clip(mean.mean(0), -0.5, 0.5)
    y = (xg - mean[None, :, None]) / np.sqrt(var[None, :, None] + eps) * r + d
    np.testing.assert_allclose(out.r, r, rtol=1e-13)
    np.testing.assert_allclose(out.d, d, rtol=1e-13)
    np.testing.assert_allclose(out.y, y.reshape(x.shape), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(out.new_renorm_mean, 0.01 * mean.mean(0), rtol=1e-13)
    np.testing.assert_allclose(out.new_running_std, 0.9 * np.sqrt(1 + eps) + 0.1 * std, rtol=1e-13)
    dy = rng.normal(size=x.shape)
    g = anybn.batch_norm_backward(
        dy, x, None, out.mean, out.invstd, axis=-1, virtual_batch_size=4, renorm_r=out.r,
        renorm_d=out.d,
    )  # fmt: skip
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x, requires_grad=True)
    tg = tx.reshape(4, 2, 5, 2)
    tm, tv = tg.mean(dim=(0, 2), keepdim=True), tg.var(dim=(0, 2), keepdim=True, unbiased=False)
    ty = (tg - tm) / (tv + eps).sqrt() * torch.tensor(r) + torch.tensor(d)
    ty.reshape(x.shape).backward(torch.tensor(dy))
    np.testing.assert_allclose(g.dx, tx.grad.numpy(), rtol=1e-10, atol=1e-12)
    xhat = (xg - mean[None, :, None]) / np.sqrt(var[None, :, None] + eps)
    dyg = dy.reshape(xg.shape)
    np.testing.assert_allclose(
        g.dweight, r * (dyg * xhat).sum((0, 1, 2)) + d * dyg.sum((0, 1, 2)), rtol=1e-12
    )


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "shape", "axis", "error", "match"),
    [
        (3, (8, 2), 1, ValueError, "virtual_batch_size=3 must divide the batch size"),
        (0, (8, 2), 1, ValueError, "virtual_batch_size must be >= 1"),
        (-2, (8, 2), 1, ValueError, "virtual_batch_size must be >= 1"),
        (2.0, (8, 2), 1, TypeError, "virtual_batch_size must be an int"),
        (True, (8, 2), 1, TypeError, "virtual_batch_size must be an int"),
        (2, (8, 2), 0, ValueError, "axis 0 is a channel axis"),
        (1, (8, 2), 1, ValueError, "more than 1 value per channel in each ghost batch"),
    ],
)
def test_bad_virtual_batch_size(
    k: Any, shape: tuple[int, ...], axis: int, error: type[Exception], match: str
) -> None:
    x = np.random.default_rng(0).normal(size=shape)
    c = shape[axis]
    rm, rv = np.zeros(c), np.ones(c)
    with pytest.raises(error, match=match):
        anybn.batch_norm(x, rm, rv, training=True, axis=axis, virtual_batch_size=k)
    np.testing.assert_array_equal(rm, 0.0)
    np.testing.assert_array_equal(rv, 1.0)


def test_ghost_batches_refuse_comm() -> None:
    """Ghost batches are one process's groups; with comm= (training) a ValueError, before
    any communication (the communicator object is never touched)."""
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match="virtual_batch_size cannot be combined with comm="):
        anybn.batch_norm(x, training=True, virtual_batch_size=2, comm=object())
    with pytest.raises(ValueError, match="virtual_batch_size cannot be combined with comm="):
        anybn.batch_norm_backward(x, x, None, np.zeros((2, 2)), np.ones((2, 2)),
                                  virtual_batch_size=2, comm=object())  # fmt: skip


def test_backward_checks_per_group_statistics() -> None:
    x = np.random.default_rng(0).normal(size=(8, 2))
    out = anybn.batch_norm(x, training=True)
    with pytest.raises(ValueError, match=r"mean must have shape \(2, 2\)"):
        anybn.batch_norm_backward(x, x, None, out.mean, out.invstd, virtual_batch_size=4)


# --- the layer ---------------------------------------------------------------------------


def test_layer_ghost_batches() -> None:
    rng = np.random.default_rng(6)
    bn = anybn.BatchNorm(3, virtual_batch_size=4, momentum=0.3)
    rm, rv = np.zeros(3), np.ones(3)
    w, b = np.ones(3), np.zeros(3)
    for _ in range(2):
        x = rng.normal(size=(8, 3, 5))
        y, rm, rv = keras2_rule(x, rm, rv, w, b, k=4, axis=1, momentum=0.3, eps=1e-5, biased=False)
        np.testing.assert_allclose(bn(x), y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(bn.running_mean, rm, rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(bn.running_var, rv, rtol=1e-13)
        dy = rng.normal(size=x.shape)
        out = anybn.batch_norm(x, None, None, w, b, training=True, virtual_batch_size=4)
        want = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, virtual_batch_size=4)
        for got, exp in zip(bn.backward(dy), want, strict=True):
            np.testing.assert_allclose(got, exp, rtol=1e-13, atol=1e-14)
    # a batch size that is not a multiple: ValueError, the layer as it was
    before = {k: np.copy(v) for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match="virtual_batch_size=4 must divide the batch size"):
        bn(rng.normal(size=(6, 3, 5)))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)
    # eval: unchanged, any batch size
    bn.eval()
    x = rng.normal(size=(5, 3, 5))
    np.testing.assert_array_equal(bn(x), anybn.batch_norm(x, bn.running_mean, bn.running_var).y)
    assert "virtual_batch_size=4" in repr(bn)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size must be >= 1"),
        ({"virtual_batch_size": 1.5}, TypeError, "virtual_batch_size must be an int"),
        ({"virtual_batch_size": 2, "comm": "torch"}, ValueError, "cannot be combined with comm"),
    ],
)
def test_layer_bad_virtual_batch_size(
    options: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        anybn.BatchNorm(2, **options)


def test_every_backend(backend: Any) -> None:
    """Ghost batches, channels on axis 1 (the merged call) and last (the tuple of axes), with
    a mask, forward and backward on each backend of the matrix in float32."""
    rng = np.random.default_rng(21)
    for axis, shape in ((1, (8, 3, 4)), (-1, (8, 4, 3))):
        x, dy = rng.normal(size=shape), rng.normal(size=shape)
        mask = rng.random(shape) < 0.8
        mask[:4] = True
        w, b = rng.uniform(0.5, 2, 3), rng.normal(size=3)
        rm, rv = np.zeros(3), np.ones(3)

        def run(x: Any, dy: Any, m: Any, w: Any, b: Any, rm: Any, rv: Any,
                axis: int = axis) -> tuple[Any, ...]:  # fmt: skip
            o = anybn.batch_norm(x, rm, rv, w, b, training=True, axis=axis, mask=m,
                                 virtual_batch_size=2)  # fmt: skip
            g = anybn.batch_norm_backward(dy, x, w, o.mean, o.invstd, axis=axis, mask=m,
                                          virtual_batch_size=2)  # fmt: skip
            return (*o, *g)

        args = (x, dy, mask, w, b, rm, rv)
        want = run(*args)
        conv = [backend.asarray(a) if a.dtype == bool else backend.asarray(a, "float32")
                for a in args]  # fmt: skip
        got = backend.call(run, *conv)
        for i, (g, e) in enumerate(zip(got, want, strict=True)):
            np.testing.assert_allclose(
                backend.to_numpy(g), e, rtol=2e-5, atol=2e-5, err_msg=f"axis {axis} #{i}"
            )
