"""anybn.BatchNorm, the stateful layer, on every backend of the matrix.

The oracle is ``torch.nn.BatchNorm1d`` in float64 (the layer promises PyTorch's
module semantics exactly): the same batches go through both, with the input
reshaped to ``(N, C, L)`` for torch, and every output, gradient, running
statistic and counter is compared. Tests that need torch skip without it.
"""

from __future__ import annotations

import copy
import gc
import os
import pickle
import subprocess
import sys
import weakref
from pathlib import Path
from typing import Any

import array_api_compat as compat
import numpy as np
import pytest
from _helpers import require

import anybn
from anybn._testing.backends import Backend

C = 3


def _namespace(backend: Backend) -> tuple[Any, Any]:
    """The array-API namespace and device of a backend."""
    probe = backend.asarray(np.zeros(1))
    return compat.array_namespace(probe), compat.device(probe)


def _snapshot(bn: anybn.BatchNorm) -> dict[str, Any]:
    """Everything a failed call must leave unchanged, as plain Python/NumPy values."""
    arrays = {
        k: None if a is None else (type(a), _host(a))
        for k, a in zip(
            ("weight", "bias", "running_mean", "running_var"),
            (bn.weight, bn.bias, bn.running_mean, bn.running_var),
            strict=True,
        )
    }
    return {
        "arrays": arrays,
        "num_batches_tracked": bn.num_batches_tracked,
        "num_features": bn.num_features,
        "training": bn.training,
        "saved": bn._saved,
        "storage": bn._storage,
    }


def _host(a: Any) -> np.ndarray:
    """A NumPy copy of an array of any backend (bfloat16 as float32)."""
    if compat.is_torch_array(a):
        import torch

        a = a.detach().cpu()
        return (a.float() if a.dtype == torch.bfloat16 else a).numpy().copy()
    if compat.is_cupy_array(a):
        return a.get()
    if compat.is_array_api_strict_namespace(compat.array_namespace(a)):
        import array_api_strict as strict

        return np.asarray(a.to_device(strict.Device("CPU_DEVICE")))
    return np.array(a)


def _assert_same_snapshot(before: dict[str, Any], after: dict[str, Any]) -> None:
    assert before.keys() == after.keys()
    for key in before:
        if key == "arrays":
            for name, pair in before[key].items():
                other = after[key][name]
                assert (pair is None) == (other is None), name
                if pair is not None:
                    assert pair[0] is other[0], name
                    np.testing.assert_array_equal(pair[1], other[1], err_msg=name)
        else:
            assert before[key] is after[key] or before[key] == after[key], key


# --- the torch oracle --------------------------------------------------------------------


def _torch_oracle(**kwargs: Any) -> Any:
    torch = pytest.importorskip("torch")
    return torch.nn.BatchNorm1d(C, dtype=torch.float64, **kwargs)


def _to_ncl(a: np.ndarray, axis: int) -> np.ndarray:
    moved = np.moveaxis(a, axis, 1)
    return moved.reshape(moved.shape[0], moved.shape[1], -1)


