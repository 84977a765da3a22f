"""``anybn.torch.fold(model)``: which batch norms are folded, which are left and why, the
folded model's output, and its accuracy beside PyTorch's fusers.

The output of every folded model is compared with the unfolded model in float64 (the
same function) and, in float32, against a float64 copy of the unfolded model: within
the float32 model's own rounding, and as accurate as ``torch.fx.experimental.optimization.fuse``
and ``torch.nn.utils.fusion.fuse_conv_bn_eval`` on the same models.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import anybn.torch  # noqa: E402


def _randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Trained-looking batch norms: running statistics and affine parameters away from 0/1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_mean is not None:
                shape = m.running_mean.shape
                m.running_mean.copy_(torch.randn(shape, generator=g) * 2)
                m.running_var.copy_(torch.rand(shape, generator=g) * 3 + 0.2)
                if m.affine:
                    m.weight.copy_(torch.randn(shape, generator=g) * 0.5 + 1)
                    m.bias.copy_(torch.randn(shape, generator=g))
    return model


def _state(model: nn.Module) -> dict[str, Any]:
    """Everything ``fold`` must leave alone: tensors (bits), module types and modes."""
    return {
        "tensors": {
            k: v.clone()
            for k, v in model.state_dict().items()
            if not nn.parameter.is_lazy(v)
        },
        "types": [(n, type(m)) for n, m in model.named_modules()],
        "modes": [m.training for m in model.modules()],
    }


def _assert_unchanged(model: nn.Module, before: dict[str, Any]) -> None:
    after = _state(model)
    assert after["types"] == before["types"] and after["modes"] == before["modes"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for k, v in before["tensors"].items():
        assert torch.equal(after["tensors"][k], v), k


def _fold(model: nn.Module) -> tuple[nn.Module, Any]:
    before = _state(model)
    folded, report = anybn.torch.fold(model, report=True)
    _assert_unchanged(model, before)
    return folded, report


class Residual(nn.Module):
    """A traceable graph: a residual block, a conv whose output has two consumers, a
    batch norm after an activation, a depthwise conv and a transposed conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(8)
        self.branch = nn.Conv2d(8, 8, 3, padding=1)
        self.branch_bn = anybn.torch.BatchNorm2d(8)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.depthwise_bn = nn.BatchNorm2d(8)
        self.after_relu_bn = nn.BatchNorm2d(8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2, groups=2)
        self.up_bn = nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 3)
        self.head_bn = nn.BatchNorm1d(3, affine=False)

    def forward(self, x: Any) -> Any:
        h = torch.relu(self.stem_bn(self.stem(x)))
        z = self.depthwise(h)  # its output has two consumers: not folded
        h = h + self.branch_bn(self.branch(h)) + self.depthwise_bn(z) + z
        h = self.after_relu_bn(torch.relu(h))
        h = self.up_bn(self.up(h))
        return self.head_bn(self.head(h.mean((2, 3))))


def test_graph_model() -> None:
    model = _randomize(Residual().double()).eval()
    folded, report = _fold(model)
    assert report.folded == [("stem", "stem_bn"), ("branch", "branch_bn"), ("up", "up_bn"),
                             ("head", "head_bn")]  # fmt: skip
    left = dict(report.left)
    assert left.keys() == {"depthwise_bn", "after_relu_bn"}
    assert "other consumers" in left["depthwise_bn"]
    assert "relu" in left["after_relu_bn"]
    assert type(folded) is Residual  # the model's class and code, not a GraphModule
    for name in ("stem_bn", "branch_bn", "up_bn", "head_bn"):
        assert type(getattr(folded, name)) is nn.Identity
    assert folded.stem.bias is not None and folded.head.bias is not None
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_sequential_and_every_kind_of_batch_norm() -> None:
    """nn.BatchNorm*d, SyncBatchNorm (torch's and anybn's), the anybn drop-ins and the frozen
    ones, after every layer kind; Linear into BatchNorm1d."""
    model = nn.Sequential(
        nn.Conv1d(2, 4, 3), nn.SyncBatchNorm(4), nn.ReLU(),
        nn.Conv1d(4, 4, 1), anybn.torch.SyncBatchNorm(4),
        nn.ConvTranspose1d(4, 6, 3, groups=2), anybn.torch.BatchNorm1d(6),
        nn.Conv1d(6, 6, 1), anybn.torch.FrozenBatchNorm1d(6),
        nn.Flatten(), nn.Linear(6 * 7, 5), nn.BatchNorm1d(5),
    ).double()  # fmt: skip
    _randomize(model)
    with torch.no_grad():
        model[8].running_mean.normal_()
        model[8].weight.uniform_(0.5, 2.0)
    model.eval()
    folded, report = _fold(model)
    assert report.folded == [("0", "1"), ("3", "4"), ("5", "6"), ("7", "8"), ("10", "11")]
    assert report.left == []
    x = torch.randn(3, 2, 7, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


def test_conv3d_and_torchvision_frozen() -> None:
    model = nn.Sequential(nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3)).double()
    _randomize(model).eval()
    folded, report = _fold(model)
    assert report.folded == [("0", "1")]
    x = torch.randn(2, 2, 3, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    misc = pytest.importorskip("torchvision.ops.misc")
    frozen = misc.FrozenBatchNorm2d(3)
    frozen.running_mean.normal_()
    model = nn.Sequential(nn.Conv2d(2, 3, 1), frozen).eval()
    folded, report = _fold(model)
    assert report.folded == [("0", "1")]
    x = torch.randn(2, 2, 3, 3)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)


