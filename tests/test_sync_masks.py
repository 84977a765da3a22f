"""Masks with every other option: comm= (ranks as threads), several channel axes, the biased
estimator, Keras' mask shapes, and ``mask=`` on the anybn.torch modules.

The references are a plain float64 NumPy formula of masked batch norm, torch autograd
through the same formula, central finite differences, and Keras 3's
``BatchNormalization(mask=...)`` where Keras is installed (``KERAS_BACKEND=jax``). Real
processes (gloo, MPI) are in test_distributed.py (``test_masked``).
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import pytest
from test_distributed_local import ThreadGroup, _values

import anybn
from anybn.distributed import Communicator

EPS = 1e-3


def _reference(
    x: np.ndarray, mask: np.ndarray, axes: tuple[int, ...], eps: float = EPS
) -> dict[str, np.ndarray]:
    """Masked batch norm in float64, written out: the statistics of the True values."""
    red = tuple(i for i in range(x.ndim) if i not in axes)
    x = x.astype(np.float64)
    n = mask.sum(red, keepdims=True)
    mean = np.where(mask, x, 0.0).sum(red, keepdims=True) / n
    m2 = (np.where(mask, x - mean, 0.0) ** 2).sum(red, keepdims=True)
    invstd = 1 / np.sqrt(m2 / n + eps)
    shape = tuple(x.shape[a] for a in axes)
    return {
        "y": (x - mean) * invstd,
        "mean": mean.reshape(shape),
        "invstd": invstd.reshape(shape),
        "biased": (m2 / n).reshape(shape),
        "unbiased": (m2 / (n - 1)).reshape(shape),
    }


def _bounds(splits: list[int]) -> np.ndarray:
    return np.cumsum([0, *splits])


#: x (n, 3, 4); axis, and the per-channel shape for it
AXES = {1: (3,), -1: (4,), (1, 2): (3, 4)}
NORMALIZED = {1: (1,), -1: (2,), (1, 2): (1, 2)}


def _mask(rng: np.random.Generator, splits: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """70 % True, the first rank's shard all False, the last two samples all True."""
    mask = rng.uniform(size=shape) < 0.7
    mask[: splits[0]] = False
    mask[-2:] = True
    return mask


# --- comm= with a mask, several axes, the biased estimator: threads ------------------------


@pytest.mark.parametrize("splits", [[2, 5], [1, 0, 6], [3, 2, 4]], ids=str)
@pytest.mark.parametrize("axis", list(AXES), ids=str)
@pytest.mark.parametrize("var_estimator", ["unbiased", "biased"])
def test_threads_masked_equal_the_whole_batch(
    splits: list[int], axis: Any, var_estimator: str
) -> None:
    """Each rank's masked (count, mean, M2) merge exactly: y, mean, invstd, the running
    statistics, dx and the summed dweight/dbias equal one process on the whole batch and
    the float64 formula; the first rank counts nothing (its padding is NaN, its dy 0:
    its dx is 0, nothing anywhere is NaN)."""
    rng = np.random.default_rng(len(splits) + sum(splits))
    n = sum(splits)
    x = 50.0 + rng.normal(size=(n, 3, 4)) * rng.uniform(0.5, 2, (1, 3, 1))
    mask = _mask(rng, splits, x.shape)
    x = np.where(mask, x, np.nan)  # padding: never reaches the statistics
    dy = np.where(mask, rng.normal(size=x.shape), 0.0)
    shape = AXES[axis]
    w, b = rng.uniform(0.5, 2, shape), rng.normal(size=shape)
    rm, rv = rng.normal(size=shape), rng.uniform(0.5, 2, shape)
    bounds = _bounds(splits)
    opts = {"axis": axis, "eps": EPS, "momentum": 0.3}

    def rank_fn(comm: Communicator) -> Any:
        s = slice(bounds[comm.rank], bounds[comm.rank + 1])
        out = anybn.batch_norm(x[s], rm, rv, w, b, training=True, mask=mask[s], comm=comm,
                               var_estimator=var_estimator, **opts)  # fmt: skip
        g = anybn.batch_norm_backward(dy[s], x[s], w, out.mean, out.invstd, axis=axis,
                                      mask=mask[s], comm=comm)  # fmt: skip
        return out, g

    got = _values(ThreadGroup(len(splits)).run(rank_fn))
    ref = anybn.batch_norm(x, rm, rv, w, b, training=True, mask=mask,
                           var_estimator=var_estimator, **opts)  # fmt: skip
    gref = anybn.batch_norm_backward(dy, x, w, ref.mean, ref.invstd, axis=axis, mask=mask)
    plain = _reference(x, mask, NORMALIZED[axis])
    close = {"rtol": 1e-11, "atol": 1e-11}
    y = np.concatenate([o.y for o, _ in got])
    np.testing.assert_allclose(y, ref.y, **close)  # (NaN at the padding in both)
    bshape = tuple(s if i in NORMALIZED[axis] else 1 for i, s in enumerate(x.shape))
    want_y = plain["y"] * w.reshape(bshape) + b.reshape(bshape)
    np.testing.assert_allclose(y[mask], want_y[mask], **close)
    np.testing.assert_allclose(np.concatenate([g.dx for _, g in got]), gref.dx, **close)
    np.testing.assert_allclose(sum(g.dweight for _, g in got), gref.dweight, **close)
    np.testing.assert_allclose(sum(g.dbias for _, g in got), gref.dbias, **close)
    if splits[0]:  # the rank that counts nothing: its dy is 0, so is its dx
        assert not got[0][1].dx.any()
    for out, g in got:
        for a in (out.mean, out.invstd, out.new_running_mean, out.new_running_var, g.dx):
            assert np.isfinite(a).all()
        np.testing.assert_allclose(out.mean, plain["mean"], **close)
        np.testing.assert_allclose(out.invstd, plain["invstd"], **close)
        np.testing.assert_allclose(out.new_running_mean, 0.7 * rm + 0.3 * plain["mean"], **close)
        np.testing.assert_allclose(out.new_running_var, 0.7 * rv + 0.3 * plain[var_estimator],
                                   **close)  # fmt: skip
        np.testing.assert_array_equal(out.mean, got[0][0].mean)  # bit for bit on every rank


