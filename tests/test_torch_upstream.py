"""PyTorch's own batch-norm expectations, run against anybn.torch side by side with torch.nn.

The cases come from PyTorch's test suite itself, imported from
``torch.testing._internal``: the ``module_db`` entries of ``nn.BatchNorm1d/2d/3d``
(their module inputs, error inputs, and the ``test_modules.py`` checks of
forward, backward, channels_last, empty batches and ``load_state_dict``) and the
``op_db`` samples of ``nn.functional.batch_norm`` (``test_ops.py``: outputs,
gradients, forward-mode AD, running-statistics updates). Each case runs on
torch's module or function and on anybn's drop-in with the same inputs, and the
results must agree: the same outputs, gradients and buffers, or the same
exception type and message. The transforms (``torch.func``, ``torch.compile``,
``torch.export``, ``torch.jit``) are in ``tests/test_torch_transforms.py``.
"""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("expecttest", reason="torch.testing._internal needs expecttest")

from torch import nn  # noqa: E402
from torch.testing._internal.common_methods_invocations import op_db  # noqa: E402
from torch.testing._internal.common_modules import module_db  # noqa: E402

import anybn.torch as abt  # noqa: E402

DTYPES = [torch.float32, torch.float64]
MODULES = [m for m in module_db if m.module_cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)]
OURS = {
    nn.BatchNorm1d: abt.BatchNorm1d,
    nn.BatchNorm2d: abt.BatchNorm2d,
    nn.BatchNorm3d: abt.BatchNorm3d,
}
FUNCTIONAL = [o for o in op_db if o.name == "nn.functional.batch_norm" and not o.variant_test_name]


def _tol(dtype: Any) -> dict[str, float]:
    # anybn's statistics are at least as accurate as torch's; allow torch's own rounding.
    return (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    )


def _assert_close_scaled(actual: Any, expected: Any, dtype: Any, msg: str) -> None:
    """As :func:`_tol`, with ``atol`` relative to the natural scale ``max(1, max|expected|)``.

    For per-channel sums (parameter gradients): a channel whose sum nearly cancels
    still carries the rounding of its largest terms, in either summation order.
    """
    tol = _tol(dtype)
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    torch.testing.assert_close(
        actual, expected, rtol=tol["rtol"], atol=tol["atol"] * scale, msg=msg
    )


@pytest.fixture(autouse=True)
def _seeded() -> None:
    """torch's sample makers and ``randn_like`` draw from the global generator: seed it."""
    torch.manual_seed(20261126)


def _clone(value: Any) -> Any:
    """A deep copy of a (nested) argument, leaf tensors kept leaves with their requires_grad."""
    if isinstance(value, torch.Tensor):
        return value.detach().clone().requires_grad_(value.requires_grad)
    if isinstance(value, (list, tuple)):
        return type(value)(_clone(v) for v in value)
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    return value


def _pair(info: Any, module_input: Any, dtype: Any) -> tuple[nn.Module, nn.Module]:
    """torch's module and anybn's, built from the same constructor input, same state.

    As torch's ``test_modules.py`` does: construct, then ``.to(dtype)``.
    """
    args, kwargs = module_input.constructor_input.args, module_input.constructor_input.kwargs
    theirs = info.module_cls(*args, **kwargs).to(dtype)
    ours = OURS[info.module_cls](*args, **kwargs).to(dtype)
    ours.load_state_dict(theirs.state_dict())
    with torch.no_grad():  # non-trivial affine parameters, the same in both
        for p_theirs, p_ours in zip(theirs.parameters(), ours.parameters(), strict=True):
            p_theirs.uniform_(0.5, 1.5)
            p_ours.copy_(p_theirs)
    return theirs, ours


def _module_cases() -> list[Any]:
    cases = []
    for info in MODULES:
        for dtype in DTYPES:
            for training in (True, False):
                inputs = info.module_inputs_func(
                    info, device="cpu", dtype=dtype, requires_grad=True, training=training
                )
                for i, mi in enumerate(inputs):
                    mode = "train" if training else "eval"
                    name = f"{info.module_cls.__name__}-{mi.desc or i}-{mode}-{str(dtype)[6:]}"
                    cases.append(pytest.param(info, mi, training, dtype, id=name))
    return cases


def _assert_same_buffers(theirs: nn.Module, ours: nn.Module, dtype: Any) -> None:
    for (name, a), (_, b) in zip(theirs.named_buffers(), ours.named_buffers(), strict=True):
        assert not b.requires_grad, name
        torch.testing.assert_close(b, a, **_tol(dtype), msg=name)


@pytest.mark.parametrize(("info", "module_input", "training", "dtype"), _module_cases())
@pytest.mark.parametrize("memory_format", ["contiguous", "channels_last"])
def test_module_inputs(
    info: Any, module_input: Any, training: bool, dtype: Any, memory_format: str
) -> None:
    """torch's ``test_modules.py`` forward, backward and memory-format checks, against torch."""
    theirs, ours = _pair(info, module_input, dtype)
    theirs.train(training)
    ours.train(training)
    (x,) = module_input.forward_input.args
    if memory_format == "channels_last":
        if x.dim() not in (4, 5):
            pytest.skip("channels_last needs a 4-D or 5-D input")
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        x = x.detach().contiguous(memory_format=fmt).requires_grad_()
    x_theirs, x_ours = _clone(x), _clone(x)
    for step in range(2):  # two steps: the running statistics and the counter move
        y_theirs, y_ours = theirs(x_theirs), ours(x_ours)
        torch.testing.assert_close(y_ours, y_theirs, **_tol(dtype))
        assert y_ours.stride() == y_theirs.stride(), "the output keeps the input's memory format"
        grad = torch.randn_like(y_theirs) if y_theirs.numel() else torch.ones_like(y_theirs)
        y_theirs.backward(grad)
        y_ours.backward(grad.clone())
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **_tol(dtype))
        for (name, p), (_, q) in zip(
            theirs.named_parameters(), ours.named_parameters(), strict=True
        ):
            _assert_close_scaled(q.grad, p.grad, dtype, msg=f"step {step}: {name}")
        _assert_same_buffers(theirs, ours, dtype)
    # torch's test_modules checks that a module's state round-trips through load_state_dict
    fresh = OURS[info.module_cls](
        *module_input.constructor_input.args, **module_input.constructor_input.kwargs
    ).to(dtype)
    fresh.load_state_dict(ours.state_dict())
    _assert_same_buffers(theirs, fresh, dtype)


