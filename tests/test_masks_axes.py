"""Masks, several channel axes and the biased running-variance estimator (issue 9).

The oracle is a float64 torch autograd implementation written from the
definitions (mean and biased variance over the counted values of each channel,
y at every position), independent of anybn's formulas; the backward is checked
against torch autograd through it. Shapes, channel axes and masks are drawn
with ``hypothesis.extra.numpy`` so that failures shrink.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from _helpers import assert_close, host, require
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import anybn

torch = pytest.importorskip("torch")

SETTINGS = settings(
    derandomize=True,
    max_examples=40,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
EPS = 1e-3
MOMENTUM = 0.3


def oracle(
    x: np.ndarray,
    dy: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    mask: np.ndarray | None,
    axes: tuple[int, ...],
    var_estimator: str = "unbiased",
) -> dict[str, np.ndarray]:
    """y, statistics, running update and gradients, in float64 torch from the definitions."""
    red = tuple(i for i in range(x.ndim) if i not in axes)
    bshape = tuple(x.shape[i] if i in axes else 1 for i in range(x.ndim))
    pshape = tuple(x.shape[i] for i in axes)
    tx = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    tw = torch.tensor(weight, dtype=torch.float64, requires_grad=True)
    tb = torch.tensor(bias, dtype=torch.float64, requires_grad=True)
    m = (
        torch.ones(x.shape, dtype=torch.float64)
        if mask is None
        else torch.tensor(np.broadcast_to(mask, x.shape).astype(np.float64))
    )
    n = m.sum(dim=red, keepdim=True)
    mean = (m * tx).sum(dim=red, keepdim=True) / n
    var = (m * (tx - mean) ** 2).sum(dim=red, keepdim=True) / n
    invstd = 1 / torch.sqrt(var + EPS)
    y = (tx - mean) * invstd * tw.reshape(bshape) + tb.reshape(bshape)
    y.backward(torch.tensor(dy, dtype=torch.float64))
    batch_var = var * n / (n - 1) if var_estimator == "unbiased" else var
    return {
        "y": y.detach().numpy(),
        "mean": mean.detach().reshape(pshape).numpy(),
        "invstd": invstd.detach().reshape(pshape).numpy(),
        "running_var": (1 - MOMENTUM) + MOMENTUM * batch_var.detach().reshape(pshape).numpy(),
        "dx": tx.grad.numpy(),
        "dweight": tw.grad.numpy(),
        "dbias": tb.grad.numpy(),
    }


@st.composite
def problems(draw: st.DrawFn) -> dict[str, Any]:
    """A shape, one or several channel axes, a mask leaving >= 2 values per channel."""
    shape = draw(hnp.array_shapes(min_dims=2, max_dims=4, min_side=1, max_side=4))
    ndim = len(shape)
    axes = draw(st.lists(st.integers(0, ndim - 1), min_size=1, max_size=ndim - 1, unique=True))
    axes_arg: int | tuple[int, ...] = (
        axes[0] - ndim if len(axes) == 1 and draw(st.booleans()) else tuple(axes)
    )
    axes_sorted = tuple(sorted(axes))
    count = int(np.prod([s for i, s in enumerate(shape) if i not in axes_sorted]))
    if count < 2:
        shape = tuple(s if i in axes_sorted else max(s, 2) for i, s in enumerate(shape))
    use_mask = draw(st.booleans())
    mask = None
    if use_mask:
        # A mask broadcastable to x: some of its dimensions are 1.
        mshape = tuple(s if draw(st.booleans()) else 1 for s in shape)
        mask = draw(hnp.arrays(np.bool_, mshape))
        full = np.broadcast_to(mask, shape)
        red = tuple(i for i in range(ndim) if i not in axes_sorted)
        if np.min(full.sum(axis=red), initial=2) < 2:
            mask = None  # too few values somewhere: the plain case
    seed = draw(st.integers(0, 2**32 - 1))
    return {
        "shape": shape,
        "axis": axes_arg,
        "axes": axes_sorted,
        "mask": mask,
        "seed": seed,
        "var_estimator": draw(st.sampled_from(["unbiased", "biased"])),
    }


@SETTINGS
@given(problems())
def test_masks_and_axes_match_the_oracle(problem: dict[str, Any]) -> None:
    rng = np.random.default_rng(problem["seed"])
    shape, axes, mask = problem["shape"], problem["axes"], problem["mask"]
    pshape = tuple(shape[i] for i in axes)
    x = rng.normal(3.0, 2.0, size=shape)
    dy = rng.normal(size=shape)
    weight, bias = rng.normal(size=pshape), rng.normal(size=pshape)
    want = oracle(x, dy, weight, bias, mask, axes, problem["var_estimator"])
    out = anybn.batch_norm(
        x, np.zeros(pshape), np.ones(pshape), weight, bias,
        training=True, momentum=MOMENTUM, eps=EPS, axis=problem["axis"], mask=mask,
        var_estimator=problem["var_estimator"],
    )  # fmt: skip
    assert out.mean.shape == pshape and out.new_running_var.shape == pshape
    assert_close(out.y, want["y"], name="y")
    assert_close(out.mean, want["mean"], name="mean")
    assert_close(out.invstd, want["invstd"], name="invstd")
    assert_close(out.new_running_var, want["running_var"], name="running_var")
    grads = anybn.batch_norm_backward(
        dy, x, weight, out.mean, out.invstd, axis=problem["axis"], mask=mask
    )
    for name, got in zip(("dx", "dweight", "dbias"), grads, strict=True):
        assert_close(got, want[name], name=name)


def test_mask_on_every_backend(backend: Any, rng: np.random.Generator) -> None:
    """The matrix: a padding mask of shape (N, 1, L) on (N, C, L) input."""
    x = rng.normal(5.0, 2.0, size=(4, 3, 6))
    dy = rng.normal(size=x.shape)
    lengths = np.array([6, 3, 2, 5])
    mask = np.arange(6)[None, None, :] < lengths[:, None, None]
    weight, bias = rng.normal(size=3), rng.normal(size=3)
    want = oracle(x, dy, weight, bias, mask, (1,))
    a = {k: backend.asarray(v) for k, v in {"x": x, "dy": dy, "w": weight, "b": bias}.items()}
    m = backend.asarray(mask)
    out = anybn.batch_norm(a["x"], None, None, a["w"], a["b"], training=True, eps=EPS, mask=m)
    assert_close(out.y, want["y"], name="y")
    grads = anybn.batch_norm_backward(a["dy"], a["x"], a["w"], out.mean, out.invstd, mask=m)
    assert_close(grads.dx, want["dx"], name="dx")
    assert_close(grads.dweight, want["dweight"], name="dweight")


def test_tuple_axis_on_every_backend(backend: Any, rng: np.random.Generator) -> None:
    """Keras' ``axis=[1, 2]`` / Chainer's ``param_shape=(3, 4)``: per-channel arrays (3, 4)."""
    x = rng.normal(size=(5, 3, 4, 2))
    dy = rng.normal(size=x.shape)
    weight, bias = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
    want = oracle(x, dy, weight, bias, None, (1, 2))
    a = [backend.asarray(v) for v in (x, dy, weight, bias)]
    out = anybn.batch_norm(a[0], None, None, a[2], a[3], training=True, eps=EPS, axis=(2, -3))
    assert tuple(out.mean.shape) == (3, 4)
    assert_close(out.y, want["y"], name="y")
    grads = anybn.batch_norm_backward(a[1], a[0], a[2], out.mean, out.invstd, axis=(1, 2))
    assert_close(grads.dx, want["dx"], name="dx")
    assert_close(grads.dbias, want["dbias"], name="dbias")


def test_mask_with_one_counted_value_raises(rng: np.random.Generator) -> None:
    x = rng.normal(size=(4, 2, 3))
    mask = np.zeros((4, 1, 3), dtype=bool)
    mask[0, 0, 0] = True
    with pytest.raises(ValueError, match="more than 1 counted value per channel"):
        anybn.batch_norm(x, training=True, mask=mask)
    # eval ignores the mask for the statistics
    out = anybn.batch_norm(x, np.zeros(2), np.ones(2), mask=mask)
    assert_close(out.y, x / np.sqrt(1 + 1e-5))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"mask": np.ones((4, 2, 3))}, TypeError, "mask must be a boolean array"),
        ({"mask": np.ones((3, 2, 1), dtype=bool)}, ValueError, r"mask of shape \(3, 2, 1\) fits"),
        ({"axis": ()}, ValueError, "at least one channel axis"),
        ({"axis": (1, -2)}, ValueError, "names an axis twice"),
        ({"axis": (0, 1, 2)}, ValueError, "nothing is left to reduce"),
        ({"axis": (1, 3)}, ValueError, "out of range"),
        ({"var_estimator": "sample"}, ValueError, "var_estimator must be"),
        ({"mask": np.ones((4, 2), bool), "comm": "torch"}, ValueError, r"mask of shape \(4, 2\)"),
    ],
)
def test_bad_options(kwargs: dict[str, Any], error: type, match: str) -> None:
    x = np.ones((4, 2, 3))
    with pytest.raises(error, match=match):
        anybn.batch_norm(x, training=True, **kwargs)


def test_tuple_axis_vector_shape_is_checked() -> None:
    x = np.ones((4, 2, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(2, 3\)"):
        anybn.batch_norm(x, None, None, np.ones(2), training=True, axis=(1, 2))


def test_biased_estimator_is_keras_flax_update(rng: np.random.Generator) -> None:
    """var_estimator='biased' stores the batch variance itself, as Keras and Flax do."""
    x = rng.normal(size=(6, 3))
    out = anybn.batch_norm(
        x, np.zeros(3), np.ones(3), training=True, momentum=0.01, var_estimator="biased"
    )
    np.testing.assert_allclose(out.new_running_var, 0.99 + 0.01 * x.var(axis=0), rtol=1e-12)


def test_masked_numpy_arrays_are_refused() -> None:
    """NumPy masked arrays stay refused (TypeError), with mask= named as the way."""
    x = np.ma.masked_array(np.ones((4, 2)), mask=np.zeros((4, 2), bool))
    with pytest.raises(TypeError, match="masked array"):
        anybn.batch_norm(x, training=True)


def test_host_helper_is_shared() -> None:
    """One host conversion: the tests' ``host`` is anybn's ``to_host``."""
    a = np.arange(3.0)
    assert np.array_equal(host(a), a)


def test_layer_mask_tuple_axis_and_estimator(rng: np.random.Generator) -> None:
    """BatchNorm(axis=(1, 2), var_estimator='biased')(x, mask=...) is the functional call."""
    import pickle

    x = rng.normal(size=(6, 3, 4))
    dy = rng.normal(size=x.shape)
    mask = rng.random((6, 1, 1)) < 0.6
    mask[:2] = True
    bn = anybn.BatchNorm(axis=(1, 2), var_estimator="biased", momentum=MOMENTUM, eps=EPS)
    y = bn(x, mask=mask)
    want = oracle(x, dy, np.ones((3, 4)), np.zeros((3, 4)), mask, (1, 2), "biased")
    assert bn.num_features == (3, 4)
    assert_close(y, want["y"], name="y")
    assert_close(bn.running_var, want["running_var"], name="running_var")
    assert_close(bn.backward(dy).dx, want["dx"], name="dx")
    copy = pickle.loads(pickle.dumps(bn))
    assert copy.var_estimator == "biased" and copy.axis == (1, 2)
    fresh = anybn.BatchNorm(axis=(1, 2))
    fresh.load_state_dict(bn.state_dict())
    assert fresh.num_features == (3, 4)
    with pytest.raises(ValueError, match=r"shape \(3, 4\)"):
        fresh.load_state_dict({**bn.state_dict(), "bias": np.zeros((4, 3))})
    assert "var_estimator='biased'" in repr(bn)


# --- NaN and inf at masked-out positions (padding) -----------------------------------------

POISONS = pytest.mark.parametrize("poison", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])


def _padded(rng: np.random.Generator, poison: float) -> dict[str, np.ndarray]:
    """(N, C, L) data whose masked-out values are ``poison``; dy is 0 there (a masked loss)."""
    shape = (4, 3, 6)
    mask = rng.random(shape) < 0.6
    mask[:2, :, :2] = True  # at least 4 counted values per channel
    x = np.where(mask, rng.normal(5.0, 2.0, size=shape), poison)
    dy = np.where(mask, rng.normal(size=shape), 0.0)
    return {
        "x": x, "dy": dy, "mask": mask,
        "weight": rng.normal(size=3), "bias": rng.normal(size=3),
        "running_mean": rng.normal(size=3), "running_var": rng.uniform(0.5, 2.0, 3),
    }  # fmt: skip


def counted_reference(
    d: dict[str, np.ndarray], var_estimator: str = "unbiased"
) -> dict[str, np.ndarray]:
    """Forward and backward in float64 NumPy on each channel's counted values only.

    ``y`` is NaN where the mask is False (not compared); ``dx`` there is the direct
    path ``weight * invstd * dy`` (the statistics do not depend on that x).
    """
    x, dy, mask, w, b = d["x"], d["dy"], d["mask"], d["weight"], d["bias"]
    channels = x.shape[1]
    out = {k: np.empty(channels) for k in ("mean", "invstd", "rm", "rv", "dweight", "dbias")}
    out["y"], out["dx"] = np.full(x.shape, np.nan), np.empty(x.shape)
    for c in range(channels):
        m = mask[:, c]
        v, g = x[:, c][m], dy[:, c][m]
        n = v.size
        mean = v.mean()
        var = ((v - mean) ** 2).mean()
        invstd = 1.0 / np.sqrt(var + EPS)
        xhat = (v - mean) * invstd
        out["mean"][c], out["invstd"][c] = mean, invstd
        out["rm"][c] = (1 - MOMENTUM) * d["running_mean"][c] + MOMENTUM * mean
        batch_var = var * n / (n - 1) if var_estimator == "unbiased" else var
        out["rv"][c] = (1 - MOMENTUM) * d["running_var"][c] + MOMENTUM * batch_var
        yc = out["y"][:, c]
        yc[m] = w[c] * xhat + b[c]
        out["dbias"][c], out["dweight"][c] = g.sum(), (g * xhat).sum()
        dxc = w[c] * invstd * dy[:, c]
        dxc[m] = w[c] * invstd * (g - out["dbias"][c] / n - xhat * out["dweight"][c] / n)
        out["dx"][:, c] = dxc
    return out


def _on_counted(a: Any, mask: np.ndarray) -> np.ndarray:
    return np.where(mask, host(a).astype(np.float64), 0.0)


@POISONS
@pytest.mark.parametrize("var_estimator", ["unbiased", "biased"])
def test_nan_and_inf_at_masked_positions_stay_out(
    backend: Any, dtype: str, poison: float, var_estimator: str, rng: np.random.Generator
) -> None:
    """Padding holding NaN or +-inf: statistics, running update and gradients are those of
    the counted values (a masked loss: dy is 0 at the padding), on every backend and dtype."""
    d = _padded(rng, poison)
    vec = "float32" if dtype in ("float16", "bfloat16") else dtype
    a = {k: backend.asarray(d[k], dtype) for k in ("x", "dy")}
    a.update({k: backend.asarray(d[k], vec) for k in ("weight", "bias", "running_mean")})
    a["running_var"] = backend.asarray(d["running_var"], vec)
    m = backend.asarray(d["mask"])
    # the reference sees the values anybn saw (rounded to the test dtype)
    want = counted_reference(
        {**d, **{k: host(v).astype(np.float64) for k, v in a.items()}}, var_estimator
    )

    def forward(x: Any, rm: Any, rv: Any, w: Any, b: Any, mask: Any) -> Any:
        return tuple(
            anybn.batch_norm(
                x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS, mask=mask,
                var_estimator=var_estimator,
            )
        )  # fmt: skip

    def backward(dy: Any, x: Any, w: Any, mean: Any, invstd: Any, mask: Any) -> Any:
        return tuple(anybn.batch_norm_backward(dy, x, w, mean, invstd, mask=mask))

    y, mean, invstd, rm, rv = backend.call(
        forward, a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"], m
    )
    assert_close(_on_counted(y, d["mask"]), np.where(d["mask"], want["y"], 0.0), name="y",
                 dtype=dtype)  # fmt: skip
    for name, got, key in [("mean", mean, "mean"), ("invstd", invstd, "invstd"),
                           ("running_mean", rm, "rm"), ("running_var", rv, "rv")]:  # fmt: skip
        assert_close(got, want[key], name=name)
    dx, dweight, dbias = backend.call(backward, a["dy"], a["x"], a["weight"], mean, invstd, m)
    assert_close(dx, want["dx"], name="dx")  # finite everywhere, masked positions included
    assert_close(dweight, want["dweight"], name="dweight")
    assert_close(dbias, want["dbias"], name="dbias")


@POISONS
def test_layer_with_nan_and_inf_padding(backend: Any, poison: float) -> None:
    """anybn.BatchNorm(x, mask=...) and its backward: the counted values only."""
    d = _padded(np.random.default_rng(5), poison)
    d.update(weight=np.ones(3), bias=np.zeros(3), running_mean=np.zeros(3),
             running_var=np.ones(3))  # fmt: skip
    want = counted_reference(d)
    bn = anybn.BatchNorm(momentum=MOMENTUM, eps=EPS)
    y = bn(backend.asarray(d["x"]), mask=backend.asarray(d["mask"]))
    assert_close(_on_counted(y, d["mask"]), np.where(d["mask"], want["y"], 0.0), name="y",
                 dtype="float64")  # fmt: skip
    assert_close(bn.running_mean, want["rm"], name="running_mean")
    assert_close(bn.running_var, want["rv"], name="running_var")
    grads = bn.backward(backend.asarray(d["dy"]))
    assert_close(grads.dx, want["dx"], name="dx")
    assert_close(grads.dweight, want["dweight"], name="dweight")
    assert_close(grads.dbias, want["dbias"], name="dbias")


@POISONS
def test_jax_grad_with_nan_and_inf_padding(poison: float) -> None:
    """jax.grad and jax.jit(jax.grad) through the custom VJP (y, mean and invstd in the loss):
    the gradients at counted positions are those of the counted values, finite everywhere."""
    jax = pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    require("jax")  # x64 on, as in the matrix
    d = _padded(np.random.default_rng(9), poison)
    mask = jnp.asarray(d["mask"])
    g, a, c = (jnp.asarray(np.random.default_rng(i).normal(size=s))
               for i, s in ((1, d["x"].shape), (2, 3), (3, 3)))  # fmt: skip

    def loss(x: Any, w: Any, b: Any, stats: Any) -> Any:
        y, mean, invstd, _, _ = stats(x, w, b)
        return jnp.sum(jnp.where(mask, y * g, 0.0)) + jnp.sum(mean * a) + jnp.sum(invstd * c)

    def anybn_stats(x: Any, w: Any, b: Any) -> Any:
        return anybn.batch_norm(x, None, None, w, b, training=True, eps=EPS, mask=mask)

    def definition(x: Any, w: Any, b: Any) -> Any:
        """The counted values only: the padding replaced by 0 before anything reads it."""
        x = jnp.where(mask, x, 0.0)
        m = mask.astype(x.dtype)
        n = m.sum((0, 2), keepdims=True)
        mean = (m * x).sum((0, 2), keepdims=True) / n
        invstd = 1 / jnp.sqrt((m * (x - mean) ** 2).sum((0, 2), keepdims=True) / n + EPS)
        y = (x - mean) * invstd * w[None, :, None] + b[None, :, None]
        return y, mean.ravel(), invstd.ravel(), None, None

    x, w, b = jnp.asarray(d["x"]), jnp.asarray(d["weight"]), jnp.asarray(d["bias"])
    want = jax.grad(loss, (0, 1, 2))(jnp.where(mask, x, 0.0), w, b, definition)
    grad = jax.grad(lambda x, w, b: loss(x, w, b, anybn_stats), (0, 1, 2))
    for fn in (grad, jax.jit(grad)):
        got = fn(x, w, b)
        for name, gv, wv in zip(("dx", "dweight", "dbias"), got, want, strict=True):
            assert np.all(np.isfinite(np.asarray(gv))), name
            np.testing.assert_allclose(np.asarray(gv), np.asarray(wv), rtol=1e-10, atol=1e-10,
                                       err_msg=name)  # fmt: skip


@POISONS
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_autograd_with_nan_and_inf_padding(poison: float, dtype: str) -> None:
    """Tensors that require grad: autograd traces the generic forward, and its gradients
    (torch.autograd and torch.func.grad) are those of the counted values; y at the padding
    is still the formula's (NaN or inf)."""
    d = _padded(np.random.default_rng(13), poison)
    want = counted_reference(d)
    mask = torch.from_numpy(d["mask"])
    g = torch.from_numpy(d["dy"]).to(getattr(torch, dtype))  # 0 at the padding

    def loss(x: Any, w: Any, b: Any) -> Any:
        y = anybn.batch_norm(x, None, None, w, b, training=True, eps=EPS, mask=mask).y
        return torch.where(mask, y * g, 0.0).sum()

    x, w, b = (torch.tensor(d[k], dtype=getattr(torch, dtype)) for k in ("x", "weight", "bias"))
    y = anybn.batch_norm(x, None, None, w, b, training=True, eps=EPS, mask=mask).y
    assert torch.equal(torch.isnan(y), torch.isnan(x))  # the formula's value at the padding
    leaves = [t.clone().requires_grad_(True) for t in (x, w, b)]
    by_autograd = torch.autograd.grad(loss(*leaves), leaves)
    by_func = torch.func.grad(loss, argnums=(0, 1, 2))(x, w, b)
    for got in (by_autograd, by_func):
        for name, gv in zip(("dx", "dweight", "dbias"), got, strict=True):
            assert_close(gv, want[name], name=name)
