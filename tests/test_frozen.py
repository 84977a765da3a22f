"""Frozen batch norms: ``anybn.torch.FrozenBatchNorm*``, ``anybn.torch.freeze`` and the frozen
mode of ``anybn.BatchNorm``.

The anchor is torchvision's ``FrozenBatchNorm2d`` where torchvision is installed, and its
formula in float64 everywhere: ``(x - running_mean) / sqrt(running_var + eps) * weight + bias``.
"""

from __future__ import annotations

import copy
import pickle
from typing import Any

import numpy as np
import pytest
from _helpers import assert_close, host

import anybn
from anybn._testing.backends import get_backend
from anybn.distributed import Communicator


def _formula(x: np.ndarray, rm: np.ndarray, rv: np.ndarray, w: np.ndarray, b: np.ndarray,
             eps: float, axis: int = 1) -> np.ndarray:  # fmt: skip
    shape = [1] * x.ndim
    shape[axis] = -1
    v = [np.reshape(a, shape) for a in (rm, rv, w, b)]
    return (x - v[0]) / np.sqrt(v[1] + eps) * v[2] + v[3]


# --- anybn.torch.FrozenBatchNorm* ---------------------------------------------------------


@pytest.fixture
def torch() -> Any:
    return pytest.importorskip("torch")


def _filled(torch: Any, bn: Any, seed: int = 0) -> Any:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in ("weight", "bias", "running_mean"):
            getattr(bn, name).copy_(torch.randn(bn.weight.shape, generator=g) * 3)
        bn.running_var.copy_(torch.rand(bn.weight.shape, generator=g) * 0.01)  # eps matters
    return bn


@pytest.mark.parametrize(("cls", "shape"), [("FrozenBatchNorm1d", (4, 3)),
                                            ("FrozenBatchNorm1d", (4, 3, 5)),
                                            ("FrozenBatchNorm2d", (4, 3, 5, 5)),
                                            ("FrozenBatchNorm3d", (2, 3, 2, 3, 3)),
                                            ("FrozenBatchNorm", (2, 3, 4, 1, 2, 2))])  # fmt: skip
@pytest.mark.parametrize("eps", [1e-5, 0.5])
def test_formula_in_training_and_eval(torch: Any, cls: str, shape: tuple, eps: float) -> None:
    """The eval formula, eps inside the square root, in both modes; no parameters; x gets grad."""
    import anybn.torch

    bn = _filled(torch, getattr(anybn.torch, cls)(3, eps=eps).double())
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    arrays = [getattr(bn, k).numpy() for k in ("running_mean", "running_var", "weight", "bias")]
    want = _formula(x.detach().numpy(), *arrays, eps)
    for mode in (True, False):
        y = bn.train(mode)(x)
        np.testing.assert_allclose(y.detach().numpy(), want, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), np.broadcast_to(
        (arrays[2] / np.sqrt(arrays[1] + eps)).reshape([1, 3] + [1] * (x.dim() - 2)), shape),
        rtol=1e-12)  # fmt: skip
    assert list(bn.parameters()) == []
    assert sorted(bn.state_dict()) == ["bias", "running_mean", "running_var", "weight"]


def test_half_precision_input_keeps_its_dtype(torch: Any) -> None:
    import anybn.torch

    bn = _filled(torch, anybn.torch.FrozenBatchNorm2d(3))
    x = torch.randn(2, 3, 4, 4).half()
    y = bn(x)
    assert y.dtype == torch.float16
    want = _formula(x.double().numpy(), *(getattr(bn, k).double().numpy() for k in
                    ("running_mean", "running_var", "weight", "bias")), bn.eps)  # fmt: skip
    np.testing.assert_allclose(y.double().numpy(), want, rtol=2e-3, atol=2e-3 * np.abs(want).max())


@pytest.mark.parametrize(
    ("cls", "bad"),
    [("FrozenBatchNorm1d", 4), ("FrozenBatchNorm2d", 3), ("FrozenBatchNorm3d", 4),
     ("FrozenBatchNorm", 1)],
)  # fmt: skip
def test_input_rank_checked(torch: Any, cls: str, bad: int) -> None:
    import anybn.torch

    with pytest.raises(ValueError, match=f"input \\(got {bad}D input\\)"):
        getattr(anybn.torch, cls)(3)(torch.zeros((2, 3, 4, 5, 6)[:bad]))


