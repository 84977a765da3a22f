"""PyTorch's own batch-norm expectations, run against anybn.torch side by side with torch.nn.

The cases come from PyTorch's test suite itself, imported from
``torch.testing._internal``: the ``module_db`` entries of ``nn.BatchNorm1d/2d/3d``
(their module inputs, error inputs, and the ``test_modules.py`` checks of
forward, backward, channels_last, empty batches and ``load_state_dict``) and the
``op_db`` samples of ``nn.functional.batch_norm`` (``test_ops.py``: outputs,
gradients, forward-mode AD, running-statistics updates). Each case runs on
torch's module or function and on anybn's drop-in with the same inputs, and the
results must agree: the same outputs, gradients and buffers, or the same
exception type and message. The torch.func checks follow torch's
``test/functorch/test_eager_transforms.py`` and ``test_vmap.py`` usage.
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


# --- torch.func, as torch's functorch tests use modules ---------------------------------------


def _both(cls: type, *args: Any, **kwargs: Any) -> tuple[nn.Module, nn.Module]:
    theirs = getattr(nn, cls.__name__)(*args, **kwargs)
    ours = cls(*args, **kwargs)
    with torch.no_grad():
        if theirs.weight is not None:
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.uniform_(-0.5, 0.5)
        if theirs.running_mean is not None:
            theirs.running_mean.uniform_(-1, 1)
            theirs.running_var.uniform_(0.5, 2)
    ours.load_state_dict(theirs.state_dict())
    return theirs, ours


def test_func_grad_of_functional_call_in_eval() -> None:
    from torch.func import functional_call, grad

    theirs, ours = _both(abt.BatchNorm2d, 3)
    x = torch.randn(4, 3, 5, 5, dtype=torch.float64)
    results = []
    for m in (theirs.eval().double(), ours.eval().double()):
        params = {k: v.detach() for k, v in m.named_parameters()}
        results.append(grad(lambda p, m=m: functional_call(m, p, (x,)).square().sum())(params))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k])


@pytest.mark.parametrize("training", [True, False])
def test_func_grad_with_buffers_passed_in(training: bool) -> None:
    """Parameters and buffers passed to functional_call (torch's functorch BN tests)."""
    from torch.func import functional_call, grad

    theirs, ours = _both(abt.BatchNorm1d, 4, track_running_stats=False)
    x = torch.randn(8, 4, dtype=torch.float64)
    out = []
    for m in (theirs.double().train(training), ours.double().train(training)):
        params = {k: v.detach() for k, v in m.named_parameters()}
        out.append(
            grad(lambda p, x, m=m: functional_call(m, p, (x,)).pow(3).sum(), argnums=(0, 1))(
                params, x
            )
        )
    torch.testing.assert_close(out[1][1], out[0][1])
    for k in out[0][0]:
        torch.testing.assert_close(out[1][0][k], out[0][0][k])


def test_func_vmap_without_running_stats() -> None:
    from torch.func import vmap

    theirs, ours = _both(abt.BatchNorm1d, 3, track_running_stats=False)
    x = torch.randn(5, 4, 3)
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))


def test_func_vmap_in_eval_and_of_grad() -> None:
    from torch.func import grad, vmap

    theirs, ours = _both(abt.BatchNorm2d, 3)
    theirs.eval()
    ours.eval()
    x = torch.randn(6, 2, 3, 4, 4)
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))
    theirs.train()
    ours.train()
    theirs_nt, ours_nt = _both(abt.BatchNorm2d, 3, track_running_stats=False)
    per_sample = [vmap(grad(lambda xi, m=m: m(xi).pow(3).sum()))(x) for m in (theirs_nt, ours_nt)]
    torch.testing.assert_close(per_sample[1], per_sample[0], rtol=1e-4, atol=1e-5)


