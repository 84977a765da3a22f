"""anybn.torch modules keep their last call: the next one like it skips every check.

A kept call (``anybn.torch.function.KeptCall``) serves the next call on a tensor of the same
shape and dtype while the module's options, parameters and buffers are the same objects
on the same memory. Each test changes one of those between calls, in the ways users
do, and runs three modules in lockstep: ``torch.nn`` (the semantics, to rounding), the
drop-in (the subject) and a drop-in whose kept call is dropped after every call (every
call checked: the subject must give the very same bits).
"""

from __future__ import annotations

import copy
import pickle
from collections.abc import Callable
from typing import Any

import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import anybn.torch as abt  # noqa: E402
from anybn import _kernels as kernels  # noqa: E402
from anybn._kernels import numba_cpu  # noqa: E402

C = 4


def _trio(**options: Any) -> tuple[Any, Any, Any]:
    """nn.BatchNorm2d, its drop-in and a drop-in that never keeps a call, in one state."""
    gen = torch.Generator().manual_seed(7)
    ref = nn.BatchNorm2d(C, **options)
    if ref.affine:
        with torch.no_grad():
            ref.weight.copy_(torch.rand(C, generator=gen) + 0.5)
            ref.bias.copy_(torch.randn(C, generator=gen))
    ours, checked = abt.BatchNorm2d(C, **options), abt.BatchNorm2d(C, **options)
    ours.load_state_dict(ref.state_dict())
    checked.load_state_dict(ref.state_dict())
    return ref, ours, checked


def _step(module: Any, x: Any, dy: Any, *, keep: bool = True) -> dict[str, Any]:
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    y = module(x)
    y.backward(dy)
    if not keep:
        module.__dict__.pop("_anybn_kept", None)
    out = {"y": y.detach(), "dx": x.grad}
    out.update({f"d{n}": p.grad for n, p in module.named_parameters()})
    out.update({k: v.clone() for k, v in module.state_dict().items()})
    return out


def _lockstep(trio: tuple[Any, Any, Any], x: Any, dy: Any) -> None:
    ref, ours, checked = trio
    want, got, exact = _step(ref, x, dy), _step(ours, x, dy), _step(checked, x, dy, keep=False)
    assert list(got) == list(want) == list(exact)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key, rtol=1e-5, atol=1e-5)
        assert torch.equal(got[key], exact[key]), key


def _data(shape: tuple[int, ...] = (6, C, 3, 5), dtype: Any = torch.float32) -> tuple[Any, Any]:
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=torch.float64) * 2 + 3
    return x.to(dtype), torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def _each(trio: tuple[Any, Any, Any], change: Callable[[Any], None]) -> None:
    for module in trio:
        change(module)


def _replace_weight_data(m: Any) -> None:
    m.weight.data = m.weight.data * 2 + 1  # new memory under the same Parameter


def _scale_weight_in_place(m: Any) -> None:
    with torch.no_grad():
        m.weight.mul_(3)  # the same memory: read afresh


def _reassign_running_mean(m: Any) -> None:
    m.running_mean = m.running_mean + 1  # a new registered buffer


def _replace_running_var_data(m: Any) -> None:
    m.running_var.data = m.running_var.data * 4


def _new_counter(m: Any) -> None:
    m.num_batches_tracked = torch.tensor(5, dtype=torch.long)


def _set(name: str, value: Any) -> Callable[[Any], None]:
    return lambda m: setattr(m, name, value)


CHANGES: dict[str, Callable[[Any], None]] = {
    "weight.data replaced": _replace_weight_data,
    "weight scaled in place": _scale_weight_in_place,
    "running_mean reassigned": _reassign_running_mean,
    "running_var.data replaced": _replace_running_var_data,
    "num_batches_tracked reassigned": _new_counter,
    "momentum": _set("momentum", 0.5),
    "momentum=None": _set("momentum", None),
    "eps": _set("eps", 1e-3),
    "eval": lambda m: m.eval(),
    "track_running_stats=False": _set("track_running_stats", False),
    "reset_running_stats": lambda m: m.reset_running_stats(),
    "load_state_dict": lambda m: m.load_state_dict(
        {
            **m.state_dict(),
            "running_mean": torch.full((C,), 2.0),
            "num_batches_tracked": torch.tensor(40),
        }
    ),
    "weight None": _set("weight", None),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_a_change_between_calls_is_seen(change: str) -> None:
    trio = _trio()
    x, dy = _data()
    for _ in range(2):
        _lockstep(trio, x, dy)
    assert "_anybn_kept" in trio[1].__dict__ or not numba_cpu.AVAILABLE
    _each(trio, CHANGES[change])
    for _ in range(3):
        _lockstep(trio, x, dy)


@pytest.mark.parametrize("params", [torch.float16, torch.float32], ids=["float16", "float32"])
def test_half_inputs_follow_parameter_updates(params: Any) -> None:
    """float16 x: float32 parameters are viewed by a kept call, float16 ones never are."""
    trio = _trio()
    for m in trio:
        m.to(params)
    x, dy = _data(dtype=torch.float16)
    for _ in range(3):
        for m in trio:
            m.zero_grad(set_to_none=True)
        _lockstep_half(trio, x, dy)
        _each(trio, _sgd_step)


def _sgd_step(m: Any) -> None:
    with torch.no_grad():  # an optimizer's in-place update
        for p in m.parameters():
            p.sub_(0.5 * p.grad)


def _lockstep_half(trio: tuple[Any, Any, Any], x: Any, dy: Any) -> None:
    ref, ours, checked = trio
    want, got, exact = _step(ref, x, dy), _step(ours, x, dy), _step(checked, x, dy, keep=False)
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key, rtol=2e-2, atol=2e-2)
        assert torch.equal(got[key], exact[key]), key