def _from_ncl(a: np.ndarray, like: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(a.reshape(np.moveaxis(like, axis, 1).shape), 1, axis)


def _torch_step(module: Any, x: np.ndarray, dy: np.ndarray, axis: int) -> dict[str, Any]:
    """Forward and backward through the oracle; results in NumPy, x's layout."""
    import torch

    xt = torch.from_numpy(_to_ncl(x, axis)).requires_grad_()
    for p in module.parameters():
        p.grad = None
    y = module(xt)
    y.backward(torch.from_numpy(_to_ncl(dy, axis)))
    out = {"y": _from_ncl(y.detach().numpy(), x, axis), "dx": _from_ncl(xt.grad.numpy(), x, axis)}
    if module.affine:
        out["dweight"], out["dbias"] = module.weight.grad.numpy(), module.bias.grad.numpy()
    return out


def _state(obj: Any) -> dict[str, Any]:
    """A state dict (either library) as NumPy arrays and ints."""
    return {
        k: int(v) if k == "num_batches_tracked" else _host(v) for k, v in obj.state_dict().items()
    }


def _assert_state_equal(ours: anybn.BatchNorm, oracle: Any) -> None:
    expected, actual = _state(oracle), _state(ours)
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        np.testing.assert_allclose(actual[k], v, rtol=1e-10, atol=1e-12, err_msg=k)


# (constructor options, layer-level extras): each row runs a train/eval/train schedule.
CONFIGS = [
    pytest.param({}, {}, id="defaults"),
    pytest.param({"momentum": None}, {}, id="cumulative"),
    pytest.param({"affine": False, "eps": 1e-3}, {"lazy": True}, id="no-affine-lazy"),
    pytest.param({"track_running_stats": False}, {}, id="no-tracking"),
    pytest.param({"affine": False, "track_running_stats": False, "momentum": None}, {}, id="bare"),
    pytest.param({"momentum": 0.3}, {"axis": -1, "lazy": True}, id="channels-last-lazy"),
]


@pytest.mark.parametrize(("options", "extras"), CONFIGS)
def test_matches_torch_module(
    backend: Backend, rng: np.random.Generator, options: dict[str, Any], extras: dict[str, Any]
) -> None:
    torch = pytest.importorskip("torch")
    oracle = _torch_oracle(**options)
    axis = extras.get("axis", 1)
    if extras.get("lazy"):  # the first input decides library, device, dtype and C
        bn = anybn.BatchNorm(axis=axis, **options)
    else:
        xp, device = _namespace(backend)
        bn = anybn.BatchNorm(C, axis=axis, xp=xp, device=device, dtype="float64", **options)
    shape = (5, C, 4) if axis == 1 else (5, 2, 2, C)
    for step, training in enumerate((True, True, False, True, False)):
        bn.train(training)
        oracle.train(training)
        x = rng.standard_normal(shape) * (step + 1) + 3.0 * step
        dy = rng.standard_normal(shape)
        y = bn(backend.asarray(x))
        if step == 0 and options.get("affine", True):  # non-trivial parameters from here on
            w, b = rng.uniform(0.5, 2.0, C), rng.standard_normal(C)
            bn.load_state_dict({**bn.state_dict(), "weight": w, "bias": b})
            with torch.no_grad():
                oracle.weight.copy_(torch.from_numpy(w))
                oracle.bias.copy_(torch.from_numpy(b))
            y = bn(backend.asarray(x))  # the same batch again, on both
            _torch_step(oracle, x, dy, axis)
        grads = bn.backward(backend.asarray(dy))
        expected = _torch_step(oracle, x, dy, axis)
        actual = {"y": y, "dx": grads.dx, "dweight": grads.dweight, "dbias": grads.dbias}
        for k, v in expected.items():
            np.testing.assert_allclose(
                backend.to_numpy(actual[k]), v, rtol=1e-9, atol=1e-10, err_msg=f"{k} step {step}"
            )
        _assert_state_equal(bn, oracle)
        assert bn.num_batches_tracked == (
            None if oracle.num_batches_tracked is None else int(oracle.num_batches_tracked)
        )
    assert type(y) is type(backend.asarray(x))
    assert compat.device(bn.weight if bn.affine else y) == compat.device(backend.asarray(x))


def test_cumulative_average_without_torch(rng: np.random.Generator) -> None:
    """momentum=None: the running statistics are the averages over all batches."""
    bn = anybn.BatchNorm(C, momentum=None)
    batches = [rng.standard_normal((6, C, 2)) * (k + 1) + k for k in range(4)]
    for x in batches:
        bn(x)
    np.testing.assert_allclose(bn.running_mean, np.mean([x.mean(axis=(0, 2)) for x in batches], 0))
    unbiased = [x.var(axis=(0, 2), ddof=1) for x in batches]
    np.testing.assert_allclose(bn.running_var, np.mean(unbiased, axis=0))
    assert bn.num_batches_tracked == 4


def test_initial_state(backend: Backend) -> None:
    xp, device = _namespace(backend)
    bn = anybn.BatchNorm(4, xp=xp, device=device)
    for a, value in ((bn.weight, 1), (bn.bias, 0), (bn.running_mean, 0), (bn.running_var, 1)):
        assert compat.device(a) == device
        assert a.dtype == xp.__array_namespace_info__().default_dtypes()["real floating"]
        np.testing.assert_array_equal(backend.to_numpy(a), np.full(4, value))
    assert bn.num_batches_tracked == 0
    assert bn.training is True
    bare = anybn.BatchNorm(4, affine=False, track_running_stats=False)
    assert bare.weight is bare.bias is bare.running_mean is bare.running_var is None
    assert bare.num_batches_tracked is None


def test_first_input_decides(backend: Backend, rng: np.random.Generator) -> None:
    bn = anybn.BatchNorm()
    assert bn.weight is None and bn.num_features is None
    x = backend.asarray(rng.standard_normal((4, 5, 2)), "float32")
    bn(x)
    assert bn.num_features == 5
    for a in (bn.weight, bn.bias, bn.running_mean, bn.running_var):
        assert type(a) is type(x) and a.dtype == x.dtype and a.shape == (5,)
        assert compat.device(a) == compat.device(x)
    # With num_features given, NumPy placeholders move to the first input's library.
    placeholders = anybn.BatchNorm(5, momentum=0.5)
    placeholders.load_state_dict({**placeholders.state_dict(), "running_mean": np.full(5, 4.0)})
    placeholders(x)
    assert type(placeholders.running_mean) is type(x)
    expected = 0.5 * 4.0 + 0.5 * backend.to_numpy(x).mean(axis=(0, 2))
    np.testing.assert_allclose(backend.to_numpy(placeholders.running_mean), expected, rtol=1e-6)


def test_half_input_keeps_float32_parameters(rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((8, C, 3))
    for half in (torch.float16, torch.bfloat16):
        bn, oracle = anybn.BatchNorm(), torch.nn.BatchNorm1d(C)
        xh = torch.from_numpy(x).to(half)
        y = bn(xh)
        assert y.dtype == half and bn.weight.dtype == bn.running_var.dtype == torch.float32
        torch.testing.assert_close(y, oracle(xh))
        torch.testing.assert_close(bn.running_var, oracle.running_var)
    y16 = anybn.BatchNorm()(x.astype(np.float16))
    assert y16.dtype == np.float16


# --- errors leave the layer exactly as it was ---------------------------------------------


@pytest.fixture
def trained(backend: Backend, rng: np.random.Generator) -> anybn.BatchNorm:
    """A layer with history: bound to the backend, two training steps, a saved forward."""
    bn = anybn.BatchNorm(C, momentum=None)
    for _ in range(2):
        bn(backend.asarray(rng.standard_normal((4, C, 2))))
    return bn


def _bad_forwards(backend: Backend, rng: np.random.Generator) -> list[tuple[Any, type, str]]:
    return [
        (backend.asarray(rng.standard_normal((4, C + 1))), ValueError, "num_features=3"),
        (backend.asarray(rng.standard_normal(C)), ValueError, "at least 2 dimensions"),
        (backend.asarray(rng.standard_normal((1, C))), ValueError, "more than 1 value"),
        (
            backend.asarray(rng.standard_normal((4, C)), "float32"),
            TypeError,
            "x has dtype float32 but this BatchNorm",
        ),
        (backend.asarray(np.ones((4, C), dtype=np.int64)), TypeError, "floating"),
        ([[1.0, 2.0, 3.0]] * 2, TypeError, "must be an array"),
    ]


def test_bad_forward_leaves_state(
    backend: Backend, trained: anybn.BatchNorm, rng: np.random.Generator
) -> None:
    for x, error, match in _bad_forwards(backend, rng):
        before = _snapshot(trained)
        with pytest.raises(error, match=match):
            trained(x)
        _assert_same_snapshot(before, _snapshot(trained))
    other = np.ones((4, C)) if backend.id != "numpy" else _other_library_array()
    with pytest.raises(TypeError, match="this BatchNorm holds"):
        trained(other)


def _other_library_array() -> Any:
    strict = pytest.importorskip("array_api_strict")
    return strict.ones((4, C), dtype=strict.float64)


def test_bad_first_forward_leaves_layer_unbound(backend: Backend, rng: np.random.Generator) -> None:
    bn = anybn.BatchNorm()
    before = _snapshot(bn)
    for x, error, _ in _bad_forwards(backend, rng)[1:]:
        if error is TypeError and "float32" in str(getattr(x, "dtype", "")):
            continue  # a float32 first input is fine: it decides the dtype
        with pytest.raises(error):
            bn(x)
        _assert_same_snapshot(before, _snapshot(bn))
    assert bn.weight is None and bn.num_features is None


def test_backward_errors(backend: Backend, trained: anybn.BatchNorm) -> None:
    with pytest.raises(RuntimeError, match="needs a forward first"):
        anybn.BatchNorm(C).backward(np.ones((4, C)))
    before = _snapshot(trained)
    with pytest.raises(ValueError, match="dy must have the shape of x"):
        trained.backward(backend.asarray(np.ones((4, C))))
    _assert_same_snapshot(before, _snapshot(trained))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        ({"weight": None}, ValueError, r"missing keys \['weight'\]"),
        ({"extra": np.ones(C)}, ValueError, r"unexpected keys \['extra'\]"),
        ({"running_var": np.ones(C + 1)}, ValueError, r"'running_var' has shape \(4,\)"),
        ({"bias": np.ones((1, C))}, ValueError, "must be 1-D"),
        ({"bias": np.array(["a", "b", "c"])}, TypeError, "real dtype"),
        ({"bias": "zeros"}, TypeError, "must be an array"),
        ({"num_batches_tracked": -1}, ValueError, ">= 0"),
        ({"num_batches_tracked": np.array(2.0)}, TypeError, "0-d integer"),
        ({"num_batches_tracked": np.array([2])}, TypeError, "0-d integer"),
        ({"num_batches_tracked": True}, TypeError, "0-d integer"),
    ],
)
def test_bad_state_dict_leaves_state(
    trained: anybn.BatchNorm, change: dict[str, Any], error: type, match: str
) -> None:
    state = {k: _host(v) for k, v in trained.state_dict().items()}
    state = {k: v for k, v in {**state, **change}.items() if v is not None}
    before = _snapshot(trained)
    with pytest.raises(error, match=match):
        trained.load_state_dict(state)
    _assert_same_snapshot(before, _snapshot(trained))


