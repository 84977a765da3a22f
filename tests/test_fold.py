"""``anybn.fold``: an eval-mode batch norm folded into the weight and bias before it.

The folded values are checked against an independent float64 reference (each weight
value scaled by its output channel's factor, found by index arithmetic per layout) to
within half an ulp of the result dtype (correctly rounded), on every backend; against
``torch.nn.utils.fusion.fuse_conv_bn_weights`` (never less accurate); and, with real
PyTorch layers, as the same function: ``bn(layer(x)) == folded_layer(x)`` in float64.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import numpy as np
import pytest
from _helpers import host, unmutated

import anybn

#: name -> (weight shape, transposed, groups, axis): every layout anybn.fold takes
LAYOUTS: dict[str, tuple[tuple[int, ...], bool, int, int | None]] = {
    "linear": ((5, 4), False, 1, None),
    "conv1d": ((6, 2, 3), False, 1, None),
    "conv2d-grouped": ((6, 2, 3, 3), False, 3, None),
    "conv2d-depthwise": ((6, 1, 3, 3), False, 6, None),
    "conv3d": ((4, 2, 2, 2, 2), False, 1, None),
    "convtranspose2d": ((4, 3, 3, 3), True, 1, None),
    "convtranspose1d-grouped": ((4, 3, 2), True, 2, None),
    "convtranspose3d-grouped": ((6, 1, 2, 2, 2), True, 3, None),
    "keras-conv2d": ((3, 3, 2, 6), False, 1, -1),
    "keras-conv2dtranspose": ((3, 3, 6, 2), False, 1, -2),
}

MANTISSA = {"float64": 52, "float32": 23, "float16": 10, "bfloat16": 7}


def _output_channel(index: tuple[int, ...], shape: tuple[int, ...], transposed: bool,
                    groups: int, axis: int | None) -> int:  # fmt: skip
    """The output channel of one weight value, by the layouts' definitions."""
    if transposed:  # (in, out / groups, *k): input channel i is in group i // (in / groups)
        return index[0] // (shape[0] // groups) * shape[1] + index[1]
    return index[0 if axis is None else axis]