class Untraceable(nn.Module):
    """Data-dependent control flow: fx cannot trace it; its Sequential still folds."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU())
        self.conv = nn.Conv2d(4, 4, 1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x: Any) -> Any:
        h = self.body(x)
        if h.sum() > 0:
            h = h * 2
        return self.bn(self.conv(h))


def test_untraceable_model_folds_its_sequentials() -> None:
    model = _randomize(Untraceable().double()).eval()
    folded, report = _fold(model)
    assert report.folded == [("body.0", "body.1")]
    (name, reason), = report.left
    assert name == "bn" and "does not trace with torch.fx" in reason and "TraceError" in reason
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)


class Shared(nn.Module):
    """One conv called twice (only one call followed by the batch norm), and a hooked pair."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(3)
        self.hooked = nn.Conv2d(3, 3, 1)
        self.hooked_bn = nn.BatchNorm2d(3)

    def forward(self, x: Any) -> Any:
        return self.bn(self.conv(x)) + self.conv(x) + self.hooked_bn(self.hooked(x))


def test_shared_and_hooked_modules_are_left() -> None:
    """torch.fx's fuse folds a conv that is also called elsewhere: a silently wrong model."""
    from torch.fx.experimental.optimization import fuse

    model = _randomize(Shared().double()).eval()
    model.hooked_bn.register_forward_hook(lambda m, i, o: o * 2)
    folded, report = _fold(model)
    left = dict(report.left)
    assert report.folded == []
    assert "'conv' is called 2 times" in left["bn"]
    assert "hooks" in left["hooked_bn"]
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-12, atol=1e-12)
    wrong = fuse(model)(x)  # the other call of `conv` gets the batch norm's scale too
    assert not torch.allclose(wrong, model(x))


def test_left_in_place_with_reasons() -> None:
    training_bn = nn.BatchNorm2d(3)
    model = nn.Sequential(
        nn.BatchNorm2d(3),  # the model's input
        nn.Conv2d(3, 3, 1), training_bn,
        nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3, track_running_stats=False),
    ).eval()  # fmt: skip
    training_bn.train()
    _, report = _fold(model)
    left = dict(report.left)
    assert report.folded == []
    assert "its input is the input of the nn.Sequential" in left["0"]
    assert "training mode" in left["2"]
    assert "no running statistics" in left["4"]
    with pytest.warns(UserWarning, match=r"left 3 batch norm\(s\) in place"):
        anybn.torch.fold(model)


def test_no_warning_when_everything_folds() -> None:
    model = _randomize(nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        anybn.torch.fold(model)


class Overridden(nn.Conv2d):
    def forward(self, x: Any) -> Any:
        return super().forward(x) * 2


def test_a_layer_that_overrides_forward_is_not_folded_into() -> None:
    model = nn.Sequential(Overridden(3, 3, 1), nn.BatchNorm2d(3)).eval()
    _, report = _fold(model)
    assert report.folded == [] and "overrides forward" in dict(report.left)["1"]


# --- errors -----------------------------------------------------------------------------


def test_training_mode_model_raises_and_is_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4))
    before = _state(model)
    with pytest.raises(ValueError, match=r"eval-mode model.*model\.eval\(\)"):
        anybn.torch.fold(model)
    _assert_unchanged(model, before)


def test_channel_mismatch_raises_and_is_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(5)).eval()
    before = _state(model)
    with pytest.raises(ValueError, match=r"Conv2d '0' has 4 output channels but the BatchNorm2d"):
        anybn.torch.fold(model)
    _assert_unchanged(model, before)


def test_lazy_module_raises_and_is_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 3, 1), nn.LazyBatchNorm2d()).eval()
    before = _state(model)
    with pytest.raises(ValueError, match=r"lazy modules that have not seen an input yet \(1\)"):
        anybn.torch.fold(model)
    _assert_unchanged(model, before)