def test_loads_batch_norm_checkpoints_silently(torch: Any) -> None:
    """A BatchNorm2d state dict (with num_batches_tracked) loads strictly; the dict passed is
    not modified; eps is the frozen module's."""
    import anybn.torch

    source = _filled(torch, torch.nn.BatchNorm2d(3))
    state = {f"bn.{k}": v for k, v in source.state_dict().items()}
    keys = sorted(state)
    model = torch.nn.Module()
    model.bn = anybn.torch.FrozenBatchNorm2d(3)
    assert str(model.load_state_dict(state)) == "<All keys matched successfully>"
    assert sorted(state) == keys  # nothing deleted from the caller's dict
    x = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(model.bn(x), source.eval()(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        model.load_state_dict({**state, "bn.other": torch.zeros(1)})
    assert repr(model.bn) == "FrozenBatchNorm2d(3, eps=1e-05)"


def test_against_torchvision(torch: Any) -> None:
    """torchvision's FrozenBatchNorm2d: the same state-dict keys both ways, the same output up
    to float32 rounding, closer to float64 where the running mean is large."""
    misc = pytest.importorskip("torchvision.ops.misc")
    import anybn.torch

    theirs = _filled(torch, misc.FrozenBatchNorm2d(3, eps=1e-3))
    with torch.no_grad():
        theirs.running_mean.add_(1e3)
    ours = anybn.torch.FrozenBatchNorm2d(3, eps=1e-3)
    ours.load_state_dict(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict())
    assert sorted(ours.state_dict()) == sorted(theirs.state_dict())
    assert repr(ours) == repr(theirs)
    x = theirs.running_mean.reshape(1, 3, 1, 1) + torch.randn(8, 3, 6, 6)
    arrays = [getattr(ours, k).double().numpy()
              for k in ("running_mean", "running_var", "weight", "bias")]  # fmt: skip
    exact = torch.from_numpy(_formula(x.double().numpy(), *arrays, 1e-3))
    err_ours = (ours(x).double() - exact).abs().max()
    err_theirs = (theirs(x).double() - exact).abs().max()
    assert err_ours <= err_theirs
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-3, atol=1e-2)


def test_bad_arguments(torch: Any) -> None:
    import anybn.torch

    with pytest.raises(ValueError, match="num_features"):
        anybn.torch.FrozenBatchNorm2d(-1)
    with pytest.raises(ValueError, match="eps must be a number >= 0"):
        anybn.torch.FrozenBatchNorm2d(3, eps=-1.0)


# --- anybn.torch.freeze -----------------------------------------------------------------------


def test_freeze_replaces_every_batch_norm(torch: Any) -> None:
    import anybn.torch

    nn = torch.nn
    shared = nn.BatchNorm1d(4, eps=1e-3)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), anybn.torch.BatchNorm2d(4, affine=False),
        nn.SyncBatchNorm(4), anybn.torch.SyncBatchNorm(4), nn.Flatten(2),
        shared, shared, nn.Conv3d(1, 2, 1),
    )  # fmt: skip
    model.append(nn.BatchNorm3d(2, eps=0.25))
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                if m.affine:
                    m.weight.normal_()
    model.eval()
    hits: list[int] = []
    model[1].register_forward_hook(lambda m, i, o: hits.append(1))
    expected = {i: copy.deepcopy(model[i]) for i in (1, 2, 3, 4, 6, 9)}
    frozen = anybn.torch.freeze(model)
    assert frozen is model
    kinds = {i: type(model[i]).__name__ for i in expected}
    assert kinds == {
        1: "FrozenBatchNorm2d", 2: "FrozenBatchNorm2d", 3: "FrozenBatchNorm",
        4: "FrozenBatchNorm", 6: "FrozenBatchNorm1d", 9: "FrozenBatchNorm3d",
    }  # fmt: skip
    assert model[6] is model[7]  # a shared batch norm stays shared
    assert model[9].eps == 0.25 and model[6].eps == 1e-3
    assert list(model[1].parameters()) == []
    model.train()  # frozen: the eval output in training mode too, nothing updated
    for i, original in expected.items():
        x = torch.randn((2, 4, 3, 3) if i < 6 else (2, 4, 5) if i == 6 else (1, 2, 2, 2, 2))
        torch.testing.assert_close(model[i](x), original.eval()(x))
    assert hits  # the hook came along
    assert model[1].running_mean.data_ptr() != expected[1].running_mean.data_ptr()


def test_freeze_without_running_statistics_raises_and_leaves_the_model(torch: Any) -> None:
    import anybn.torch

    nn = torch.nn
    model = nn.Sequential(nn.BatchNorm2d(3), nn.BatchNorm2d(3, track_running_stats=False))
    before = [type(m) for m in model]
    with pytest.raises(ValueError, match=r"BatchNorm2d '1' has no running statistics"):
        anybn.torch.freeze(model)
    assert [type(m) for m in model] == before
    with pytest.raises(ValueError, match="lazy batch norm"):
        anybn.torch.freeze(nn.Sequential(nn.LazyBatchNorm2d()))
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        anybn.torch.freeze("model")  # type: ignore[arg-type]