def test_state_dict_must_be_a_mapping() -> None:
    with pytest.raises(TypeError, match="mapping"):
        anybn.BatchNorm(C).load_state_dict([("weight", np.ones(C))])  # type: ignore[arg-type]


# --- state dicts -------------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_keys_are_torchs(affine: bool, track: bool) -> None:
    oracle = _torch_oracle(affine=affine, track_running_stats=track)
    bn = anybn.BatchNorm(C, affine=affine, track_running_stats=track)
    assert list(bn.state_dict()) == list(oracle.state_dict())


def test_state_dict_round_trips_with_torch(backend: Backend, rng: np.random.Generator) -> None:
    torch = pytest.importorskip("torch")
    xp, device = _namespace(backend)
    bn = anybn.BatchNorm(C, xp=xp, device=device, dtype="float32")
    bn(backend.asarray(rng.standard_normal((4, C, 2)), "float32"))
    sd = bn.state_dict()
    counter = sd["num_batches_tracked"]
    assert counter.shape == () and counter.dtype == xp.int64 and compat.device(counter) == device
    # anybn -> torch: the values converted to tensors load into nn.BatchNorm1d.
    oracle = torch.nn.BatchNorm1d(C)
    oracle.load_state_dict({k: torch.from_numpy(backend.to_numpy(v)) for k, v in sd.items()})
    assert int(oracle.num_batches_tracked) == 1
    # torch -> anybn: tensors load straight in, converted to the layer's library.
    oracle.running_mean.fill_(7.0)
    fresh = anybn.BatchNorm(C, xp=xp, device=device, dtype="float64")
    fresh.load_state_dict(oracle.state_dict())
    assert type(fresh.running_mean) is type(counter) and fresh.running_mean.dtype == xp.float64
    assert compat.device(fresh.running_mean) == device
    _assert_state_equal(fresh, oracle)
    assert fresh.num_batches_tracked == 1