def test_threads_masked_on_every_backend(backend: Any) -> None:
    """Masked, two channel axes, biased, synchronized over 2 ranks (one counting nothing) on
    every backend: the NumPy one-process result, forward and backward."""
    if backend.id == "jax:jit":
        pytest.skip("comm= needs concrete JAX arrays (its collectives run outside jax.jit)")
    rng = np.random.default_rng(18)
    x = rng.normal(size=(6, 3, 4)) + 5
    mask = np.broadcast_to((rng.uniform(size=(6, 1, 4)) < 0.7), x.shape).copy()
    mask[:3], mask[-2:] = False, True
    dy = rng.normal(size=x.shape)
    rm, rv = np.zeros((3, 4)), np.ones((3, 4))
    opts: dict[str, Any] = {"axis": (1, 2), "var_estimator": "biased", "eps": EPS}
    ref = anybn.batch_norm(x, rm, rv, training=True, mask=mask, **opts)
    gref = anybn.batch_norm_backward(dy, x, None, ref.mean, ref.invstd, mask=mask, axis=(1, 2))
    arrays = {k: backend.asarray(v) for k, v in (("x", x), ("dy", dy), ("rm", rm), ("rv", rv))}
    masks = backend.asarray(mask)  # (boolean, on the backend's device)

    def rank_fn(comm: Communicator) -> Any:
        s = (slice(3 * comm.rank, 3 * comm.rank + 3), ...)
        out = anybn.batch_norm(arrays["x"][s], arrays["rm"], arrays["rv"], training=True,
                               mask=masks[s], comm=comm, **opts)  # fmt: skip
        g = anybn.batch_norm_backward(
            arrays["dy"][s], arrays["x"][s], None, out.mean, out.invstd, mask=masks[s],
            axis=(1, 2), comm=comm,
        )  # fmt: skip
        return [backend.to_numpy(a) for a in (out.y, out.new_running_var, g.dx, g.dweight)]

    got = _values(ThreadGroup(2).run(rank_fn))
    close = {"rtol": 1e-10, "atol": 1e-10}
    np.testing.assert_allclose(np.concatenate([g[0] for g in got]), ref.y, **close)
    np.testing.assert_allclose(np.concatenate([g[2] for g in got]), gref.dx, **close)
    np.testing.assert_allclose(sum(g[3] for g in got), gref.dweight, **close)
    for g in got:
        np.testing.assert_allclose(g[1], ref.new_running_var, **close)


def test_threads_bool_mask_broadcast_and_keras_shape() -> None:
    """A (N, 1, L) mask that broadcasts and an (N, L) mask (x's shape without the channel
    axis) are the same mask, synchronized too."""
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 3, 4))
    keras = rng.uniform(size=(6, 4)) < 0.6
    keras[:3] = False

    def rank_fn(comm: Communicator) -> Any:
        s = slice(3 * comm.rank, 3 * comm.rank + 3)
        out = []
        for m in (keras[s], keras[s][:, None, :]):
            a = anybn.batch_norm(x[s], training=True, mask=m, comm=comm)
            g = anybn.batch_norm_backward(x[s], x[s], None, a.mean, a.invstd, mask=m, comm=comm)
            out.append((a.mean, g.dx))
        return out

    got = _values(ThreadGroup(2).run(rank_fn))
    full = np.broadcast_to(keras[:, None], x.shape)
    ref = anybn.batch_norm(x, training=True, mask=full)
    gref = anybn.batch_norm_backward(x, x, None, ref.mean, ref.invstd, mask=full)
    for (mean_a, dx_a), (mean_b, dx_b) in got:
        np.testing.assert_array_equal(mean_a, mean_b)
        np.testing.assert_array_equal(dx_a, dx_b)
        np.testing.assert_allclose(mean_a, ref.mean, rtol=1e-12, atol=1e-12)
    dx = np.concatenate([pair[0][1] for pair in got])
    np.testing.assert_allclose(dx, gref.dx, rtol=1e-12, atol=1e-12)