def test_freeze_a_single_batch_norm(torch: Any) -> None:
    import anybn.torch

    bn = torch.nn.BatchNorm1d(3, affine=False).double()
    frozen = anybn.torch.freeze(bn)
    assert type(frozen).__name__ == "FrozenBatchNorm1d" and frozen.weight.dtype == torch.float64
    torch.testing.assert_close(frozen.weight, torch.ones(3, dtype=torch.float64))


# --- anybn.BatchNorm(frozen=True) -------------------------------------------------------------


def _trained_layer(backend: Any, rng: np.random.Generator, **options: Any) -> anybn.BatchNorm:
    bn = anybn.BatchNorm(3, dtype="float64", **options)  # the first input decides the library
    bn.load_state_dict({
        "weight": backend.asarray(rng.normal(size=3)), "bias": backend.asarray(rng.normal(size=3)),
        "running_mean": backend.asarray(rng.normal(size=3)),
        "running_var": backend.asarray(rng.uniform(0.5, 2.0, 3)), "num_batches_tracked": 7,
    })  # fmt: skip
    return bn


@pytest.mark.parametrize(
    "backend",
    [pytest.param(get_backend(b), id=b) for b in ("numpy", "torch", "jax", "dask",
                                                  "array_api_strict")],
    indirect=True,
)
def test_layer_frozen_mode(backend: Any, rng: np.random.Generator) -> None:
    """Training mode with frozen=True: the eval forward, running statistics and counter as they
    were, and the eval backward (dx, dweight, dbias through the running statistics)."""
    bn = _trained_layer(backend, rng, eps=1e-3)
    bn.freeze()
    assert bn.training and bn.frozen
    before = {k: host(v) for k, v in bn.state_dict().items()}
    x = rng.normal(size=(5, 3, 2)) * 2 + 1
    dy = rng.normal(size=x.shape)
    for _ in range(2):  # the second call takes the kept call
        y = bn(backend.asarray(x))
        grads = bn.backward(backend.asarray(dy))
    state = {k: host(v) for k, v in bn.state_dict().items()}
    for k, v in before.items():
        np.testing.assert_array_equal(state[k], v)
    rm, rv, w, b = (before[k] for k in ("running_mean", "running_var", "weight", "bias"))
    assert_close(y, _formula(x, rm, rv, w, b, 1e-3))
    invstd = 1.0 / np.sqrt(rv + 1e-3)
    xhat = (x - rm.reshape(1, 3, 1)) * invstd.reshape(1, 3, 1)
    assert_close(grads.dx, dy * (w * invstd).reshape(1, 3, 1))
    assert_close(grads.dweight, (dy * xhat).sum((0, 2)))
    assert_close(grads.dbias, dy.sum((0, 2)))
    bn.freeze(False)  # unfrozen: training statistics again, the kept call dropped
    bn(backend.asarray(x))
    assert bn.num_batches_tracked == 8


def test_layer_frozen_errors_leave_state() -> None:
    with pytest.raises(ValueError, match="no running statistics to freeze"):
        anybn.BatchNorm(3, track_running_stats=False, frozen=True)
    bn = anybn.BatchNorm(3, track_running_stats=False)
    with pytest.raises(ValueError, match="no running statistics to freeze"):
        bn.freeze()
    assert bn.frozen is False
    with pytest.raises(TypeError, match="mode must be a bool"):
        anybn.BatchNorm(3).freeze("yes")  # type: ignore[arg-type]
    bn = anybn.BatchNorm(3)
    bn.frozen = "yes"  # type: ignore[assignment]
    with pytest.raises(TypeError, match="frozen must be a bool"):
        bn(np.ones((2, 3)))
    assert bn.num_batches_tracked == 0


class _Refuse(Communicator):
    """A communicator that fails any collective: a frozen layer must never call one."""

    rank, size = 0, 2

    def all_gather(self, a: Any) -> Any:
        raise AssertionError("collective called")

    all_reduce = all_gather

    def all_gather_ints(self, values: list[int], like: Any = None) -> list[list[int]]:
        raise AssertionError("collective called")


def test_layer_frozen_with_comm_communicates_nothing() -> None:
    bn = anybn.BatchNorm(2, comm=_Refuse(), frozen=True)
    y = bn(np.array([[1.0, 2.0], [3.0, 4.0]]))
    np.testing.assert_allclose(y, np.array([[1.0, 2.0], [3.0, 4.0]]) / np.sqrt(1 + 1e-5))
    with pytest.raises(ValueError, match="at least 2 dimensions"):  # fails locally, no collective
        bn(np.ones(3))


def test_layer_frozen_copies_and_repr() -> None:
    bn = anybn.BatchNorm(2, frozen=True)
    assert "frozen=True" in repr(bn)
    assert copy.deepcopy(bn).frozen and pickle.loads(pickle.dumps(bn)).frozen
    assert "frozen" not in repr(anybn.BatchNorm(2))