def test_load_copies_and_state_dict_snapshots(rng: np.random.Generator) -> None:
    bn = anybn.BatchNorm(C)
    source = {**bn.state_dict(), "weight": rng.standard_normal(C)}
    bn.load_state_dict(source)
    expected = source["weight"].copy()
    source["weight"] += 1.0
    np.testing.assert_array_equal(bn.weight, expected)
    snapshot = bn.state_dict()
    bn.weight -= 1.0  # an in-place SGD step
    np.testing.assert_array_equal(snapshot["weight"], expected)


def test_load_infers_num_features() -> None:
    torch = pytest.importorskip("torch")
    bn = anybn.BatchNorm(xp=np)
    with pytest.raises(RuntimeError, match="num_features=None"):
        bn.state_dict()
    bn.load_state_dict(torch.nn.BatchNorm1d(6).state_dict())
    assert bn.num_features == 6 and bn.weight.dtype == np.float64


def test_state_dict_of_a_bare_lazy_layer_is_empty() -> None:
    assert anybn.BatchNorm(affine=False, track_running_stats=False).state_dict() == {}


# --- small API -----------------------------------------------------------------------------


def test_modes_resets_and_repr(rng: np.random.Generator) -> None:
    bn = anybn.BatchNorm(C, momentum=None)
    assert bn.eval() is bn and bn.training is False
    assert bn.train() is bn and bn.training is True
    with pytest.raises(TypeError, match="mode must be a bool"):
        bn.train(1)  # type: ignore[arg-type]
    bn(rng.standard_normal((4, C)))
    bn.weight = bn.weight * 3.0
    bn.reset_running_stats()
    np.testing.assert_array_equal(bn.running_mean, np.zeros(C))
    np.testing.assert_array_equal(bn.weight, np.full(C, 3.0))
    assert bn.num_batches_tracked == 0
    bn.reset_parameters()
    np.testing.assert_array_equal(bn.weight, np.ones(C))
    assert repr(bn) == (
        "BatchNorm(3, axis=1, eps=1e-05, momentum=None, affine=True, track_running_stats=True)"
    )


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"num_features": 0}, ValueError, "num_features"),
        ({"num_features": 2.0}, TypeError, "num_features"),
        ({"num_features": True}, TypeError, "num_features"),
        ({"axis": 1.0}, TypeError, "axis"),
        ({"eps": 0.0}, ValueError, "eps"),
        ({"momentum": 1.5}, ValueError, "momentum"),
        ({"affine": 1}, TypeError, "affine"),
        ({"track_running_stats": None}, TypeError, "track_running_stats"),
        ({"dtype": "int32"}, TypeError, "dtype must be one of"),
        ({"xp": np, "dtype": "bfloat16"}, TypeError, "dtype must be a real floating dtype"),
    ],
)
def test_constructor_checks(kwargs: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        anybn.BatchNorm(**kwargs)


# --- state that does not grow; copies ------------------------------------------------------

BATCHES = 30


def _state_size(bn: anybn.BatchNorm) -> dict[str, int]:
    """What the layer holds, measured: each attribute's pickle and, for Dask, each graph's tasks."""
    sizes = {f"pickle {k}": len(pickle.dumps(v)) for k, v in bn.__getstate__().items()}
    saved = bn._saved
    held = {
        "weight": bn.weight,
        "bias": bn.bias,
        "running_mean": bn.running_mean,
        "running_var": bn.running_var,
        "saved mean": None if saved is None else saved.mean,
        "saved invstd": None if saved is None else saved.invstd,
    }
    for name, a in held.items():
        if a is not None and compat.is_dask_array(a):
            sizes[name] = len(a.__dask_graph__())
    return sizes


def _batch(backend: Backend, rng: np.random.Generator, k: int) -> tuple[np.ndarray, Any]:
    host = rng.standard_normal((6, C, 4)) * (1 + k % 3) + k % 5
    x = backend.asarray(host)
    if compat.is_torch_array(x):
        x.requires_grad_()  # the layer keeps nothing of its graph beyond the last forward
    return host, x


def _copies(bn: anybn.BatchNorm) -> dict[str, anybn.BatchNorm]:
    loaded = anybn.BatchNorm(momentum=bn.momentum)
    loaded.load_state_dict(bn.state_dict())
    return {
        "deepcopy": copy.deepcopy(bn),
        "pickle": pickle.loads(pickle.dumps(bn)),
        "state_dict": loaded,
    }


def test_state_does_not_grow_and_copies_continue(
    backend: Backend, rng: np.random.Generator
) -> None:
    """After many batches the layer holds what it held after one, and nothing of the
    old batches; its copies (deepcopy, pickle, state dict) compute what it computes."""
    bn = anybn.BatchNorm(momentum=0.3)
    refs = []
    for k in range(BATCHES):
        host, x = _batch(backend, rng, k)
        bn(x)
        refs.append([weakref.ref(host)] + ([weakref.ref(x)] if k < BATCHES - 1 else []))
        if k == 0:
            after_one = _state_size(bn)
    del host, x
    gc.collect()
    assert _state_size(bn) == after_one
    assert type(bn.num_batches_tracked) is int and bn.num_batches_tracked == BATCHES
    alive = [k for k, r in enumerate(refs[:-1]) if any(ref() is not None for ref in r)]
    assert alive == [], f"the layer keeps batches {alive} alive"

    copies = _copies(bn)
    _, x = _batch(backend, rng, BATCHES)
    expected = backend.to_numpy(bn(x))
    for how, clone in copies.items():
        np.testing.assert_array_equal(backend.to_numpy(clone(x)), expected, err_msg=how)
        assert type(clone.running_mean) is type(bn.running_mean), how
        assert compat.device(clone.running_mean) == compat.device(bn.running_mean), how
        assert clone.num_batches_tracked == bn.num_batches_tracked, how
        for name in ("running_mean", "running_var"):
            np.testing.assert_array_equal(
                _host(getattr(clone, name)), _host(getattr(bn, name)), err_msg=f"{how} {name}"
            )
        clone.eval()
        bn.eval()
        np.testing.assert_array_equal(
            backend.to_numpy(clone(x)), backend.to_numpy(bn(x)), err_msg=f"{how} eval"
        )
        bn.train()


def _fails(block: np.ndarray) -> np.ndarray:
    raise ValueError("this chunk cannot be read")


def test_dask_batch_that_fails_to_compute_leaves_state(rng: np.random.Generator) -> None:
    """A training forward computes the new running statistics: a batch whose graph fails
    raises there, and the layer keeps the statistics it had (not a poisoned lazy one)."""
    da = pytest.importorskip("dask.array")
    bn = anybn.BatchNorm(C)
    bn(da.from_array(rng.standard_normal((6, C, 4)), chunks=(3, C, 2)))
    before = _snapshot(bn)
    bad = da.from_array(rng.standard_normal((6, C, 4)), chunks=(3, C, 2))
    bad = bad.map_blocks(_fails, dtype=bad.dtype, meta=np.empty((0, 0, 0)))
    with pytest.raises(ValueError, match="cannot be read"):
        bn(bad)
    _assert_same_snapshot(before, _snapshot(bn))
    bn.eval()
    y = bn(bad)  # eval stores nothing and computes nothing: y stays lazy
    assert compat.is_dask_array(y)


def test_dask_forward_keeps_y_lazy(rng: np.random.Generator) -> None:
    da = pytest.importorskip("dask.array")
    x = rng.standard_normal((6, C, 4))
    bn = anybn.BatchNorm(C)
    y = bn(da.from_array(x, chunks=(3, C, 2)))
    assert compat.is_dask_array(y)
    reference = anybn.BatchNorm(C)
    np.testing.assert_allclose(y.compute(), reference(x), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(bn.running_var.compute(), reference.running_var, rtol=1e-12)
    grads = bn.backward(da.from_array(x[::-1].copy(), chunks=(3, C, 2)))
    expected = reference.backward(x[::-1].copy())
    np.testing.assert_allclose(grads.dx.compute(), expected.dx, rtol=1e-10, atol=1e-12)


def test_layer_inside_a_jax_transformation(rng: np.random.Generator) -> None:
    """Training under jax.jit would store tracers: a clear error, the state as it was;
    eval under jit (nothing stored) matches the eager call."""
    jax = require("jax").lib
    jnp = jax.numpy
    x = jnp.asarray(rng.standard_normal((6, C, 4)))
    bn = anybn.BatchNorm()
    bn(x)
    before = _snapshot(bn)
    with pytest.raises(RuntimeError, match=r"inside a JAX transformation.*running_mean"):
        jax.jit(lambda a: bn(a))(x)
    _assert_same_snapshot(before, _snapshot(bn))
    bn(x)  # still works: no tracer was kept
    assert bn.num_batches_tracked == 2
    bn.eval()
    np.testing.assert_allclose(jax.jit(lambda a: bn(a))(x), bn(x), rtol=1e-12, atol=1e-12)
    unbound = anybn.BatchNorm().eval()
    with pytest.raises(RuntimeError, match="weight, bias, running_mean, running_var"):
        jax.jit(lambda a: unbound(a))(x)
    assert unbound.weight is None and unbound._storage is None


_JAX_DEVICE_SCRIPT = """
import copy, pickle
import jax, jax.numpy as jnp, numpy as np
import anybn

second = jax.devices()[1]
x = jax.device_put(jnp.asarray(np.arange(24.0).reshape(4, 3, 2) ** 1.5), second)
for bn in (anybn.BatchNorm(), anybn.BatchNorm(3, xp=jnp, device=second)):
    bn(x)
    for clone in (copy.deepcopy(bn), pickle.loads(pickle.dumps(bn))):
        for a in (clone.weight, clone.running_mean):
            assert a.devices() == {second}, a.devices()
        y, expected = clone(x), bn(x)
        assert y.devices() == {second}
        np.testing.assert_array_equal(np.asarray(y), np.asarray(expected))
print("ok")
"""


def test_jax_layer_copies_stay_on_their_device() -> None:
    """A copy of a layer on JAX's second device holds its arrays there and keeps working
    (JAX itself unpickles arrays onto the default device). Two CPU devices, in a child."""
    require("jax")
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([str(Path(anybn.__file__).parents[1]), *sys.path]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", _JAX_DEVICE_SCRIPT], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


def test_sparse_layer_state_does_not_grow_and_copies(rng: np.random.Generator) -> None:
    """pydata-sparse, the other library the layer binds to outside the matrix: the same checks."""
    sparse = pytest.importorskip("sparse")
    bn = anybn.BatchNorm(momentum=0.3)
    for k in range(BATCHES):
        bn(sparse.COO.from_numpy(rng.standard_normal((6, C, 4)) + k % 5))
        if k == 0:
            after_one = _state_size(bn)
    assert _state_size(bn) == after_one and bn.num_batches_tracked == BATCHES
    x = sparse.COO.from_numpy(rng.standard_normal((6, C, 4)))
    copies = _copies(bn)
    expected = bn(x).todense()
    for how, clone in copies.items():
        np.testing.assert_array_equal(clone(x).todense(), expected, err_msg=how)
        assert type(clone.running_mean) is type(bn.running_mean), how
        np.testing.assert_array_equal(
            clone.running_var.todense(), bn.running_var.todense(), err_msg=how
        )


# --- the call the layer keeps resolved between calls ---------------------------------------


def _functional_steps(xs: list[np.ndarray], *, momentum: float | None) -> list[np.ndarray]:
    """The layer's training semantics written with the functional API (the oracle)."""
    rm, rv = np.zeros(C), np.ones(C)
    ys = []
    for step, x in enumerate(xs, start=1):
        factor = 1.0 / step if momentum is None else momentum
        out = anybn.batch_norm(x, rm, rv, np.ones(C), np.zeros(C), training=True, momentum=factor)
        rm, rv = out.new_running_mean, out.new_running_var
        ys.append(out.y)
    ys.append(anybn.batch_norm(xs[0], rm, rv, np.ones(C), np.zeros(C), training=False).y)
    return ys


@pytest.mark.parametrize("momentum", [0.1, None])
def test_kept_call_gives_the_functional_results_bit_for_bit(momentum: float | None) -> None:
    """Repeated calls (the kept call) equal fresh functional calls, counter and all."""
    rng = np.random.default_rng(7)
    xs = [rng.standard_normal((6, C)) for _ in range(4)]
    bn = anybn.BatchNorm(C, momentum=momentum)
    ys = [bn(x) for x in xs]
    bn.eval()
    ys.append(bn(xs[0]))
    for got, want in zip(ys, _functional_steps(xs, momentum=momentum), strict=True):
        np.testing.assert_array_equal(got, want)
    assert bn.num_batches_tracked == 4


def test_kept_call_rechecks_what_changed_since() -> None:
    """Options or arrays changed after a call are checked again, with the same errors."""
    x = np.random.default_rng(0).standard_normal((6, C))
    bn = anybn.BatchNorm(C)
    bn(x)
    bn.running_var = bn.running_var.astype(np.float32)  # no longer x's dtype family
    with pytest.raises(TypeError, match="running_var"):
        bn(x)
    bn.running_var = np.ones(C)
    bn.momentum = 2.0
    before = (bn.running_mean.copy(), bn.num_batches_tracked)
    with pytest.raises(ValueError, match="momentum"):
        bn(x)
    np.testing.assert_array_equal(bn.running_mean, before[0])
    assert bn.num_batches_tracked == before[1]
    bn.momentum = 0.1
    with pytest.raises(ValueError, match="channels"):
        bn(np.ones((6, C + 1)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bn(np.ones((1, C)))
    bn(np.ones((10, C)))  # another batch size: resolved afresh, not refused
    assert bn.num_batches_tracked == 2


def test_kept_call_rechecks_an_option_reassigned_to_an_equal_value_of_another_type() -> None:
    """``training = 1`` equals True but is not a bool: the next call checks it and raises."""
    x = np.random.default_rng(1).standard_normal((6, C))
    bn = anybn.BatchNorm(C)
    bn(x)
    bn.training = 1  # type: ignore[assignment]
    before = (bn.running_mean.copy(), bn.num_batches_tracked)
    with pytest.raises(TypeError, match="training"):
        bn(x)
    np.testing.assert_array_equal(bn.running_mean, before[0])
    assert bn.num_batches_tracked == before[1]


def test_kept_call_uses_arrays_replaced_by_ones_of_the_same_kind() -> None:
    """New weight and running arrays (an optimizer step that rebinds) are used, not the old."""
    rng = np.random.default_rng(2)
    x = rng.standard_normal((6, C))
    bn = anybn.BatchNorm(C)
    bn(x)
    w, b, rm, rv = rng.uniform(0.5, 2, C), rng.normal(size=C), rng.normal(size=C), np.full(C, 2.0)
    bn.weight, bn.bias, bn.running_mean, bn.running_var = w, b, rm, rv
    want = anybn.batch_norm(x, rm, rv, w, b, training=True)
    np.testing.assert_array_equal(bn(x), want.y)
    np.testing.assert_array_equal(bn.running_mean, want.new_running_mean)
    bn.eval()
    np.testing.assert_array_equal(
        bn(x), anybn.batch_norm(x, want.new_running_mean, want.new_running_var, w, b).y
    )
