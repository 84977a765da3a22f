"""JAX ``axis_name=``: batch statistics synchronised over the devices of a named axis.

Four CPU devices (``XLA_FLAGS=--xla_force_host_platform_device_count=4``, set by the
repository's conftest.py before JAX starts) stand for four accelerators. Every check
compares ``jax.pmap`` or ``jax.shard_map`` over the devices, under ``jax.jit`` and
``jax.grad``, with one device normalising the whole batch: outputs, statistics,
running statistics, and gradients (JAX's convention inside a mapped function: the
gradient of the sum over devices of each device's loss). Uneven per-device counts
come through ``mask=``; ``axis_index_groups`` normalises each group on its own.
Where Flax is installed, ``flax.linen.BatchNorm(axis_name=..., use_fast_variance=False)``
is the other oracle on even shards, and shown to differ on uneven ones (its ``pmean``
weighs every device alike).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

import anybn

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

DEVICES = 4
EPS = 1e-5

pytestmark = pytest.mark.skipif(
    jax.local_device_count() < DEVICES,
    reason=f"needs {DEVICES} JAX devices: XLA_FLAGS=--xla_force_host_platform_device_count="
    f"{DEVICES} before JAX starts (the repository's conftest.py sets it)",
)


@pytest.fixture(autouse=True)
def _x64() -> Any:
    jax.config.update("jax_enable_x64", True)
    yield


def _data(shape: tuple[int, ...] = (8, 3, 5), seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    c = shape[1]
    return {
        "x": jnp.asarray(50.0 + rng.normal(size=shape) * rng.uniform(0.5, 2.0, (1, c, 1))),
        "g": jnp.asarray(rng.normal(size=shape)),
        "w": jnp.asarray(rng.uniform(0.5, 1.5, c)),
        "b": jnp.asarray(rng.normal(size=c)),
        "rm": jnp.asarray(rng.normal(size=c)),
        "rv": jnp.asarray(rng.uniform(0.5, 2.0, c)),
    }


def _uneven_mask(shape: tuple[int, ...]) -> Any:
    """Per-device counts 2, 1, 0 and 3 samples of 2 (device 2 counts nothing) in channel 0,
    every other channel with its own lengths: (8, C, L), samples split 2 per device."""
    n, c, length = shape
    lengths = np.array(
        [[5, 5, 3, 0, 0, 0, 4, 2], [1, 5, 2, 2, 5, 0, 3, 3], [5, 5, 5, 5, 5, 5, 0, 1]]
    )
    keep = np.arange(length)[None, None, :] < lengths[np.arange(c) % 3].T[:n, :, None]
    return jnp.asarray(keep)


def _close(got: Any, want: Any, tol: float = 1e-12, what: str = "") -> None:
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=tol, atol=tol, err_msg=what)


def _mesh() -> Any:
    return jax.make_mesh((DEVICES,), ("batch",))


def _sharded(mesh: Any, a: Any) -> Any:
    return jax.device_put(a, NamedSharding(mesh, P("batch")))


def _split(a: Any) -> Any:
    """(8, ...) -> (4, 2, ...): pmap's leading device axis."""
    return a.reshape(DEVICES, a.shape[0] // DEVICES, *a.shape[1:])


def _loss(out: Any, g: Any) -> Any:
    """A loss of y and of the statistics (their cotangents reach x too)."""
    return jnp.sum(jnp.sin(out.y) * g) + jnp.sum(out.mean**2) + jnp.sum(jnp.log(out.invstd))


@pytest.mark.parametrize("masked", [False, True], ids=["even", "uneven-mask"])
def test_pmap_forward_and_grad_equal_one_device(masked: bool) -> None:
    d = _data()
    x, g, w, b, rm, rv = (d[k] for k in ("x", "g", "w", "b", "rm", "rv"))
    mask = _uneven_mask(x.shape) if masked else None

    def whole(x: Any, w: Any, b: Any) -> Any:
        out = anybn.batch_norm(x, rm, rv, w, b, training=True, momentum=0.3, mask=mask)
        # each device's loss holds 1/DEVICES of the statistics' terms: their sum is this loss
        return _loss(out, g), out

    (_, want), want_g = jax.value_and_grad(whole, (0, 1, 2), has_aux=True)(x, w, b)

    def per_device(x: Any, w: Any, b: Any, g: Any, m: Any) -> Any:
        out = anybn.batch_norm(
            x, rm, rv, w, b, training=True, momentum=0.3, mask=m, axis_name="batch"
        )
        stats = jnp.sum(out.mean**2) + jnp.sum(jnp.log(out.invstd))
        loss = jnp.sum(jnp.sin(out.y) * g) + stats / DEVICES
        return loss, out

    step = jax.jit(
        jax.pmap(
            jax.value_and_grad(per_device, (0, 1, 2), has_aux=True),
            axis_name="batch",
            in_axes=(0, None, None, 0, 0 if masked else None),
        )
    )
    (_, got), got_g = step(_split(x), w, b, _split(g), None if mask is None else _split(mask))
    _close(got.y.reshape(x.shape), want.y, what="y")
    for field in ("mean", "invstd", "new_running_mean", "new_running_var"):
        for dev in range(DEVICES):  # every device holds the whole batch's statistics
            _close(getattr(got, field)[dev], getattr(want, field), what=f"{field}, device {dev}")
    _close(got_g[0].reshape(x.shape), want_g[0], 1e-10, "dx")
    _close(got_g[1].sum(0), want_g[1], 1e-10, "dweight summed over devices")
    _close(got_g[2].sum(0), want_g[2], 1e-10, "dbias summed over devices")


@pytest.mark.parametrize("masked", [False, True], ids=["even", "uneven-mask"])
def test_shard_map_jit_grad_equal_one_device(masked: bool) -> None:
    """shard_map with replicated parameters: their gradients arrive summed over devices."""
    d = _data(seed=1)
    x, g, w, b = (d[k] for k in ("x", "g", "w", "b"))
    mask = _uneven_mask(x.shape) if masked else None
    mesh = _mesh()

    def whole(x: Any, w: Any, b: Any) -> Any:
        out = anybn.batch_norm(x, None, None, w, b, training=True, mask=mask)
        return jnp.sum(jnp.sin(out.y) * g), out.y

    (_, want_y), want_g = jax.value_and_grad(whole, (0, 1, 2), has_aux=True)(x, w, b)

    def per_device(x: Any, w: Any, b: Any, g: Any, m: Any) -> Any:
        out = anybn.batch_norm(x, None, None, w, b, training=True, mask=m, axis_name="batch")
        return jnp.sum(jnp.sin(out.y) * g), out.y

    spec_m = P("batch") if masked else P()
    step = jax.jit(
        jax.shard_map(
            jax.grad(per_device, (0, 1, 2), has_aux=True),
            mesh=mesh,
            in_specs=(P("batch"), P(), P(), P("batch"), spec_m),
            out_specs=((P("batch"), P(), P()), P("batch")),
        )
    )
    m = None if mask is None else _sharded(mesh, mask)
    got_g, got_y = step(_sharded(mesh, x), w, b, _sharded(mesh, g), m)
    _close(got_y, want_y, what="y")
    for got, want, name in zip(got_g, want_g, ("dx", "dweight", "dbias"), strict=True):
        _close(got, want, 1e-10, name)


def test_shard_map_matches_jax_autodiff_of_the_definition() -> None:
    """The custom VJP against JAX differentiating a plain batch norm over all_gather, in
    shard_map's own typing: statistics terms of the loss included."""
    d = _data(seed=2)
    x, g, w, b = (d[k] for k in ("x", "g", "w", "b"))
    mesh = _mesh()

    def definition(x: Any, w: Any, b: Any) -> Any:
        whole = jax.lax.all_gather(x, "batch", tiled=True)
        mean, var = whole.mean((0, 2)), whole.var((0, 2))
        invstd = 1.0 / jnp.sqrt(var + EPS)
        y = (x - mean[:, None]) * (invstd * w)[:, None] + b[:, None]
        return y, mean, invstd

    def ours(x: Any, w: Any, b: Any) -> Any:
        out = anybn.batch_norm(x, None, None, w, b, training=True, axis_name="batch")
        return out.y, out.mean, out.invstd

    results = []
    for impl in (definition, ours):

        def loss(x: Any, w: Any, b: Any, g: Any, impl: Any = impl) -> Any:
            y, mean, invstd = impl(x, w, b)
            return jnp.sum(jnp.sin(y) * g) + jnp.sum(mean**2) + jnp.sum(jnp.log(invstd))

        f = jax.shard_map(
            jax.grad(loss, (0, 1, 2)), mesh=mesh,
            in_specs=(P("batch"), P(), P(), P("batch")), out_specs=(P("batch"), P(), P()),
        )  # fmt: skip
        results.append(jax.jit(f)(_sharded(mesh, x), w, b, _sharded(mesh, g)))
    for want, got, name in zip(*results, ("dx", "dweight", "dbias"), strict=True):
        _close(got, want, 1e-10, name)


@pytest.mark.parametrize("transform", ["pmap", "shard_map"])
def test_axis_index_groups(transform: str) -> None:
    """Groups [[0, 1], [2, 3]]: each normalises its half of the batch on its own."""
    d = _data(seed=3)
    x, w, b = d["x"], d["w"], d["b"]
    groups = [[0, 1], [2, 3]]
    halves = [anybn.batch_norm(x[i : i + 4], None, None, w, b, training=True) for i in (0, 4)]
    want_y = jnp.concatenate([h.y for h in halves])

    def f(x: Any) -> Any:
        out = anybn.batch_norm(
            x, None, None, w, b, training=True, axis_name="batch", axis_index_groups=groups
        )
        return out.y, out.mean

    if transform == "pmap":
        y, mean = jax.pmap(f, axis_name="batch")(_split(x))
        y = y.reshape(x.shape)
    else:
        mesh = _mesh()
        sm = jax.shard_map(f, mesh=mesh, in_specs=P("batch"), out_specs=(P("batch"), P("batch")))
        y, mean = jax.jit(sm)(_sharded(mesh, x))
        mean = np.asarray(mean).reshape(DEVICES, -1)
    _close(y, want_y, what="y")
    for dev in range(DEVICES):
        _close(mean[dev], halves[dev // 2].mean, what=f"mean, device {dev}")


def test_backward_over_the_axis() -> None:
    """anybn.batch_norm_backward with axis_name: dx through the whole batch's statistics."""
    d = _data(seed=4)
    x, g, w = d["x"], d["g"], d["w"]
    mask = _uneven_mask(x.shape)
    out = anybn.batch_norm(x, None, None, w, None, training=True, mask=mask)
    want = anybn.batch_norm_backward(g, x, w, out.mean, out.invstd, mask=mask)

    def f(x: Any, g: Any, m: Any) -> Any:
        o = anybn.batch_norm(x, None, None, w, None, training=True, mask=m, axis_name="batch")
        return anybn.batch_norm_backward(g, x, w, o.mean, o.invstd, mask=m, axis_name="batch")

    got = jax.pmap(f, axis_name="batch")(_split(x), _split(g), _split(mask))
    _close(got.dx.reshape(x.shape), want.dx, 1e-10, "dx")
    _close(got.dweight.sum(0), want.dweight, 1e-10, "dweight")
    _close(got.dbias.sum(0), want.dbias, 1e-10, "dbias")


def test_float32_large_mean_stays_exact() -> None:
    """float32 with a mean of 1e4: the (first-pass mean, correction) pairs keep y within
    float32's rounding of the float64 result, as the process-synchronised path does."""
    jax.config.update("jax_enable_x64", False)
    rng = np.random.default_rng(5)
    x64 = (1e4 + rng.normal(size=(8, 3, 16))).astype(np.float32).astype(np.float64)
    want = anybn.batch_norm(x64, training=True).y
    f = jax.pmap(lambda x: anybn.batch_norm(x, training=True, axis_name="batch").y, "batch")
    got = np.asarray(f(_split(jnp.asarray(x64, dtype=jnp.float32)))).reshape(x64.shape)
    assert np.abs(got - want).max() < 1e-6


def test_layer_with_axis_name() -> None:
    """The layer without running statistics trains under shard_map; with them, a training
    call inside the transformation raises (the statistics would be tracers)."""
    d = _data(seed=6)
    x = d["x"]
    mesh = _mesh()
    want = anybn.BatchNorm(3, track_running_stats=False)(x)
    bn = anybn.BatchNorm(3, track_running_stats=False, axis_name="batch", xp=jnp)
    sm = jax.shard_map(bn, mesh=mesh, in_specs=P("batch"), out_specs=P("batch"))
    _close(jax.jit(sm)(_sharded(mesh, x)), want, what="layer y")
    stateful = anybn.BatchNorm(3, axis_name="batch", xp=jnp)
    with pytest.raises(RuntimeError, match="JAX transformation"):
        jax.pmap(stateful, axis_name="batch")(_split(x))
    # eval with running statistics: nothing to synchronise, inside the transformation too
    stateful.eval()
    y = jax.pmap(stateful, axis_name="batch")(_split(x))
    _close(y.reshape(x.shape), stateful(x), what="eval")


@pytest.mark.parametrize(
    ("kwargs", "kind", "match"),
    [
        ({"axis_name": "batch"}, TypeError, "needs JAX arrays"),
        ({"axis_name": 3}, TypeError, "axis_name must be a str"),
        ({"axis_index_groups": [[0, 1]]}, ValueError, "needs axis_name"),
        ({"axis_name": "b", "axis_index_groups": [[0, 1], [2]]}, ValueError, "groups of one size"),
        ({"axis_name": "b", "comm": "mpi"}, ValueError, "axis_name"),
    ],
)
def test_bad_axis_name_arguments(kwargs: dict[str, Any], kind: type, match: str) -> None:
    x = np.ones((4, 3)) if kwargs.get("axis_name") == "batch" else jnp.ones((4, 3))
    x = x if "comm" not in kwargs else np.ones((4, 3))
    with pytest.raises(kind, match=match):
        anybn.batch_norm(x, training=True, **kwargs)


# --- Flax's BatchNorm over a named axis ------------------------------------------------


def _flax_step(x: Any, mask: Any, variables: dict[str, Any]) -> tuple[Any, Any]:
    """flax.linen.BatchNorm(axis_name='batch', use_fast_variance=False) under pmap:
    y and the new batch_stats, channels last."""
    nn = pytest.importorskip("flax.linen")
    model = nn.BatchNorm(
        use_running_average=False, momentum=0.9, epsilon=EPS, axis_name="batch",
        use_fast_variance=False,
    )  # fmt: skip

    def f(x: Any, m: Any) -> Any:
        y, state = model.apply(variables, x, mask=m, mutable=["batch_stats"])
        return y, state["batch_stats"]

    return jax.pmap(f, axis_name="batch", in_axes=(0, None if mask is None else 0))(
        _split(x), None if mask is None else _split(mask)
    )


def _flax_variables(c: int, seed: int) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    scale, bias = rng.uniform(0.5, 1.5, c), rng.normal(size=c)
    mean, var = rng.normal(size=c), rng.uniform(1, 2, c)
    return {
        "params": {"scale": jnp.asarray(scale), "bias": jnp.asarray(bias)},
        "batch_stats": {"mean": jnp.asarray(mean), "var": jnp.asarray(var)},
    }


def _anybn_as_flax(x: Any, mask: Any, variables: dict[str, Any]) -> tuple[Any, Any]:
    p, s = variables["params"], variables["batch_stats"]

    def f(x: Any, m: Any) -> Any:
        out = anybn.batch_norm(
            x, s["mean"], s["var"], p["scale"], p["bias"], training=True, momentum=0.1,
            eps=EPS, axis=-1, mask=m, var_estimator="biased", axis_name="batch",
        )  # fmt: skip
        return out.y, {"mean": out.new_running_mean, "var": out.new_running_var}

    return jax.pmap(f, axis_name="batch", in_axes=(0, None if mask is None else 0))(
        _split(x), None if mask is None else _split(mask)
    )


def test_against_flax_on_even_shards() -> None:
    pytest.importorskip("flax")
    rng = np.random.default_rng(7)
    x = jnp.asarray(3.0 + rng.normal(size=(8, 6, 4)) * 2.0)  # channels last
    variables = _flax_variables(4, 8)
    y_f, stats_f = _flax_step(x, None, variables)
    y_a, stats_a = _anybn_as_flax(x, None, variables)
    _close(y_a, y_f, 1e-10, "y")
    for k in ("mean", "var"):
        _close(stats_a[k], stats_f[k], 1e-10, f"batch_stats {k}")

    # and the gradients: JAX differentiating Flax's pmean against anybn's VJP
    def loss_flax(x: Any) -> Any:
        nn = pytest.importorskip("flax.linen")
        model = nn.BatchNorm(
            use_running_average=False, momentum=0.9, epsilon=EPS, axis_name="batch",
            use_fast_variance=False,
        )  # fmt: skip
        y, _ = model.apply(variables, x, mutable=["batch_stats"])
        return jnp.sum(jnp.sin(y))

    def loss_anybn(x: Any) -> Any:
        p = variables["params"]
        y = anybn.batch_norm(
            x, None, None, p["scale"], p["bias"], training=True, axis=-1, axis_name="batch"
        ).y
        return jnp.sum(jnp.sin(y))

    g_f = jax.pmap(jax.grad(loss_flax), axis_name="batch")(_split(x))
    g_a = jax.pmap(jax.grad(loss_anybn), axis_name="batch")(_split(x))
    _close(g_a, g_f, 1e-10, "dx")


def test_flax_pmean_is_unweighted_on_uneven_shards() -> None:
    """With uneven mask counts Flax's pmean of per-device means is not the batch mean;
    anybn's count-weighted merge is (one device on the whole batch)."""
    pytest.importorskip("flax")
    rng = np.random.default_rng(9)
    x = jnp.asarray(rng.normal(size=(8, 6, 2)) + np.arange(8)[:, None, None])
    lengths = np.array([6, 6, 1, 1, 6, 6, 2, 2])
    mask = jnp.asarray(np.arange(6)[None, :, None] < lengths[:, None, None])
    variables = _flax_variables(2, 10)
    whole = anybn.batch_norm(
        x, variables["batch_stats"]["mean"], variables["batch_stats"]["var"],
        variables["params"]["scale"], variables["params"]["bias"], training=True,
        momentum=0.1, eps=EPS, axis=-1, mask=mask, var_estimator="biased",
    )  # fmt: skip
    y_a, stats_a = _anybn_as_flax(x, mask, variables)
    _close(y_a.reshape(x.shape), whole.y, 1e-10, "anybn: y")
    _close(stats_a["mean"][0], whole.new_running_mean, 1e-10, "anybn: running mean")
    _, stats_f = _flax_step(x, mask, variables)
    flax_mean = np.asarray(stats_f["mean"])[0]
    assert np.abs(flax_mean - np.asarray(whole.new_running_mean)).max() > 1e-3