def test_threads_float16_masked_statistics_in_float32() -> None:
    """float16 x: the masked statistics travel and merge in float32 and equal one
    process's float32 statistics of the same values; y within float16's rounding."""
    rng = np.random.default_rng(8)
    x = (3.0 + rng.normal(size=(8, 3, 5))).astype(np.float16)
    mask = rng.uniform(size=x.shape) < 0.6
    mask[:4] = False

    def rank_fn(comm: Communicator) -> Any:
        s = slice(4 * comm.rank, 4 * comm.rank + 4)
        return anybn.batch_norm(x[s], np.zeros(3, np.float32), np.ones(3, np.float32),
                                training=True, mask=mask[s], comm=comm)  # fmt: skip

    got = _values(ThreadGroup(2).run(rank_fn))
    ref = anybn.batch_norm(x, np.zeros(3, np.float32), np.ones(3, np.float32), training=True,
                           mask=mask)  # fmt: skip
    for out in got:
        assert out.mean.dtype == np.float32 and out.y.dtype == np.float16
        for field in ("mean", "invstd", "new_running_mean", "new_running_var"):
            np.testing.assert_allclose(getattr(out, field), getattr(ref, field), rtol=2e-6)
    y = np.concatenate([o.y for o in got]).astype(np.float64)
    np.testing.assert_allclose(y, ref.y.astype(np.float64), rtol=2e-3, atol=2e-3)


def test_threads_one_counted_value_per_rank_is_enough() -> None:
    """A mask that selects a single value per channel on each of two ranks: two in all,
    which trains (the unbiased correction with n = 2); one in all raises on every rank."""
    x = np.arange(24.0).reshape(4, 3, 2)
    one = np.zeros(x.shape, bool)
    one[[0, 2], :, 0] = True  # one value per channel in each shard of 2 samples
    rm, rv = np.zeros(3), np.ones(3)

    def rank_fn(comm: Communicator) -> Any:
        s = slice(2 * comm.rank, 2 * comm.rank + 2)
        return anybn.batch_norm(x[s], rm, rv, training=True, mask=one[s], comm=comm,
                                momentum=1.0)  # fmt: skip

    got = _values(ThreadGroup(2).run(rank_fn))
    values = x[[0, 2], :, 0]  # the two counted values per channel
    for out in got:
        np.testing.assert_allclose(out.mean, values.mean(0))
        np.testing.assert_allclose(out.new_running_var, values.var(0, ddof=1))

    single = one.copy()
    single[2:] = False  # the second rank counts nothing: one value in all

    def rank_fn_single(comm: Communicator) -> Any:
        s = slice(2 * comm.rank, 2 * comm.rank + 2)
        bn = anybn.BatchNorm(3, comm=comm)
        with pytest.raises(ValueError, match="more than 1 counted value per channel"):
            bn(x[s], mask=single[s])
        return bn.running_mean, bn.running_var, bn.num_batches_tracked

    for mean, var, tracked in _values(ThreadGroup(2).run(rank_fn_single)):
        np.testing.assert_array_equal(mean, np.zeros(3))
        np.testing.assert_array_equal(var, np.ones(3))
        assert tracked == 0


def test_threads_bad_mask_on_one_rank_fails_every_rank_and_leaves_state() -> None:
    """A mask of a wrong shape, or not boolean, on one rank: that rank raises its own
    error naming mask, every other one a RuntimeError; no layer's state changes."""
    rng = np.random.default_rng(9)
    x = rng.normal(size=(4, 3, 5))
    for bad, kind, match in [
        (np.ones((4, 5, 3), bool), ValueError, r"mask of shape \(4, 5, 3\) fits neither"),
        (np.ones((4, 5)), TypeError, "mask must be a boolean array"),
    ]:

        def rank_fn(comm: Communicator, bad: Any = bad) -> Any:
            bn = anybn.BatchNorm(3, comm=comm)
            last = comm.rank == comm.size - 1
            raised: Exception | None = None
            try:
                bn(x, mask=bad if last else np.ones((4, 5), bool))
            except Exception as exc:  # (checked below)
                raised = exc
            return raised, bn.running_mean, bn.running_var, bn.num_batches_tracked

        got = _values(ThreadGroup(2).run(rank_fn))
        assert isinstance(got[1][0], kind), got[1][0]
        assert re.search(match, str(got[1][0])), got[1][0]
        assert isinstance(got[0][0], RuntimeError), got[0][0]
        assert "rejected their arguments" in str(got[0][0])
        for _, mean, var, tracked in got:
            np.testing.assert_array_equal(mean, np.zeros(3))
            np.testing.assert_array_equal(var, np.ones(3))
            assert tracked == 0