def test_momentum_none_counts_every_batch() -> None:
    trio = _trio(momentum=None)
    x, dy = _data()
    for i in range(4):
        _lockstep(trio, x * (i + 1), dy)
    assert int(trio[1].num_batches_tracked) == 4


@pytest.mark.parametrize(
    "shape", [(6, C, 3, 5), (2, C, 1, 1), (3, C, 4, 4)], ids=["same", "smaller", "other"]
)
def test_another_input_shape_or_layout_is_checked_again(shape: tuple[int, ...]) -> None:
    trio = _trio()
    x, dy = _data()
    _lockstep(trio, x, dy)
    _lockstep(trio, x, dy)
    x2, dy2 = _data(shape)
    _lockstep(trio, x2, dy2)
    last = x2.contiguous(memory_format=torch.channels_last)
    _lockstep(trio, last, dy2.contiguous(memory_format=torch.channels_last))


def test_another_dtype_raises_as_torch_does() -> None:
    ref, ours, _ = _trio()
    x, _ = _data()
    for m in (ref, ours):
        m(x)
        m(x)
    with pytest.raises(RuntimeError, match="mixed dtype") as want:
        ref(x.double())
    with pytest.raises(RuntimeError, match="mixed dtype") as got:
        ours(x.double())
    assert str(got.value) == str(want.value)
    ours.double()  # parameters and buffers replaced: the kept call no longer serves
    ref.double()
    for m in (ref, ours):
        m.zero_grad()
    torch.testing.assert_close(ours(x.double()), ref(x.double()))


def test_fast_paths_off_after_a_kept_call_take_the_generic_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _, ours, _ = _trio()
    x, _ = _data()
    ours(x)
    ours(x)
    calls: list[str] = []
    laid = numba_cpu.forward_laid
    monkeypatch.setattr(
        numba_cpu, "forward_laid", lambda *a, **k: calls.append("laid") or laid(*a, **k)
    )
    with kernels.fast_paths(False):
        y = ours(x)
    assert calls == []
    y_fast = ours(x)
    assert calls == (["laid"] if numba_cpu.AVAILABLE else [])
    torch.testing.assert_close(y, y_fast)


def test_copies_do_not_carry_the_kept_call() -> None:
    _, ours, _ = _trio()
    x, _ = _data()
    ours(x)
    ours(x)
    for clone in (copy.deepcopy(ours), pickle.loads(pickle.dumps(ours))):
        assert "_anybn_kept" not in clone.__dict__
        before = ours.running_mean.clone()
        clone(x)
        clone(x)
        assert torch.equal(ours.running_mean, before)  # the copy writes its own buffers
        assert not torch.equal(clone.running_mean, before)


def test_forward_ad_and_torch_func_after_a_kept_call() -> None:
    ref, ours, _ = _trio()
    ours.eval()
    ref.eval()
    x, dy = _data()
    for m in (ref, ours):
        m(x)
        m(x)
    import torch.autograd.forward_ad as fwad

    with fwad.dual_level():
        got = fwad.unpack_dual(ours(fwad.make_dual(x, dy))).tangent
        want = fwad.unpack_dual(ref(fwad.make_dual(x, dy))).tangent
    torch.testing.assert_close(got, want)
    got = torch.func.grad(lambda t: ours(t).square().sum())(x)
    want = torch.func.grad(lambda t: ref(t).square().sum())(x)
    torch.testing.assert_close(got, want)


def test_an_input_numpy_cannot_view_is_still_computed() -> None:
    ref, ours, _ = _trio()
    x, _ = _data()
    for m in (ref, ours):
        m(x)
        m(x)
    negative = torch._neg_view(-x)  # x's values, with the negative bit set
    assert negative.is_neg()
    torch.testing.assert_close(ours(negative), ref(x))
