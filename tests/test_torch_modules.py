"""anybn.torch: the nn.BatchNorm1d/2d/3d drop-ins and convert(), against torch itself.

Every test runs the same inputs through ``torch.nn.BatchNorm*d`` and the anybn
drop-in with identical state, and compares outputs, gradients, running
statistics, counters and state dicts. CUDA rows skip without a GPU.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import anybn.torch as abt  # noqa: E402

PAIRS = {1: (nn.BatchNorm1d, abt.BatchNorm1d), 2: (nn.BatchNorm2d, abt.BatchNorm2d),
         3: (nn.BatchNorm3d, abt.BatchNorm3d)}  # fmt: skip
#: An input shape per (dims, rank): 1d takes (N, C) and (N, C, L).
SHAPES = {(1, 2): (8, 3), (1, 3): (4, 3, 5), (2, 4): (4, 3, 3, 2), (3, 5): (2, 3, 2, 3, 2)}


@pytest.fixture(params=["cpu", "cuda"])
def device(request: pytest.FixtureRequest) -> str:
    """CPU, and CUDA where a GPU is available."""
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("torch.cuda.is_available() is False (no CUDA GPU)")
    return str(request.param)


@pytest.fixture
def gen() -> Any:
    """A seeded generator for the test data (created on the CPU, then moved)."""
    return torch.Generator().manual_seed(20261125)


def _randn(gen: Any, shape: tuple[int, ...], device: str, **kwargs: Any) -> Any:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device, **kwargs)


def _pair(dims: int, device: str, gen: Any, **options: Any) -> tuple[Any, Any]:
    """A torch batch norm with random affine parameters, and its anybn twin."""
    ref_cls, our_cls = PAIRS[dims]
    ref = ref_cls(3, device=device, **options)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(3, generator=gen) + 0.5)
            ref.bias.copy_(torch.randn(3, generator=gen))
    ours = our_cls(3, device=device, **options)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def _run(module: Any, x: Any, dy: Any) -> dict[str, Any]:
    """Forward and (if x requires grad) backward; outputs and gradients by name."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(x.requires_grad)
    y = module(x)
    out = {"y": y}
    if x.requires_grad:
        y.backward(dy)
        out["dx"] = x.grad
        for name, p in module.named_parameters():
            out[f"d{name}"] = p.grad
    return out


def _assert_modules_agree(ref: Any, ours: Any, **tol: float) -> None:
    ref_state, our_state = ref.state_dict(), ours.state_dict()
    assert list(our_state) == list(ref_state)
    for k, v in ref_state.items():
        torch.testing.assert_close(our_state[k], v, msg=k, **tol)
    assert ours.training == ref.training


def _assert_runs_agree(ref: Any, ours: Any, x: Any, dy: Any, **tol: float) -> dict[str, Any]:
    expected, actual = _run(ref, x, dy), _run(ours, x, dy)
    assert actual.keys() == expected.keys()
    for k, v in expected.items():
        torch.testing.assert_close(actual[k], v, msg=k, **tol)
    _assert_modules_agree(ref, ours, **tol)
    return actual


OPTIONS = [
    pytest.param({}, id="defaults"),
    pytest.param({"momentum": None}, id="cumulative"),
    pytest.param({"affine": False, "eps": 1e-3}, id="no-affine"),
    pytest.param({"track_running_stats": False}, id="no-tracking"),
    pytest.param({"momentum": 0.3, "track_running_stats": False, "affine": False}, id="bare"),
]


@pytest.mark.parametrize(("dims", "rank"), list(SHAPES))
@pytest.mark.parametrize("options", OPTIONS)
def test_matches_torch(
    device: str, gen: Any, dims: int, rank: int, options: dict[str, Any]
) -> None:
    ref, ours = _pair(dims, device, gen, **options)
    shape = SHAPES[dims, rank]
    for step, training in enumerate((True, True, False, True, False)):
        ref.train(training)
        ours.train(training)
        x = _randn(gen, shape, device) * (step + 1) + step
        dy = _randn(gen, shape, device)
        _assert_runs_agree(ref, ours, x.float().requires_grad_(), dy.float())


def test_is_a_torch_batchnorm_with_torchs_repr() -> None:
    for ref_cls, our_cls in PAIRS.values():
        ours = our_cls(4, momentum=None, affine=False)
        assert isinstance(ours, ref_cls)
        assert repr(ours) == repr(ref_cls(4, momentum=None, affine=False))