def test_threads_masked_dx_by_finite_differences() -> None:
    """The synchronized masked dx (two channel axes, a rank that counts nothing) is the
    gradient of the loss sum(y * g) over the whole batch: central differences."""
    rng = np.random.default_rng(10)
    splits = [2, 3]
    x = rng.normal(size=(5, 2, 3))
    mask = _mask(rng, splits, x.shape)
    g = rng.normal(size=x.shape)
    bounds = _bounds(splits)

    def synced(xs: np.ndarray, backward: bool) -> Any:
        def rank_fn(comm: Communicator) -> Any:
            s = slice(bounds[comm.rank], bounds[comm.rank + 1])
            out = anybn.batch_norm(xs[s], training=True, axis=(1, 2), mask=mask[s], comm=comm,
                                   eps=EPS)  # fmt: skip
            if not backward:
                return out.y
            return anybn.batch_norm_backward(g[s], xs[s], None, out.mean, out.invstd,
                                             axis=(1, 2), mask=mask[s], comm=comm).dx  # fmt: skip

        return np.concatenate(_values(ThreadGroup(2).run(rank_fn)))

    dx = synced(x, True)
    h = 1e-6
    numeric = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        up, down = x.copy(), x.copy()
        up[i] += h
        down[i] -= h
        numeric[i] = ((synced(up, False) - synced(down, False)) * g).sum() / (2 * h)
    np.testing.assert_allclose(dx, numeric, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("axis", [1, (1, 2)], ids=str)
def test_threads_torch_autograd_masked_equals_plain_formula(axis: Any) -> None:
    """comm= and mask= on tensors that require grad: the gradients of a loss on y, mean and
    invstd (dweight, dbias summed over ranks) equal torch autograd through the plain
    masked formula on the whole batch; the biased estimator's running variance too."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    splits = [3, 0, 4]
    x = 2.0 + rng.normal(size=(7, 3, 4))
    mask = _mask(rng, [1, 2, 4], x.shape)  # the first sample counts nothing
    shape = AXES[axis]
    dy = rng.normal(size=x.shape)
    g_mean = rng.normal(size=(3, *shape))
    w, b = rng.uniform(0.5, 2, shape), rng.normal(size=shape)
    bounds = _bounds(splits)

    def rank_fn(comm: Communicator) -> Any:
        r = comm.rank
        s = slice(bounds[r], bounds[r + 1])
        xt = torch.from_numpy(x[s]).requires_grad_()
        wt, bt = (torch.from_numpy(a).requires_grad_() for a in (w, b))
        rm, rv = torch.zeros(shape, dtype=torch.float64), torch.ones(shape, dtype=torch.float64)
        out = anybn.batch_norm(xt, rm, rv, wt, bt, training=True, eps=EPS, axis=axis,
                               mask=torch.from_numpy(mask[s]), comm=comm,
                               var_estimator="biased", momentum=1.0)  # fmt: skip
        loss = (out.y * torch.from_numpy(dy[s])).sum() + (
            out.mean * torch.from_numpy(g_mean[r])
        ).sum()
        grads = torch.autograd.grad(loss, (xt, wt, bt))
        return [t.numpy() for t in grads], out.new_running_var.numpy()

    got = _values(ThreadGroup(3).run(rank_fn))
    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = (torch.from_numpy(a).requires_grad_() for a in (w, b))
    m = torch.from_numpy(mask)
    red = (0, 2) if axis == 1 else (0,)
    n = m.sum(red, keepdim=True)
    mean = torch.where(m, xt, 0.0).sum(red, keepdim=True) / n
    var = (torch.where(m, xt - mean, 0.0) ** 2).sum(red, keepdim=True) / n
    bshape = (1, 3, 1) if axis == 1 else (1, 3, 4)
    y = (xt - mean) / torch.sqrt(var + EPS) * wt.view(bshape) + bt.view(bshape)
    loss = (y * torch.from_numpy(dy)).sum() + (
        mean.reshape(shape) * torch.from_numpy(g_mean.sum(0))
    ).sum()
    dx, dw, db = (t.numpy() for t in torch.autograd.grad(loss, (xt, wt, bt)))
    close = {"rtol": 1e-10, "atol": 1e-10}
    np.testing.assert_allclose(np.concatenate([g[0][0] for g in got]), dx, **close)
    np.testing.assert_allclose(sum(g[0][1] for g in got), dw, **close)
    np.testing.assert_allclose(sum(g[0][2] for g in got), db, **close)
    for _, running_var in got:
        np.testing.assert_allclose(running_var, var.detach().numpy().reshape(shape), **close)


def test_threads_layer_masked_two_steps() -> None:
    """anybn.BatchNorm(comm=) with masks, two channel axes and the biased estimator, two
    steps with momentum=None (the cumulative average): the one-process layer's state."""
    rng = np.random.default_rng(12)
    x = rng.normal(size=(6, 3, 4))
    mask = _mask(rng, [2, 4], x.shape)
    kwargs: dict[str, Any] = {"axis": (1, 2), "momentum": None, "var_estimator": "biased"}

    def rank_fn(comm: Communicator) -> Any:
        s = slice(0, 2) if comm.rank == 0 else slice(2, 6)
        bn = anybn.BatchNorm((3, 4), comm=comm, **kwargs)
        for step in range(2):
            bn(x[s] * (step + 1), mask=mask[s])
        return bn.running_mean, bn.running_var, bn.num_batches_tracked

    ref = anybn.BatchNorm((3, 4), **kwargs)
    for step in range(2):
        ref(x * (step + 1), mask=mask)
    for mean, var, tracked in _values(ThreadGroup(2).run(rank_fn)):
        np.testing.assert_allclose(mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(var, ref.running_var, rtol=1e-12, atol=1e-12)
        assert tracked == 2


# --- Keras' mask shape -------------------------------------------------------------------


def test_keras_mask_shape_is_x_without_the_channel_axes() -> None:
    """(batch, time) for (batch, time, features) with axis=-1; (N, H, W) for (N, C, H, W);
    (N,) for (N, C1, C2) with axis=(1, 2): the channel axes inserted back."""
    rng = np.random.default_rng(13)
    for shape, axis, mshape, full in [
        ((6, 5, 4), -1, (6, 5), (6, 5, 1)),
        ((4, 3, 2, 5), 1, (4, 2, 5), (4, 1, 2, 5)),
        ((6, 3, 4), (1, 2), (6,), (6, 1, 1)),
    ]:
        x = rng.normal(size=shape)
        mask = rng.uniform(size=mshape) < 0.7
        got = anybn.batch_norm(x, training=True, axis=axis, mask=mask)
        want = anybn.batch_norm(x, training=True, axis=axis, mask=mask.reshape(full))
        np.testing.assert_array_equal(got.y, want.y)
        np.testing.assert_array_equal(got.mean, want.mean)
        g = anybn.batch_norm_backward(x, x, None, got.mean, got.invstd, axis=axis, mask=mask)
        gw = anybn.batch_norm_backward(x, x, None, got.mean, got.invstd, axis=axis,
                                       mask=mask.reshape(full))  # fmt: skip
        np.testing.assert_array_equal(g.dx, gw.dx)


def test_mask_of_another_shape_names_the_shapes_it_accepts() -> None:
    x = np.ones((6, 5, 4))
    with pytest.raises(ValueError, match=r"mask of shape \(5, 6\) fits neither x's shape "
                       r"\(6, 5, 4\), x's shape without the channel axes \(6, 5\)"):  # fmt: skip
        anybn.batch_norm(x, training=True, axis=-1, mask=np.ones((5, 6), bool))
    bn = anybn.BatchNorm(4, axis=-1)
    bn(x * np.arange(4.0))
    before = (bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked)
    with pytest.raises(ValueError, match="mask of shape"):
        bn(x, mask=np.ones((6, 4), bool))
    np.testing.assert_array_equal(bn.running_mean, before[0])
    np.testing.assert_array_equal(bn.running_var, before[1])
    assert bn.num_batches_tracked == before[2] == 1


def _keras() -> Any:
    os.environ.setdefault("KERAS_BACKEND", "jax")
    try:
        import keras
    except ImportError as exc:  # keras missing, or its backend
        pytest.skip(f"Keras not importable ({exc}); pip install keras (KERAS_BACKEND=jax)")
    return keras


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
@pytest.mark.parametrize("synchronized", [False, True], ids=["local", "comm-3-ranks"])
def test_against_keras_masked_step_by_step(synchronized: bool) -> None:
    """keras.layers.BatchNormalization(x, mask=m) with m of shape (batch, time): anybn's
    layer (from_keras) with the same mask, local or over 3 ranks (one of them all
    padding), gives Keras' y and moving statistics after each of 3 training steps."""
    keras = _keras()
    from anybn import convert

    rng = np.random.default_rng(14)
    c = 4
    layer = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-3, dtype="float32")
    layer.build((None, 5, c))
    layer.set_weights([
        rng.uniform(0.5, 2, c), rng.normal(size=c), rng.normal(size=c), rng.uniform(1, 2, c)
    ])  # fmt: skip
    splits = [2, 3, 4]
    bounds = _bounds(splits)
    weights = layer.get_weights()
    local = convert.from_keras(weights, momentum=0.9, epsilon=1e-3)
    ranks = [convert.from_keras(weights, momentum=0.9, epsilon=1e-3) for _ in splits]
    tol = 2e-5
    for step in range(3):
        x = (rng.normal(3.0, 2.0, size=(9, 5, c)) * (step + 1)).astype("float32")
        mask = rng.random((9, 5)) < 0.6
        mask[:2] = False  # the first rank: padding only
        y_k = np.asarray(layer(x, training=True, mask=mask))
        if synchronized:

            def rank_fn(comm: Communicator, x: Any = x, mask: Any = mask) -> Any:
                bn = ranks[comm.rank]
                bn.comm = comm
                s = slice(bounds[comm.rank], bounds[comm.rank + 1])
                try:
                    return bn(x[s], mask=mask[s])
                finally:
                    bn.comm = None

            y_a = np.concatenate(_values(ThreadGroup(3).run(rank_fn)))
            states = [convert.to_keras(bn) for bn in ranks]
        else:
            y_a = local(x, mask=mask)
            states = [convert.to_keras(local)]
        np.testing.assert_allclose(y_a, y_k, rtol=tol, atol=tol, err_msg=f"y, step {step}")
        for state in states:
            for got, want in zip(state, layer.get_weights(), strict=True):
                np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=f"{step}")


@pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")
def test_keras_refuses_what_anybn_refuses() -> None:
    """A mask of x.ndim - 1 dimensions that is not x's shape without the channel axis: a
    ValueError in Keras (at its broadcast) and in anybn (naming the shapes it takes)."""
    keras = _keras()
    layer = keras.layers.BatchNormalization()
    x = np.ones((6, 5, 4), np.float32)
    bad = np.ones((5, 6), bool)
    with pytest.raises(ValueError):
        layer(x, training=True, mask=bad)
    with pytest.raises(ValueError, match="mask of shape"):
        anybn.batch_norm(x, training=True, axis=-1, mask=bad)


# --- mask= on the anybn.torch modules ------------------------------------------------------


def _torch() -> Any:
    return pytest.importorskip("torch")


@pytest.mark.parametrize(
    ("cls", "shape", "mshape"),
    [
        ("BatchNorm1d", (8, 3), (8,)),
        ("BatchNorm1d", (6, 3, 5), (6, 5)),
        ("BatchNorm2d", (4, 3, 2, 5), (4, 3, 2, 5)),
        ("BatchNorm3d", (3, 3, 2, 2, 3), (3, 1, 2, 2, 3)),
        ("SyncBatchNorm", (6, 3, 5), (6, 5)),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_torch_modules_mask(cls: str, shape: tuple[int, ...], mshape: tuple[int, ...],
                            momentum: float | None) -> None:  # fmt: skip
    """mask= on the drop-ins: y, the running statistics (PyTorch's unbiased correction
    with the masked count, its momentum rule) and num_batches_tracked against the float64
    formula; gradients against torch autograd through it; a call without a mask after
    (the kept call) is the module's unmasked forward."""
    torch = _torch()
    import anybn.torch as abt

    rng = np.random.default_rng(15)
    x = rng.normal(size=shape) * 2 + 1
    mask = rng.uniform(size=mshape) < 0.7
    full = np.broadcast_to(
        mask.reshape((*mshape[:1], 1, *mshape[1:])) if len(mshape) == len(shape) - 1 else mask,
        shape,
    )
    m = getattr(abt, cls)(3, momentum=momentum).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 3)))
        m.bias.copy_(torch.from_numpy(rng.normal(size=3)))
    m(torch.from_numpy(x))  # an unmasked step first: the kept call exists
    state = {k: v.clone() for k, v in m.state_dict().items()}
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt, mask=torch.from_numpy(mask))
    dy = torch.from_numpy(rng.normal(size=shape))
    y.backward(dy)
    # the float64 formula, and torch autograd through it
    xr = torch.from_numpy(x).requires_grad_()
    fm = torch.from_numpy(np.array(full))
    red = tuple(i for i in range(len(shape)) if i != 1)
    n = fm.sum(red, keepdim=True)
    mean = torch.where(fm, xr, 0.0).sum(red, keepdim=True) / n
    var = (torch.where(fm, xr - mean, 0.0) ** 2).sum(red, keepdim=True) / n
    bshape = (1, 3) + (1,) * (len(shape) - 2)
    w, b = state["weight"].view(bshape), state["bias"].view(bshape)
    yr = (xr - mean) / torch.sqrt(var + m.eps) * w + b
    yr.backward(dy)
    close = {"rtol": 1e-11, "atol": 1e-11}
    np.testing.assert_allclose(y.detach().numpy(), yr.detach().numpy(), **close)
    np.testing.assert_allclose(xt.grad.numpy(), xr.grad.numpy(), **close)
    factor = 0.5 if momentum is None else momentum  # second tracked batch: 1/2
    unbiased = (var * n / (n - 1)).reshape(3)
    np.testing.assert_allclose(m.running_mean, (1 - factor) * state["running_mean"]
                               + factor * mean.detach().reshape(3), **close)  # fmt: skip
    np.testing.assert_allclose(m.running_var, (1 - factor) * state["running_var"]
                               + factor * unbiased.detach(), **close)  # fmt: skip
    assert int(m.num_batches_tracked) == 2
    # unmasked again: the same as a fresh copy of the module that never kept a call
    fresh = getattr(abt, cls)(3, momentum=momentum).double()
    fresh.load_state_dict(m.state_dict())
    x2 = torch.from_numpy(rng.normal(size=shape))
    torch.testing.assert_close(m(x2), fresh(x2), rtol=0, atol=0)
    # eval: the mask plays no part
    m.eval()
    torch.testing.assert_close(m(x2, mask=torch.from_numpy(mask)), m(x2), rtol=0, atol=0)