def test_func_vmap_training_with_running_stats_raises_like_torch() -> None:
    """Training under vmap would write batched statistics into unbatched buffers: both raise."""
    from torch.func import vmap

    theirs, ours = _both(abt.BatchNorm1d, 3)
    x = torch.randn(5, 4, 3)
    with pytest.raises(RuntimeError) as expected:
        vmap(theirs)(x)
    before = copy.deepcopy(ours.state_dict())
    with pytest.raises(RuntimeError, match=r"vmap|batched|in-place|inplace"):
        vmap(ours)(x)
    del expected
    for k, v in ours.state_dict().items():
        if k != "num_batches_tracked":
            torch.testing.assert_close(v, before[k], rtol=0, atol=0)


@pytest.mark.parametrize("training", [True, False])
def test_func_jvp_jacfwd_and_forward_ad(training: bool) -> None:
    import torch.autograd.forward_ad as fwAD
    from torch.func import jacfwd, jacrev, jvp

    theirs, ours = _both(abt.BatchNorm1d, 3, track_running_stats=False)
    theirs.double().train(training)
    ours.double().train(training)
    if not training:
        pytest.skip(
            "eval without running statistics normalizes with batch statistics: same as train"
        )
    x = torch.randn(6, 3, dtype=torch.float64)
    t = torch.randn_like(x)
    torch.testing.assert_close(jvp(ours, (x,), (t,))[1], jvp(theirs, (x,), (t,))[1])
    torch.testing.assert_close(jacfwd(ours)(x), jacfwd(theirs)(x))
    torch.testing.assert_close(jacfwd(ours)(x), jacrev(ours)(x))
    tangents = []
    for m in (theirs, ours):
        with fwAD.dual_level():
            tangents.append(fwAD.unpack_dual(m(fwAD.make_dual(x, t))).tangent)
    torch.testing.assert_close(tangents[1], tangents[0])


def test_forward_ad_eval_with_running_stats_and_parameter_tangents() -> None:
    import torch.autograd.forward_ad as fwAD

    theirs, ours = _both(abt.BatchNorm2d, 3)
    theirs.double().eval()
    ours.double().eval()
    x = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    tx, tw, tb = (
        torch.randn_like(x),
        torch.randn(3, dtype=torch.float64),
        torch.randn(3, dtype=torch.float64),
    )
    out = []
    for m in (theirs, ours):
        with fwAD.dual_level():
            from torch.func import functional_call

            params = {
                "weight": fwAD.make_dual(m.weight.detach(), tw),
                "bias": fwAD.make_dual(m.bias.detach(), tb),
            }
            y = functional_call(m, params, (fwAD.make_dual(x, tx),))
            out.append(fwAD.unpack_dual(y).tangent)
    torch.testing.assert_close(out[1], out[0])


@pytest.mark.slow
def test_compile_fullgraph_matches_eager_torch() -> None:
    """``torch.compile(model, fullgraph=True)`` compiles a model holding anybn.torch modules."""
    torch._dynamo.reset()
    model = nn.Sequential(nn.Conv2d(2, 4, 3), abt.BatchNorm2d(4), nn.ReLU())
    reference = nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
    reference.load_state_dict(model.state_dict())
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x = torch.randn(3, 2, 6, 6)
    y, y_ref = compiled(x), reference(x)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(model[1].weight.grad, reference[1].weight.grad)
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean)
    assert int(model[1].num_batches_tracked) == 1
    model.eval()
    reference.eval()
    torch.testing.assert_close(compiled(x), reference(x))


def test_export_eval_model() -> None:
    """``torch.export`` captures the anybn operator and the exported program runs."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), abt.BatchNorm2d(4)).eval()
    x = torch.randn(3, 2, 6, 6)
    program = torch.export.export(model, (x,))
    assert "anybn.batch_norm" in str(program.graph)
    torch.testing.assert_close(program.module()(x), model(x))


def test_jit_script_says_unsupported() -> None:
    with pytest.raises(RuntimeError, match=r"does not support torch\.jit\.script"):
        torch.jit.script(abt.BatchNorm2d(3))