@pytest.mark.parametrize("dims", list(PAIRS))
def test_rank_errors_are_torchs(dims: int) -> None:
    ref_cls, our_cls = PAIRS[dims]
    ref, ours = ref_cls(3), our_cls(3)
    for rank in range(1, 7):
        x = torch.randn((2, 3, 2, 2, 2, 2)[:rank])
        try:
            ref(x)
        except ValueError as exc:
            with pytest.raises(ValueError) as raised:
                ours(x)
            assert str(raised.value) == str(exc)
        else:
            ours(x)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) > 0


def test_failed_forward_leaves_state(gen: Any) -> None:
    """Unlike torch (which increments the counter first), a failed forward changes nothing.

    The exception is torch's own (type and message) for the same input.
    """
    ours = abt.BatchNorm2d(3)
    ours(torch.randn(4, 3, 2, 2, generator=gen))
    before = copy.deepcopy(ours.state_dict())
    for bad in (torch.randn(1, 3, 1, 1), torch.randn(4, 5, 2, 2), torch.ones(4, 3, 2, 2).long()):
        with pytest.raises(Exception) as theirs:
            nn.BatchNorm2d(3)(bad)
        with pytest.raises(type(theirs.value), match=re.escape(str(theirs.value))):
            ours(bad)
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_gradcheck_and_gradgradcheck(device: str, gen: Any, training: bool, affine: bool) -> None:
    x = _randn(gen, (4, 3, 5), device).requires_grad_()
    params = [_randn(gen, (3,), device).requires_grad_() for _ in range(2)] if affine else []
    running = (_randn(gen, (3,), device), _randn(gen, (3,), device).abs() + 0.5)

    def f(x: Any, *wb: Any) -> Any:
        # Fresh copies: training updates the running statistics in place.
        rm, rv = running[0].clone(), running[1].clone()
        return abt.batch_norm(x, rm, rv, *wb, training=training, momentum=0.2, eps=1e-3)

    inputs = (x, *params)
    assert torch.autograd.gradcheck(f, inputs)
    assert torch.autograd.gradgradcheck(f, inputs)