def _error_cases() -> list[Any]:
    cases = []
    for info in MODULES:
        for error in info.module_error_inputs_func(
            info, device="cpu", dtype=torch.float32, requires_grad=False, training=True
        ):
            cases.append(
                pytest.param(info, error, id=f"{info.module_cls.__name__}-{error.error_regex}")
            )
    return cases


@pytest.mark.parametrize(("info", "error"), _error_cases())
def test_module_error_inputs(info: Any, error: Any) -> None:
    """torch's ``module_error_inputs``: the same exception type and message regex."""
    mi = error.module_error_input
    args, kwargs = mi.constructor_input.args, mi.constructor_input.kwargs
    for cls in (info.module_cls, OURS[info.module_cls]):
        module = cls(*args, **kwargs)
        before = copy.deepcopy(module.state_dict())
        with pytest.raises(error.error_type, match=error.error_regex):
            module(*mi.forward_input.args, **mi.forward_input.kwargs)
    for name, value in module.state_dict().items():  # anybn's: nothing changed at all
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


def _functional_cases() -> list[Any]:
    cases = []
    for op in FUNCTIONAL:
        for dtype in DTYPES:
            for i, sample in enumerate(
                op.sample_inputs("cpu", dtype, requires_grad=dtype == torch.float64)
            ):
                cases.append(pytest.param(sample, dtype, id=f"{str(dtype)[6:]}-{i}"))
    return cases


@pytest.mark.parametrize(("sample", "dtype"), _functional_cases())
def test_functional_samples(sample: Any, dtype: Any) -> None:
    """``op_db``'s ``nn.functional.batch_norm`` samples: outputs, updates, errors, gradients."""
    import torch.nn.functional as F

    outcomes = []
    for fn in (F.batch_norm, abt.batch_norm):
        x, args, kwargs = _clone(sample.input), _clone(sample.args), _clone(sample.kwargs)
        try:
            y = fn(x, *args, **kwargs)
        except Exception as exc:
            outcomes.append((exc, x, args))
            continue
        outcomes.append((y, x, args))
    (theirs, x_t, args_t), (ours, x_o, args_o) = outcomes
    if isinstance(theirs, Exception):
        assert type(ours) is type(theirs), (ours, theirs)
        assert re.escape(str(theirs)) and str(ours) == str(theirs)
        return
    assert not isinstance(ours, Exception), ours
    torch.testing.assert_close(ours, theirs, **_tol(dtype))
    for a, b in zip(args_o, args_t, strict=True):  # running statistics updated alike
        if isinstance(a, torch.Tensor):
            torch.testing.assert_close(a, b, **_tol(dtype))
    if dtype != torch.float64 or not theirs.requires_grad:
        return
    grad = torch.randn_like(theirs)
    leaves_t = [t for t in (x_t, *args_t) if isinstance(t, torch.Tensor) and t.requires_grad]
    leaves_o = [t for t in (x_o, *args_o) if isinstance(t, torch.Tensor) and t.requires_grad]
    for g_o, g_t in zip(
        torch.autograd.grad(ours, leaves_o, grad, allow_unused=True),
        torch.autograd.grad(theirs, leaves_t, grad, allow_unused=True),
        strict=True,
    ):
        if g_t is None:
            assert g_o is None or not g_o.any()
        else:
            torch.testing.assert_close(g_o, g_t, **_tol(dtype))


@pytest.mark.parametrize("index", range(3))
def test_functional_gradcheck_forward_ad(index: int) -> None:
    """torch's OpInfo marks batch_norm as supporting forward AD and fwgrad_bwgrad: check both.

    On the samples with at most 72 values (gradcheck's cost grows with the square).
    """
    samples = [
        s
        for s in FUNCTIONAL[0].sample_inputs("cpu", torch.float64, requires_grad=True)
        if 0 < s.input.numel() <= 72 and s.input.dim() >= 2
    ]
    sample = samples[index]
    running = [_clone(a) for a in sample.args[:2]]
    weight_bias = [a for a in sample.args[2:] if a is not None]
    kwargs = sample.kwargs

    def f(x: Any, *wb: Any) -> Any:
        rm = None if running[0] is None else running[0].clone()
        rv = None if running[1] is None else running[1].clone()
        w, b = [*wb, None, None][:2]
        return abt.batch_norm(x, rm, rv, w, b, **kwargs)

    inputs = (sample.input.detach().requires_grad_(), *weight_bias)
    assert torch.autograd.gradcheck(f, inputs, check_forward_ad=True, check_batched_grad=True)
    assert torch.autograd.gradgradcheck(f, inputs, check_fwd_over_rev=True)