def test_torch_module_mask_gradcheck() -> None:
    """The drop-in's masked forward by finite differences (x, weight, bias)."""
    torch = _torch()
    import anybn.torch as abt

    rng = np.random.default_rng(16)
    m = abt.BatchNorm1d(2).double()
    mask = torch.from_numpy(rng.uniform(size=(5, 3)) < 0.7)
    mask[:2] = True
    x = torch.from_numpy(rng.normal(size=(5, 2, 3))).requires_grad_()
    w = torch.from_numpy(rng.uniform(0.5, 2, 2)).requires_grad_()
    b = torch.from_numpy(rng.normal(size=2)).requires_grad_()

    def f(x: Any, w: Any, b: Any) -> Any:
        params = {"weight": w, "bias": b}
        return torch.func.functional_call(m, params, (x,), {"mask": mask})

    assert torch.autograd.gradcheck(f, (x, w, b))


@pytest.mark.parametrize(
    ("mask", "error", "match"),
    [
        (lambda t: t.ones(5, 4, dtype=t.bool), ValueError, r"mask of shape \(5, 4\) fits"),
        (lambda t: t.ones(5, 3), TypeError, "mask must be a boolean array"),
        (lambda t: t.ones(5, 3, dtype=t.int64), TypeError, "mask must be a boolean array"),
        (lambda t: np.ones((5, 3), bool), TypeError, "same library"),
    ],
    ids=["shape", "float", "int", "numpy"],
)
@pytest.mark.parametrize("cls", ["BatchNorm1d", "SyncBatchNorm"])
def test_torch_module_bad_mask_leaves_state(mask: Any, error: type, match: str, cls: str) -> None:
    """A bad mask: a clear error naming mask, the buffers and counter unchanged."""
    torch = _torch()
    import anybn.torch as abt

    m = getattr(abt, cls)(2).double()
    m(torch.randn(5, 2, 3, dtype=torch.float64))
    state = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(error, match=match):
        m(torch.randn(5, 2, 3, dtype=torch.float64), mask=mask(torch))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=0, atol=0)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_torch_module_mask_half(half: str) -> None:
    """Half-precision input, float32 parameters (autocast's layout): the masked statistics
    in float32 equal the formula on the half-precision values; y and dx in x's dtype."""
    torch = _torch()
    import anybn.torch as abt

    rng = np.random.default_rng(17)
    dtype = getattr(torch, half)
    x = torch.from_numpy(rng.normal(size=(6, 3, 5))).to(dtype).requires_grad_()
    mask = torch.from_numpy(rng.uniform(size=(6, 5)) < 0.7)
    m = abt.BatchNorm1d(3)
    y = m(x, mask=mask)
    y.float().sum().backward()
    assert y.dtype == dtype and x.grad.dtype == dtype
    assert m.running_mean.dtype == torch.float32
    ref = _reference(x.detach().double().numpy(), np.broadcast_to(mask.numpy()[:, None], x.shape),
                     (1,), eps=m.eps)  # fmt: skip
    np.testing.assert_allclose(m.running_mean.numpy(), 0.1 * ref["mean"], rtol=1e-5, atol=1e-6)
    tol = 5e-3 if half == "float16" else 3e-2
    np.testing.assert_allclose(y.detach().double().numpy(), ref["y"], rtol=tol, atol=tol)


