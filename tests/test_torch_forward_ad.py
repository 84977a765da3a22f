"""Forward-mode AD of the drop-ins against torch itself, in every combination of tangents.

PyTorch does not differentiate batch norm with respect to the running statistics
(``test_batchnorm_raises_error_if_running_var_or_running_mean_have_forward_grad``
in its ``test/test_nn.py``): their tangents never reach the output, a training
update leaves them as they are, and in eval a tangent on x, weight or bias
together with one on a running statistic raises RuntimeError. Each test here
gives tangents to every non-empty subset of (x, weight, bias, running_mean,
running_var), in training and eval, and runs torch's function or module and
anybn's drop-in side by side: the same outcome (the same exception, or no
tangent in both, or equal tangents) and the same running statistics afterwards,
primal and tangent. The core, :func:`anybn.batch_norm`, differentiates its
formula with respect to every input (its reverse mode does too) and is checked
against that formula written in plain torch operations.
"""

from __future__ import annotations

import itertools
from typing import Any

import pytest
from _fresh import fresh_process

torch = pytest.importorskip("torch")

import torch.autograd.forward_ad as fwAD  # noqa: E402
from torch.func import functional_call, jvp  # noqa: E402

import anybn  # noqa: E402
import anybn.torch as abt  # noqa: E402

NAMES = ("x", "weight", "bias", "running_mean", "running_var")
#: Every non-empty subset of the arguments, as the names that get a tangent.
SUBSETS = [s for k in range(1, 6) for s in itertools.combinations(NAMES, k)]
SUBSET_IDS = ["+".join(s) for s in SUBSETS]
TRAIN_EVAL = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
EPS = 1e-5