def _reference(
    w: np.ndarray, b: np.ndarray | None, rm: np.ndarray, rv: np.ndarray,
    gamma: np.ndarray | None, beta: np.ndarray | None, eps: float, transposed: bool,
    groups: int, axis: int | None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """The folded weight and bias in float64, value by value."""
    scale = (np.ones_like(rm) if gamma is None else gamma) / np.sqrt(rv + eps)
    out = np.empty(w.shape)
    for index in itertools.product(*map(range, w.shape)):
        out[index] = w[index] * scale[_output_channel(index, w.shape, transposed, groups, axis)]
    bias = (np.zeros_like(rm) if b is None else b) - rm
    return out, bias * scale + (0.0 if beta is None else beta)


def _channels(shape: tuple[int, ...], transposed: bool, groups: int, axis: int | None) -> int:
    return shape[1] * groups if transposed else shape[0 if axis is None else axis]


def _inputs(rng: np.random.Generator, layout: str, with_bias: bool, affine: bool) -> dict:
    shape, transposed, groups, axis = LAYOUTS[layout]
    c = _channels(shape, transposed, groups, axis)
    return {
        "w": rng.normal(size=shape),
        "b": rng.normal(size=c) if with_bias else None,
        "rm": rng.normal(size=c) * 3.0,
        "rv": rng.uniform(0.01, 4.0, c),
        "gamma": rng.normal(size=c) if affine else None,
        "beta": rng.normal(size=c) if affine else None,
    }


def _assert_correctly_rounded(got: np.ndarray, want: np.ndarray, dtype: str, what: str) -> None:
    """|got - want| <= half an ulp of ``dtype`` at want (the float64 arithmetic's few ulps of
    float64 aside): the result rounded once. float64 results: within 4 ulps."""
    ulp = np.exp2(np.floor(np.log2(np.maximum(np.abs(want), 1e-300))) - MANTISSA[dtype])
    err = np.abs(got.astype(np.float64) - want)
    bound = 4 * ulp if dtype == "float64" else 0.5 * ulp * (1 + 1e-6)
    assert np.all(err <= bound + 1e-300), (
        f"{what}: max error {np.max(err / ulp):.3f} ulp"
    )


#: (layer bias, batch-norm affine) cycled over the layouts: each layout with one of them
OPTIONAL = [(True, True), (False, True), (True, False)]


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_reference(
    backend: Any, dtype: str, layout: str, rng: np.random.Generator
) -> None:
    """Correctly rounded folded weight and bias on every backend and dtype, inputs untouched."""
    shape, transposed, groups, axis = LAYOUTS[layout]
    with_bias, affine = OPTIONAL[sorted(LAYOUTS).index(layout) % len(OPTIONAL)]
    data = _inputs(rng, layout, with_bias, affine)
    on = {k: None if v is None else backend.asarray(v, dtype) for k, v in data.items()}
    rounded = {k: None if v is None else host(a).astype(np.float64)
               for (k, v), a in zip(data.items(), on.values(), strict=True)}  # fmt: skip
    eps = 1e-3
    with unmutated(*on.values()):
        folded = backend.call(
            anybn.fold, on["w"], on["b"], on["rm"], on["rv"], on["gamma"], on["beta"],
            eps=eps, axis=axis, transposed=transposed, groups=groups,
        )  # fmt: skip
    want_w, want_b = _reference(
        rounded["w"], rounded["b"], rounded["rm"], rounded["rv"], rounded["gamma"],
        rounded["beta"], eps, transposed, groups, axis,
    )  # fmt: skip
    assert type(folded.weight) is type(on["w"]) and tuple(folded.weight.shape) == shape
    assert folded.weight.dtype == on["w"].dtype and folded.bias.dtype == on["w"].dtype
    _assert_correctly_rounded(host(folded.weight), want_w, dtype, "weight")
    _assert_correctly_rounded(host(folded.bias), want_b, dtype, "bias")


@pytest.mark.parametrize("layout", [k for k, v in LAYOUTS.items() if v[3] is None])
def test_never_less_accurate_than_torch_fuser(layout: str, rng: np.random.Generator) -> None:
    """Against ``fuse_conv_bn_weights`` (float32 arithmetic): every value at least as close
    to the float64 result, and some strictly closer."""
    torch = pytest.importorskip("torch")
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    _, transposed, groups, _ = LAYOUTS[layout]
    if transposed and groups > 1:
        pytest.skip("fuse_conv_bn_weights does not handle grouped transposed weights")
    data = _inputs(rng, layout, True, True)
    t = {k: torch.from_numpy(v).float() for k, v in data.items()}
    ours = anybn.fold(t["w"], t["b"], t["rm"], t["rv"], t["gamma"], t["beta"],
                      transposed=transposed, groups=groups)  # fmt: skip
    theirs = fuse_conv_bn_weights(t["w"], t["b"], t["rm"], t["rv"], 1e-5, t["gamma"],
                                  t["beta"], transposed)  # fmt: skip
    exact = _reference(*(None if t[k] is None else t[k].double().numpy()
                         for k in ("w", "b", "rm", "rv", "gamma", "beta")),
                       1e-5, transposed, groups, None)  # fmt: skip
    for mine, other, want in zip(ours, theirs, exact, strict=True):
        err_ours = np.abs(mine.double().numpy() - want)
        err_torch = np.abs(other.detach().double().numpy() - want)
        assert np.all(err_ours <= err_torch)
    assert any(
        np.any(np.abs(m.double().numpy() - w) < np.abs(o.detach().double().numpy() - w))
        for m, o, w in zip(ours, theirs, exact, strict=True)
    )


def _torch_layer(torch: Any, layout: str) -> Any:
    nn = torch.nn
    return {
        "linear": lambda: nn.Linear(4, 5),
        "conv1d": lambda: nn.Conv1d(2, 6, 3),
        "conv2d-grouped": lambda: nn.Conv2d(6, 6, 3, groups=3),
        "conv2d-depthwise": lambda: nn.Conv2d(6, 6, 3, groups=6),
        "conv3d": lambda: nn.Conv3d(2, 4, 2),
        "convtranspose2d": lambda: nn.ConvTranspose2d(4, 3, 3),
        "convtranspose1d-grouped": lambda: nn.ConvTranspose1d(4, 6, 2, groups=2),
        "convtranspose3d-grouped": lambda: nn.ConvTranspose3d(6, 3, 2, groups=3),
    }[layout]().double()


@pytest.mark.parametrize("layout", [k for k, v in LAYOUTS.items() if v[3] is None])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_same_function_as_layer_then_batch_norm(
    layout: str, with_bias: bool, rng: np.random.Generator
) -> None:
    """PyTorch layers: ``bn(layer(x))`` and the layer with the folded weights agree in float64."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    layer = _torch_layer(torch, layout)
    if not with_bias:
        layer.bias = None
    shape, transposed, groups, _ = LAYOUTS[layout]
    assert tuple(layer.weight.shape) == shape
    c = _channels(shape, transposed, groups, None)
    bn = getattr(torch.nn, f"BatchNorm{max(1, len(shape) - 2)}d")(c).double().eval()
    with torch.no_grad():
        bn.running_mean.normal_(0, 3)
        bn.running_var.uniform_(0.1, 3)
        bn.weight.normal_()
        bn.bias.normal_()
    inputs = layer.in_features if layout == "linear" else layer.in_channels
    x = torch.from_numpy(rng.normal(size=(3, inputs, *[5] * (len(shape) - 2))))
    folded = anybn.fold(
        layer.weight.detach(), None if layer.bias is None else layer.bias.detach(),
        bn.running_mean, bn.running_var, bn.weight.detach(), bn.bias.detach(), eps=bn.eps,
        transposed=transposed, groups=groups,
    )  # fmt: skip
    with torch.no_grad():
        want = bn(layer(x))
        layer.weight.copy_(folded.weight)
        layer.bias = torch.nn.Parameter(folded.bias)
        got = layer(x)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_differentiable() -> None:
    """A pure function: autograd (torch) and jax.grad go through it."""
    torch = pytest.importorskip("torch")
    w = torch.randn(3, 2, dtype=torch.float64, requires_grad=True)
    gamma = torch.rand(3, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.full((3,), 4.0, dtype=torch.float64)
    folded = anybn.fold(w, None, rm, rv, gamma, None, eps=1e-12)
    folded.weight.sum().backward()
    torch.testing.assert_close(gamma.grad, w.detach().sum(1) / 2.0)
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    grad = jax.grad(lambda g: anybn.fold(jnp.ones((3, 2)), None, jnp.zeros(3), jnp.ones(3) * 4,
                                         g, eps=1e-12).weight.sum())(jnp.ones(3))  # fmt: skip
    np.testing.assert_allclose(np.asarray(grad), 1.0, rtol=1e-6)


def test_half_precision_bn_with_float32_layer_and_back() -> None:
    """Per-channel arrays of another floating dtype: the results keep the layer's dtypes."""
    w = np.ones((2, 3), np.float16)
    folded = anybn.fold(w, np.zeros(2, np.float32), np.zeros(2), np.ones(2), eps=1e-5)
    assert folded.weight.dtype == np.float16 and folded.bias.dtype == np.float32


# --- errors ---------------------------------------------------------------------------------


def _ok() -> dict[str, Any]:
    return {"w": np.ones((4, 3)), "b": np.zeros(4), "rm": np.zeros(4), "rv": np.ones(4)}


@pytest.mark.parametrize(
    ("change", "options", "kind", "words"),
    [
        ({"rm": None}, {}, ValueError, "running_mean is None"),
        ({"rv": None}, {}, ValueError, "running_var is None"),
        ({"rm": np.zeros(3)}, {}, ValueError, "running_mean must have shape (4,)"),
        ({"b": np.zeros(5)}, {}, ValueError, "bias must have shape (4,)"),
        ({"w": np.ones(4)}, {}, ValueError, "at least 2 dimensions"),
        ({"w": np.ones((4, 3), int)}, {}, TypeError, "weight must have a real floating"),
        ({"rv": np.ones(4, int)}, {}, TypeError, "running_var must have a real floating"),
        ({"w": [[1.0]]}, {}, TypeError, "weight must be an array"),
        ({}, {"eps": 0.0}, ValueError, "eps must be"),
        ({}, {"groups": 3}, ValueError, "groups=3 does not divide"),
        ({}, {"groups": 0}, ValueError, "groups must be a positive int"),
        ({}, {"groups": True}, TypeError, "groups must be a positive int"),
        ({}, {"transposed": True, "axis": 1}, ValueError, "axis and transposed=True"),
        ({}, {"transposed": "yes"}, TypeError, "transposed must be a bool"),
        ({}, {"axis": 2}, ValueError, "axis 2 is out of range"),
        (
            {"w": np.ones((3, 2, 2)), "rm": np.zeros(6), "rv": np.ones(6), "b": None},
            {"transposed": True, "groups": 2}, ValueError, "groups=2 does not divide",
        ),
    ],
)
def test_bad_input(change: dict, options: dict, kind: type, words: str) -> None:
    args = {**_ok(), **change}
    arrays = [a for a in args.values() if isinstance(a, np.ndarray)]
    with unmutated(*arrays), pytest.raises(kind, match=re.escape(words)):
        anybn.fold(args["w"], args["b"], args["rm"], args["rv"], **options)


def test_mixed_libraries() -> None:
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="running_mean must be an array of the same library"):
        anybn.fold(torch.ones(4, 3), None, np.zeros(4), torch.ones(4))