def test_torch_module_mask_keeps_channels_last() -> None:
    """A channels_last input gives a channels_last output with a mask too, and the same
    values and gradients as the contiguous input."""
    torch = _torch()
    import anybn.torch as abt

    rng = np.random.default_rng(19)
    x = torch.from_numpy(rng.normal(size=(4, 3, 5, 5)))
    mask = torch.from_numpy(rng.uniform(size=(4, 5, 5)) < 0.7)
    xl = x.to(memory_format=torch.channels_last).requires_grad_()
    xc = x.clone().requires_grad_()
    yl = abt.BatchNorm2d(3).double()(xl, mask=mask)
    yc = abt.BatchNorm2d(3).double()(xc, mask=mask)
    assert yl.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(yl, yc)
    dy = torch.from_numpy(rng.normal(size=x.shape))
    yl.backward(dy)
    yc.backward(dy)
    torch.testing.assert_close(xl.grad, xc.grad)


@pytest.mark.parametrize("axis", [-1, (1, 2)], ids=str)
def test_jax_grad_with_a_keras_mask_equals_plain_formula(axis: Any) -> None:
    """jax.grad (under jax.jit) of a loss on anybn's y with a mask of x's shape without the
    channel axes equals jax.grad of the plain masked formula."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(20)
    x = rng.normal(size=(6, 5, 4)).astype(np.float32)
    axes = NORMALIZED[axis] if axis != -1 else (2,)
    mshape = tuple(s for i, s in enumerate(x.shape) if i not in axes)
    mask = rng.uniform(size=mshape) < 0.7
    mask[:2] = True
    full = mask.reshape(tuple(1 if i in axes else s for i, s in enumerate(x.shape)))
    g = rng.normal(size=x.shape).astype(np.float32)
    red = tuple(i for i in range(3) if i not in axes)

    def loss(x: Any) -> Any:
        y = anybn.batch_norm(x, training=True, axis=axis, mask=jnp.asarray(mask), eps=EPS).y
        return (y * g).sum()

    def plain(x: Any) -> Any:
        m = jnp.broadcast_to(full, x.shape)
        n = m.sum(red, keepdims=True)
        mean = jnp.where(m, x, 0).sum(red, keepdims=True) / n
        var = (jnp.where(m, x - mean, 0) ** 2).sum(red, keepdims=True) / n
        return ((x - mean) / jnp.sqrt(var + EPS) * g).sum()

    got = jax.jit(jax.grad(loss))(jnp.asarray(x))
    want = jax.grad(plain)(jnp.asarray(x))
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-4, atol=2e-4)


# --- masks with batch renormalization and ghost batches ------------------------------------


@pytest.mark.parametrize("splits", [[3, 4], [0, 4, 5]], ids=str)
def test_threads_masked_renorm_equals_the_whole_batch(splits: list[int]) -> None:
    """renorm=True with a mask over ranks (one counting nothing): y, r, d and every
    moving statistic equal one process on the whole masked batch, on every rank."""
    rng = np.random.default_rng(sum(splits))
    n = sum(splits)
    x = 3.0 + rng.normal(size=(n, 3, 4)) * 2.0
    mask = _mask(rng, splits, x.shape)
    bounds = _bounds(splits)
    rm, rv = rng.normal(size=3), rng.uniform(0.5, 2, 3)
    state = {"renorm_mean": rng.normal(size=3), "renorm_std": rng.uniform(0.5, 2, 3)}
    opts: dict[str, Any] = {
        "renorm": True, "renorm_clipping": {"rmax": 1.5, "dmax": 0.5}, "momentum": 0.2,
        "running_std": np.sqrt(rv + EPS), "eps": EPS, **state,
    }  # fmt: skip

    def rank_fn(comm: Communicator) -> Any:
        s = slice(bounds[comm.rank], bounds[comm.rank + 1])
        return anybn.batch_norm(x[s], rm, rv, training=True, mask=mask[s], comm=comm, **opts)

    got = ThreadGroup(len(splits)).run(rank_fn)
    ref = anybn.batch_norm(x, rm, rv, training=True, mask=mask, **opts)
    close = {"rtol": 1e-11, "atol": 1e-11}
    y = np.concatenate([o[1].y for o in got])
    np.testing.assert_allclose(y[mask], ref.y[mask], **close)
    for _, out in got:
        for field in ("r", "d", "new_running_mean", "new_running_var", "new_running_std",
                      "new_renorm_mean", "new_renorm_std"):  # fmt: skip
            np.testing.assert_allclose(getattr(out, field), getattr(ref, field), **close)
    assert not np.allclose(ref.r, 1.0)  # the corrections are at work


def test_torch_module_renorm_and_ghost_take_the_mask() -> None:
    """The drop-ins' mask= with renorm=True and with virtual_batch_size: the functional
    core's masked call, the running statistics written back."""
    torch = _torch()
    import anybn.torch as abt

    rng = np.random.default_rng(5)
    x = torch.tensor(rng.normal(size=(8, 3, 5)) + 2.0)
    mask = torch.tensor(rng.uniform(size=(8, 5)) < 0.7)
    full = mask[:, None, :].expand(8, 3, 5)
    for options in ({"renorm": True}, {"virtual_batch_size": 4}):
        m = abt.BatchNorm1d(3, dtype=torch.float64, **options)
        y = m(x, mask=mask)
        want = anybn.batch_norm(
            x, torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64),
            m.weight.detach(), m.bias.detach(), training=True, mask=full, momentum=0.1,
            **{k: v for k, v in options.items() if k != "renorm"},
            **({"renorm": True, "renorm_mean": torch.zeros(3, dtype=torch.float64),
                "renorm_std": torch.ones(3, dtype=torch.float64),
                "running_std": torch.ones(3, dtype=torch.float64)}
               if options.get("renorm") else {}),
        )  # fmt: skip
        torch.testing.assert_close(y.detach(), want.y, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.running_mean, want.new_running_mean)
        torch.testing.assert_close(m.running_var, want.new_running_var)