def test_not_a_module() -> None:
    with pytest.raises(TypeError, match=r"model must be a torch\.nn\.Module"):
        anybn.torch.fold([nn.Conv2d(1, 1, 1)])  # type: ignore[arg-type]


def test_a_batch_norm_alone() -> None:
    bn = nn.BatchNorm2d(2).eval()
    folded, report = anybn.torch.fold(bn, report=True)
    assert type(folded) is nn.BatchNorm2d and report.left[0][0] == ""


# --- accuracy beside PyTorch's fusers ----------------------------------------------------


def _project_models() -> dict[str, nn.Module]:
    """The test models: every layer PyTorch's fusers fold (Conv*d, Linear into BatchNorm*d)."""
    return {
        "cnn": nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, groups=32, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10), nn.BatchNorm1d(10),
        ),
        "conv1d": nn.Sequential(
            nn.Conv1d(3, 12, 5), nn.BatchNorm1d(12), nn.ReLU(), nn.Conv1d(12, 12, 3),
            nn.BatchNorm1d(12), nn.ReLU(), nn.Flatten(),
        ),
    }  # fmt: skip


def _pairwise_fuse_conv_bn_eval(model: nn.Sequential) -> nn.Sequential:
    """``fuse_conv_bn_eval``/``fuse_linear_bn_eval`` on each (layer, batch norm) pair."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    out = copy.deepcopy(model)
    for i in range(len(out) - 1):
        layer, bn = out[i], out[i + 1]
        if isinstance(bn, nn.modules.batchnorm._BatchNorm):
            fuse = fuse_linear_bn_eval if isinstance(layer, nn.Linear) else fuse_conv_bn_eval
            out[i], out[i + 1] = fuse(layer, bn), nn.Identity()
    return out


@pytest.mark.parametrize("name", sorted(_project_models()))
def test_accuracy_beside_pytorch_fusers(name: str) -> None:
    """float32 folded models against a float64 copy of the unfolded one, over 8 seeds.

    Within float32 rounding of the output's scale, and no less accurate than torch.fx's
    fuse and fuse_conv_bn_eval: in total (the RMS errors summed over the seeds) and, per
    seed, within the spread of the float32 arithmetic (the folded layers' own rounding,
    the same for every method, dominates the maximum error).
    """
    from torch.fx.experimental.optimization import fuse

    eps32 = torch.finfo(torch.float32).eps
    totals = {"anybn": 0.0, "fx": 0.0, "fuse_conv_bn_eval": 0.0}
    for seed in range(8):
        torch.manual_seed(seed)
        model = _randomize(_project_models()[name], seed).eval()
        x = torch.randn(32, 3, 16, 16) if name == "cnn" else torch.randn(32, 3, 20)
        exact = copy.deepcopy(model).double()(x.double())
        outputs = {
            "anybn": anybn.torch.fold(model)(x),
            "fx": fuse(model)(x),
            "fuse_conv_bn_eval": _pairwise_fuse_conv_bn_eval(model)(x),
        }
        worst = {}
        for method, out in outputs.items():
            err = out.double() - exact
            totals[method] += err.square().mean().sqrt().item()
            worst[method] = err.abs().max().item()
        assert worst["anybn"] <= 32 * eps32 * exact.abs().max().item(), (seed, worst)
        assert worst["anybn"] <= 1.5 * max(worst["fx"], worst["fuse_conv_bn_eval"]), (seed, worst)
    assert totals["anybn"] <= min(totals["fx"], totals["fuse_conv_bn_eval"]), totals


def test_linear_into_batch_norm_without_affine() -> None:
    """A Linear into a BatchNorm1d(affine=False): torch's fusers raise, anybn folds it."""
    model = _randomize(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, affine=False))).eval()
    from torch.fx.experimental.optimization import fuse

    with pytest.raises(TypeError):
        fuse(model)
    folded, report = _fold(model)
    assert report.folded == [("0", "1")]
    x = torch.randn(5, 4)
    torch.testing.assert_close(folded(x), model(x), rtol=1e-5, atol=1e-5)
    assert np.isfinite(folded[0].weight.detach().numpy()).all()


def test_linear_on_3d_activations_is_left() -> None:
    """A Linear on (N, L, F) into BatchNorm1d(L): the batch norm's channels are L, not the
    Linear's features; torch's fuse_linear_bn_eval folds it when L is 1."""
    model = _randomize(nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(5))).eval()
    folded, report = _fold(model)
    assert report.folded == [] and "not its 5 channels" in dict(report.left)["1"]
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(folded(x), model(x))
