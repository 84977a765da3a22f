"""The drop-ins under transforms, against torch.nn: torch.func, compile, export and jit.

Each test runs alone in a fresh interpreter (:func:`_fresh.fresh_process`):
these transforms cache compiled code and bind state per process, so a result
must not depend on what ran before (a module global bound lazily on first use,
say, is a side effect inside the traced ``autograd.Function`` that
``fullgraph=True`` refuses, and an earlier eager call hid it). The torch.func
checks follow torch's ``test/functorch/test_eager_transforms.py`` and
``test_vmap.py`` usage; the oracle is torch's own module or function.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
from _fresh import fresh_process

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

import anybn.torch as abt  # noqa: E402
from anybn._kernels import torch_cpu  # noqa: E402


@pytest.fixture(autouse=True)
def _seeded() -> None:
    torch.manual_seed(20261126)


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


@fresh_process(timeout=300)
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
@fresh_process(timeout=300)
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


@fresh_process(timeout=300)
def test_func_vmap_without_running_stats() -> None:
    from torch.func import vmap

    theirs, ours = _both(abt.BatchNorm1d, 3, track_running_stats=False)
    x = torch.randn(5, 4, 3)
    torch.testing.assert_close(vmap(ours)(x), vmap(theirs)(x))


@fresh_process(timeout=300)
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


@fresh_process(timeout=300)
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
@fresh_process(timeout=300)
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
@fresh_process(timeout=600)
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


@fresh_process(timeout=600)
def test_export_eval_model() -> None:
    """``torch.export`` captures the anybn operator and the exported program runs."""
    model = nn.Sequential(nn.Conv2d(2, 4, 3), abt.BatchNorm2d(4)).eval()
    x = torch.randn(3, 2, 6, 6)
    program = torch.export.export(model, (x,))
    assert "anybn.batch_norm" in str(program.graph)
    torch.testing.assert_close(program.module()(x), model(x))


@fresh_process(timeout=300)
def test_jit_script_says_unsupported() -> None:
    with pytest.raises(RuntimeError, match=r"does not support torch\.jit\.script"):
        torch.jit.script(abt.BatchNorm2d(3))


# --- torch.compile on the first call of a process --------------------------------------------


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@fresh_process(timeout=600)
def test_compile_fullgraph_on_the_first_call(training: bool) -> None:
    """The issue's call, first thing in the process: compiles, and gives torch's numbers."""
    assert torch_cpu._torch is None, "an earlier call bound torch: not a first call"
    torch.manual_seed(0)
    ours, theirs = abt.BatchNorm2d(8), nn.BatchNorm2d(8)
    with torch.no_grad():
        theirs.running_mean.uniform_(-1.0, 1.0)
        theirs.running_var.uniform_(0.5, 2.0)
    ours.load_state_dict(theirs.state_dict())
    ours.train(training)
    theirs.train(training)
    x = torch.randn(4, 8, 5, 5)
    y = torch.compile(ours, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(y, theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked)


@fresh_process(timeout=300)
def test_compiled_code_binds_no_module_global() -> None:
    """anybn's lazy lookup of the torch module, traced by torch.compile, has no side effect."""
    assert torch_cpu._torch is None, "an earlier call bound torch: not a first call"

    def f(x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 if torch_cpu._torch_module() is torch else x

    x = torch.ones(3)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), x * 2.0)
    assert torch_cpu._torch is None
    assert torch_cpu._torch_module() is torch  # eager: bound once, as before
    assert torch_cpu._torch is torch