def test_double_backward_matches_torch(device: str, gen: Any) -> None:
    """A gradient penalty: d/dw |dL/dx|^2 through both implementations.

    In float64: d/dbias is zero up to rounding, and in float32 that rounding
    (~1e-4 against gradients of ~1e3) differs between any two implementations.
    """
    ref, ours = _pair(2, device, gen)
    ref.double()
    ours.double()
    x = _randn(gen, (4, 3, 2, 2), device).double()
    grads = []
    for module in (ref, ours):
        xi = x.clone().requires_grad_()
        (dx,) = torch.autograd.grad((module(xi) ** 3).sum(), xi, create_graph=True)
        grads.append(torch.autograd.grad((dx**2).sum(), [xi, module.weight, module.bias]))
    for expected, actual in zip(*grads, strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize(("dims", "memory_format"), [(2, "channels_last"), (3, "channels_last_3d")])
def test_channels_last(device: str, gen: Any, dims: int, memory_format: str) -> None:
    fmt = getattr(torch, memory_format)
    ref, ours = _pair(dims, device, gen)
    shape = (4, 3, 3, 2) if dims == 2 else (2, 3, 2, 3, 2)
    x = _randn(gen, shape, device).float().contiguous(memory_format=fmt).requires_grad_()
    dy = _randn(gen, shape, device).float().contiguous(memory_format=fmt)
    actual = _assert_runs_agree(ref, ours, x, dy)
    assert actual["y"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("context", [torch.no_grad, torch.inference_mode], ids=lambda c: c.__name__)
def test_without_autograd(device: str, gen: Any, context: Callable[[], Any]) -> None:
    ref, ours = _pair(2, device, gen, momentum=None)
    for training in (True, True, False):
        ref.train(training)
        ours.train(training)
        x = _randn(gen, (4, 3, 2, 2), device).float().requires_grad_()
        with context():
            y_ref, y = ref(x), ours(x)
        assert not y.requires_grad
        torch.testing.assert_close(y, y_ref)
        _assert_modules_agree(ref, ours)


@pytest.mark.parametrize("half", ["float16", "bfloat16"])
def test_half_inputs_with_float32_parameters(device: str, gen: Any, half: str) -> None:
    dtype = getattr(torch, half)
    ref, ours = _pair(2, device, gen)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype == torch.bfloat16 else {"rtol": 2e-3, "atol": 2e-3}
    for training in (True, False):
        ref.train(training)
        ours.train(training)
        x = (_randn(gen, (8, 3, 2, 2), device) * 2 + 1).to(dtype).requires_grad_()
        dy = _randn(gen, (8, 3, 2, 2), device).to(dtype)
        actual = _assert_runs_agree(ref, ours, x, dy, **tol)
        assert actual["y"].dtype == actual["dx"].dtype == dtype
        assert actual["dweight"].dtype == ours.running_var.dtype == torch.float32


# --- convert ---------------------------------------------------------------------------


class _OwnBatchNorm(nn.BatchNorm1d):
    """A user subclass: its behaviour may differ, so convert() leaves it alone."""


def _model() -> Any:
    return nn.Sequential(
        nn.Conv2d(2, 3, 3),
        nn.BatchNorm2d(3, momentum=None),
        nn.Sequential(nn.Flatten(2), nn.BatchNorm1d(3, affine=False)),
        nn.Flatten(),
        nn.Linear(3, 4),
        _OwnBatchNorm(4),
        nn.LazyBatchNorm1d(),
    )


def test_convert_replaces_and_keeps_state(gen: Any) -> None:
    model = _model()
    model(torch.randn(4, 2, 3, 3, generator=gen))  # materializes the lazy batch norm
    model[1].eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    tensors = {id(t) for t in (*model.parameters(), *model.buffers())}
    converted = abt.convert(model)
    assert converted is model
    assert type(model[1]) is abt.BatchNorm2d and type(model[2][1]) is abt.BatchNorm1d
    assert type(model[5]) is _OwnBatchNorm  # a subclass: left alone
    assert type(model[6]) is abt.BatchNorm1d  # a lazy batch norm is a BatchNorm1d once run
    assert model[1].training is False and model[2][1].training is True
    assert model[1].momentum is None and model[2][1].affine is False
    # The very same tensor objects: an optimizer built before convert() keeps working.
    assert {id(t) for t in (*model.parameters(), *model.buffers())} == tensors
    after = model.state_dict()
    assert list(after) == list(before)
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert abt.convert(model) is model and type(model[1]) is abt.BatchNorm2d


def test_convert_a_single_module() -> None:
    lazy = nn.LazyBatchNorm2d()
    assert abt.convert(lazy) is lazy
    bn = nn.BatchNorm3d(5, track_running_stats=False)
    converted = abt.convert(bn)
    assert type(converted) is abt.BatchNorm3d
    assert converted.weight is bn.weight and converted.running_mean is None
    assert not any(t.is_meta for t in converted.state_dict().values())


def _cnn(gen: Any) -> Any:
    torch.manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen)))
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.BatchNorm2d(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _train(model: Any, x: Any, labels: Any, steps: int) -> list[float]:
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    losses = []
    for step in range(steps):
        batch = slice((step % 4) * 16, (step % 4) * 16 + 16)
        loss = nn.functional.cross_entropy(model(x[batch]), labels[batch])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_cnn_trains_like_torch(device: str, gen: Any) -> None:
    """Two conv+BN+ReLU blocks, 30 SGD steps: converted and original agree to float32."""
    reference = _cnn(gen).to(device)
    converted = abt.convert(copy.deepcopy(reference))
    x = torch.randn(64, 3, 8, 8, generator=gen)
    labels = (x.mean(dim=(2, 3)) @ torch.randn(3, 4, generator=gen)).argmax(dim=1)
    x, labels = x.to(device), labels.to(device)
    expected, actual = _train(reference, x, labels, 30), _train(converted, x, labels, 30)
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)
    assert sum(actual[-4:]) < 0.8 * sum(actual[:4])
    _assert_modules_agree(reference, converted, rtol=1e-4, atol=1e-5)
    reference.eval()
    converted.eval()
    torch.testing.assert_close(converted(x), reference(x), rtol=1e-4, atol=1e-5)


def test_input_changed_in_place_after_forward_makes_backward_raise_as_nn_does() -> None:
    for module in (nn.BatchNorm1d(4), abt.BatchNorm1d(4)):
        x = torch.randn(8, 4, requires_grad=True)
        a = x * 1.0
        y = module(a)
        a.add_(1.0)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            y.sum().backward()


def test_running_statistics_given_as_2d_views_are_updated() -> None:
    """Running statistics that are not 1-D (the functional drop-in) are updated in place."""
    x = torch.randn(8, 4) * 3 + 1
    rm, rv = torch.zeros(1, 4), torch.ones(1, 4)
    rm_n, rv_n = torch.zeros(4), torch.ones(4)
    abt.batch_norm(x, rm, rv, training=True)
    torch.nn.functional.batch_norm(x, rm_n, rv_n, training=True)
    torch.testing.assert_close(rm.reshape(4), rm_n)
    torch.testing.assert_close(rv.reshape(4), rv_n)