def _data(shape: tuple[int, ...]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Primals and tangents (float64, two channels), the same on every call."""
    g = torch.Generator().manual_seed(20261203)

    def draw(*size: int, positive: bool = False) -> Any:
        t = torch.randn(size, generator=g, dtype=torch.float64)
        return t.abs() + 0.5 if positive else t

    primals = {
        "x": draw(*shape),
        "weight": draw(2, positive=True),
        "bias": draw(2),
        "running_mean": draw(2),
        "running_var": draw(2, positive=True),
    }
    tangents = {name: draw(*p.shape) for name, p in primals.items()}
    return primals, tangents


def _outcome(call: Any, shape: tuple[int, ...], subset: tuple[str, ...]) -> tuple[Any, ...]:
    """``call(args)`` under ``forward_ad`` with tangents on ``subset``: what came out.

    ``("raise", type, message)`` or ``("ok", y tangent, running statistics)`` with
    the running statistics' primals and tangents after the call.
    """
    primals, tangents = _data(shape)
    with fwAD.dual_level():
        args = {
            name: fwAD.make_dual(p, tangents[name]) if name in subset else p
            for name, p in primals.items()
        }
        try:
            y = call(args)
        except RuntimeError as e:
            return ("raise", type(e), str(e))
        stats = [fwAD.unpack_dual(args[n]) for n in ("running_mean", "running_var")]
        return (
            "ok",
            fwAD.unpack_dual(y).tangent,
            [(s.primal.clone(), None if s.tangent is None else s.tangent.clone()) for s in stats],
        )


def _assert_same_tensor(actual: Any, expected: Any, what: str) -> None:
    assert (actual is None) == (expected is None), f"{what}: {actual} vs torch's {expected}"
    if expected is not None:
        torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-10, msg=what)


def _assert_same_outcome(ours: tuple[Any, ...], theirs: tuple[Any, ...]) -> None:
    assert ours[0] == theirs[0], f"anybn: {ours[:1]} {ours[1:2]}, torch: {theirs[:1]} {theirs[1:2]}"
    if theirs[0] == "raise":
        assert ours[1:] == theirs[1:]
        return
    _assert_same_tensor(ours[1], theirs[1], "y tangent")
    for name, (p, t), (tp, tt) in zip(
        ("running_mean", "running_var"), ours[2], theirs[2], strict=True
    ):
        _assert_same_tensor(p, tp, f"{name} after the call")
        _assert_same_tensor(t, tt, f"{name}'s tangent after the call")


SHAPES = pytest.mark.parametrize("shape", [(3, 2, 5), (0, 2, 5)], ids=["NCL", "empty"])


@SHAPES
@pytest.mark.parametrize("subset", SUBSETS, ids=SUBSET_IDS)
@TRAIN_EVAL
def test_functional_forward_ad_like_torch(
    training: bool, subset: tuple[str, ...], shape: tuple[int, ...]
) -> None:
    def call(fn: Any) -> Any:
        return lambda a: fn(
            a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
            training=training, momentum=0.3, eps=EPS,
        )  # fmt: skip

    theirs = _outcome(call(torch.nn.functional.batch_norm), shape, subset)
    _assert_same_outcome(_outcome(call(abt.batch_norm), shape, subset), theirs)


@pytest.mark.parametrize("subset", SUBSETS, ids=SUBSET_IDS)
@pytest.mark.parametrize(
    ("name", "training"),
    [("BatchNorm2d", True), ("BatchNorm2d", False), ("SyncBatchNorm", False)],
    ids=["BatchNorm2d-train", "BatchNorm2d-eval", "SyncBatchNorm-eval"],
)
def test_drop_in_module_forward_ad_like_torch(
    name: str, training: bool, subset: tuple[str, ...]
) -> None:
    """The modules under ``functional_call`` with dual parameters and buffers (SyncBatchNorm
    in eval, where it needs no process group)."""

    def call(cls: Any) -> Any:
        module = cls(2, momentum=0.3, dtype=torch.float64).train(training)

        def run(a: dict[str, Any]) -> Any:
            state = {k: v for k, v in a.items() if k != "x"}
            state["num_batches_tracked"] = torch.tensor(0)
            return functional_call(module, state, (a["x"],))

        return run

    shape = (3, 2, 4, 4)
    theirs = _outcome(call(getattr(torch.nn, name)), shape, subset)
    _assert_same_outcome(_outcome(call(getattr(abt, name)), shape, subset), theirs)


@TRAIN_EVAL
@fresh_process(timeout=300)
def test_func_jvp_like_torch(training: bool) -> None:
    """``torch.func.jvp`` with respect to each subset: the same tangent or the same error.

    A transform: one fresh process runs every subset.
    """
    primals, tangents = _data((3, 2, 5))

    def outcome(fn: Any, subset: tuple[str, ...]) -> tuple[Any, ...]:
        def f(*duals: Any) -> Any:
            a = {**primals, **dict(zip(subset, duals, strict=True))}
            if training:  # updated in place: fresh copies each time
                a["running_mean"], a["running_var"] = a["running_mean"] + 0, a["running_var"] + 0
            return fn(
                a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
                training=training, momentum=0.3, eps=EPS,
            )  # fmt: skip

        try:
            _, tangent = jvp(
                f, tuple(primals[n] for n in subset), tuple(tangents[n] for n in subset)
            )
        except RuntimeError as e:
            return ("raise", type(e), str(e))
        return ("ok", tangent)

    for subset in SUBSETS:
        ours = outcome(abt.batch_norm, subset)
        theirs = outcome(torch.nn.functional.batch_norm, subset)
        assert ours[0] == theirs[0], (subset, ours[:2], theirs[:2])
        if theirs[0] == "raise":
            assert ours == theirs, subset
        else:
            torch.testing.assert_close(ours[1], theirs[1], rtol=1e-10, atol=1e-10, msg=str(subset))


def _formula(a: dict[str, Any], training: bool) -> Any:
    """y by the textbook formula in plain torch operations (the core's oracle)."""
    x = a["x"]
    view = (1, -1, 1)
    if training:
        mean = x.mean(dim=(0, 2), keepdim=True)
        var = ((x - mean) ** 2).mean(dim=(0, 2), keepdim=True)
    else:
        mean, var = a["running_mean"].reshape(view), a["running_var"].reshape(view)
    return (x - mean) / torch.sqrt(var + EPS) * a["weight"].reshape(view) + a["bias"].reshape(view)


@pytest.mark.parametrize("subset", SUBSETS, ids=SUBSET_IDS)
@TRAIN_EVAL
def test_core_forward_ad_is_its_formulas(training: bool, subset: tuple[str, ...]) -> None:
    """:func:`anybn.batch_norm` on dual tensors: the tangent of its formula; the new running
    statistics it returns carry no tangent (they are never differentiable)."""
    new_stats: list[Any] = []

    def core(a: dict[str, Any]) -> Any:
        out = anybn.batch_norm(
            a["x"], a["running_mean"], a["running_var"], a["weight"], a["bias"],
            training=training, momentum=0.3, eps=EPS,
        )  # fmt: skip
        if training:
            new_stats.extend([out.new_running_mean, out.new_running_var])
        return out.y

    ours = _outcome(core, (3, 2, 5), subset)
    theirs = _outcome(lambda a: _formula(a, training), (3, 2, 5), subset)
    assert ours[0] == theirs[0] == "ok"
    _assert_same_tensor(ours[1], theirs[1], "y tangent")
    with fwAD.dual_level():
        for s in new_stats:
            assert fwAD.unpack_dual(s).tangent is None
