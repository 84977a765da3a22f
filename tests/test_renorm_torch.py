"""Batch renormalization and ghost batches on the ``anybn.torch`` modules.

Anchors: :func:`anybn.batch_norm` with the same options on explicit state (itself checked
against Keras 3 and Keras 2's rule in tests/test_renorm.py and tests/test_ghost.py), and
torch autograd through the module against :func:`anybn.batch_norm_backward`.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import anybn  # noqa: E402
import anybn.torch as abt  # noqa: E402

CLIP = {"rmin": 0.8, "rmax": 1.25, "dmax": 0.5}


@pytest.mark.parametrize("cls", [abt.BatchNorm1d, abt.BatchNorm2d, abt.SyncBatchNorm])
def test_module_renorm_equals_functional(cls: Any) -> None:
    rng = np.random.default_rng(0)
    shape = (6, 3, 4) if cls is abt.BatchNorm1d else (6, 3, 2, 2)
    m = cls(3, momentum=0.2, renorm=True, renorm_clipping=dict(CLIP),
            renorm_momentum=0.3).double()  # fmt: skip
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(rng.uniform(0.5, 2, 3)))
        m.bias.copy_(torch.from_numpy(rng.normal(size=3)))
    keys = ("running_mean", "running_var", "running_std", "renorm_mean", "renorm_std")
    state = {k: np.asarray(getattr(m, k)).copy() for k in keys}
    w, b = m.weight.detach().numpy().copy(), m.bias.detach().numpy().copy()
    clipped = False
    for t in range(3):
        x = rng.normal(2.0 - t, 2.0, size=shape)
        dy = rng.normal(size=shape)
        xt = torch.from_numpy(x).requires_grad_()
        m.weight.grad = m.bias.grad = None
        y = m(xt)
        y.backward(torch.from_numpy(dy))
        out = anybn.batch_norm(
            x, state["running_mean"], state["running_var"], w, b, training=True, momentum=0.2,
            renorm=True, renorm_clipping=CLIP, renorm_momentum=0.3,
            renorm_mean=state["renorm_mean"], renorm_std=state["renorm_std"],
            running_std=state["running_std"], eps=m.eps,
        )  # fmt: skip
        g = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, renorm_r=out.r,
                                      renorm_d=out.d)  # fmt: skip
        np.testing.assert_allclose(y.detach().numpy(), out.y, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(xt.grad.numpy(), g.dx, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.weight.grad.numpy(), g.dweight, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(m.bias.grad.numpy(), g.dbias, rtol=1e-10, atol=1e-12)
        state = {
            "running_mean": out.new_running_mean, "running_var": out.new_running_var,
            "running_std": out.new_running_std, "renorm_mean": out.new_renorm_mean,
            "renorm_std": out.new_renorm_std,
        }  # fmt: skip
        for k, v in state.items():
            np.testing.assert_allclose(getattr(m, k).numpy(), v, rtol=1e-13, err_msg=k)
        clipped |= bool(np.any((out.r == 0.8) | (out.r == 1.25)) | np.any(abs(out.d) == 0.5))
    assert clipped
    assert int(m.num_batches_tracked) == 3
    assert {"running_std", "renorm_mean", "renorm_std"} <= set(m.state_dict())
    m.eval()  # eval: the plain module on the running statistics
    x = torch.randn(shape, dtype=torch.float64)
    want = torch.nn.functional.batch_norm(x, m.running_mean, m.running_var, m.weight, m.bias,
                                          False, 0.0, m.eps)  # fmt: skip
    torch.testing.assert_close(m(x), want)


def test_module_ghost_batches() -> None:
    rng = np.random.default_rng(1)
    m = abt.BatchNorm2d(3, virtual_batch_size=2, momentum=0.3).double()
    x = rng.normal(size=(6, 3, 2, 2))
    dy = rng.normal(size=x.shape)
    xt = torch.from_numpy(x).requires_grad_()
    y = m(xt)
    y.backward(torch.from_numpy(dy))
    out = anybn.batch_norm(x, np.zeros(3), np.ones(3), np.ones(3), np.zeros(3), training=True,
                           momentum=0.3, virtual_batch_size=2)  # fmt: skip
    g = anybn.batch_norm_backward(dy, x, np.ones(3), out.mean, out.invstd, virtual_batch_size=2)
    np.testing.assert_allclose(y.detach().numpy(), out.y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(xt.grad.numpy(), g.dx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.weight.grad.numpy(), g.dweight, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(m.running_mean.numpy(), out.new_running_mean, rtol=1e-13)
    np.testing.assert_allclose(m.running_var.numpy(), out.new_running_var, rtol=1e-13)
    # a batch size that is not a multiple: ValueError, buffers and counter as they were
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="virtual_batch_size=2 must divide the batch size"):
        m(torch.randn(5, 3, 2, 2, dtype=torch.float64))
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)
    m.eval()
    x = torch.randn(5, 3, 2, 2, dtype=torch.float64)
    want = torch.nn.functional.batch_norm(
        x, m.running_mean, m.running_var, m.weight, m.bias, False, 0.0, m.eps
    )
    torch.testing.assert_close(m(x), want)


@pytest.mark.parametrize(
    ("options", "error", "match"),
    [
        ({"renorm": True, "renorm_clipping": {"rmax": 0.9}}, ValueError, "must be >= 1"),
        ({"renorm": True, "renorm_clipping": {"dmax": -1.0}}, ValueError, "must be >= 0"),
        ({"renorm": True, "renorm_clipping": {"x": 1.0}}, ValueError, "unknown keys"),
        ({"renorm": True, "track_running_stats": False}, ValueError, "needs running statistics"),
        ({"virtual_batch_size": 0}, ValueError, "virtual_batch_size must be >= 1"),
    ],
)
@pytest.mark.parametrize("cls", [abt.BatchNorm1d, abt.SyncBatchNorm])
def test_bad_options(cls: Any, options: dict[str, Any], error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        cls(3, **options)


def test_bad_clipping_at_forward_leaves_state() -> None:
    m = abt.BatchNorm1d(2, renorm=True)
    x = torch.randn(4, 2)
    m(x)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.renorm_clipping = {"rmin": 2.0}
    with pytest.raises(ValueError, match=r"renorm_clipping\['rmin'\] must be in \[0, 1\]"):
        m(x)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, before[k], rtol=0, atol=0, msg=k)


def test_converted_modules_have_no_variants() -> None:
    m = abt.convert(torch.nn.BatchNorm2d(3))
    assert m.renorm is False and m.virtual_batch_size is None
    assert "renorm_mean" not in m.state_dict()
    m(torch.randn(2, 3, 2, 2))


@pytest.mark.parametrize(
    "options",
    [{"renorm": True}, {"virtual_batch_size": 2}, {"renorm": True, "virtual_batch_size": 2}],
    ids=["renorm", "ghost", "both"],
)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_layouts_and_half_precision(options: dict[str, Any], dtype: str) -> None:
    """channels_last input gives channels_last output (as PyTorch's modules); float16 and
    bfloat16 input with float32 buffers gives output and gradient in the input's dtype,
    equal to the float32 computation on the same values."""
    m = abt.BatchNorm2d(3, **options)
    ref = abt.BatchNorm2d(3, **options)
    x = torch.randn(4, 3, 5, 5).to(getattr(torch, dtype))
    xl = x.to(memory_format=torch.channels_last).requires_grad_()
    y = m(xl)
    assert y.dtype == x.dtype and y.is_contiguous(memory_format=torch.channels_last)
    y.float().sum().backward()
    assert xl.grad.dtype == x.dtype
    want = ref(x.float())
    tol = {"float32": 1e-6, "float16": 2e-3, "bfloat16": 2e-2}[dtype]
    torch.testing.assert_close(y.float(), want, rtol=tol, atol=tol)
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(m.state_dict()[k], v, rtol=1e-6, atol=1e-6, msg=k)
