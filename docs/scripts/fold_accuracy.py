"""Accuracy of folded models: ``anybn.torch.fold`` beside PyTorch's fusers.

Usage (from the repository root; torchvision's models where torchvision is installed, on this
project's machines ``pip install torch==2.14.1 torchvision==0.29.1`` takes both from the local
disk)::

    python docs/scripts/fold_accuracy.py [--models resnet18,...] [--batch 4] [--size 96]
        [--dtype float32] [--threads 2]

For each model: random weights (``weights=None``: nothing is downloaded), batch-norm
statistics recalibrated on 8 random batches (``anybn.torch.recalibrate``, exact: what the
activations of these weights look like) and affine parameters drawn around (1, 0), so that
every batch norm does something; then, in eval mode, the output on one seeded batch of

* the model itself, in ``--dtype`` (unfolded),
* ``anybn.torch.fold(model)``,
* ``torch.fx.experimental.optimization.fuse(model)`` (None where it raises),
* ``torch.nn.utils.fusion.fuse_conv_bn_eval`` (``fuse_linear_bn_eval`` for a Linear)
  applied to the very pairs anybn folded: the same model, PyTorch's arithmetic,

each compared with a float64 copy of the unfolded model on the same input. The table has
the maximum absolute error of each over the output, divided by the output's largest
magnitude, and the number of batch norms each folded. ``docs/guides/after-training.md``
quotes it.
"""

from __future__ import annotations

import argparse
import copy
import platform
import warnings
from typing import Any

import torch
import torch.fx.experimental.optimization
from torch import nn

import anybn.torch

TORCHVISION = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
               "vgg11_bn", "densenet121")  # fmt: skip


def project_models() -> dict[str, nn.Module]:
    """The test suite's models (tests/test_torch_fold.py), rebuilt here."""
    return {
        "test cnn": nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, groups=32, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10), nn.BatchNorm1d(10),
        ),
        "test decoder": nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
        ),
    }  # fmt: skip


def prepare(model: nn.Module, size: int, seed: int) -> nn.Module:
    """Realistic batch norms: statistics of the model's own activations, affine parameters
    near (1, 0); eval mode."""
    gen = torch.Generator().manual_seed(seed)
    batches = [torch.randn(8, 3, size, size, generator=gen) for _ in range(8)]
    anybn.torch.recalibrate(model, batches)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine:
                m.weight.copy_(1.0 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return model.eval()


def pairwise_torch(model: nn.Module, pairs: list[tuple[str, str]]) -> nn.Module:
    """PyTorch's fuse_conv_bn_eval / fuse_linear_bn_eval on the pairs anybn folded."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

    out = copy.deepcopy(model)
    for layer_name, bn_name in pairs:
        layer, bn = out.get_submodule(layer_name), out.get_submodule(bn_name)
        if isinstance(layer, nn.Linear):
            fused = fuse_linear_bn_eval(layer, bn)
        else:
            transposed = isinstance(layer, nn.modules.conv._ConvTransposeNd)
            fused = fuse_conv_bn_eval(layer, bn, transpose=transposed)
        for name, new in ((layer_name, fused), (bn_name, nn.Identity())):
            parent, _, child = name.rpartition(".")
            out.get_submodule(parent).add_module(child, new)
    return out


def count_batch_norms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def measure(name: str, model: nn.Module, batch: int, size: int, dtype: torch.dtype) -> dict:
    torch.manual_seed(0)
    model = prepare(model, size, seed=1)
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        exact = copy.deepcopy(model).double()(x.double())
        model = model.to(dtype)
        xd = x.to(dtype)
        scale = exact.abs().max().item()

        def error(m: nn.Module | None) -> float | None:
            if m is None:
                return None
            return (m(xd).double() - exact).abs().max().item() / scale

        ours, report = anybn.torch.fold(model, report=True)
        bns = count_batch_norms(model)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                fx = torch.fx.experimental.optimization.fuse(model)
            fx_folded: int | str = bns - count_batch_norms(fx)
        except Exception as exc:  # torch.fx cannot trace it, or its fuser raises
            fx, fx_folded = None, f"raises {type(exc).__name__}"  # type: ignore[assignment]
        try:
            pairwise: nn.Module | None = pairwise_torch(model, report.folded)
            pairwise_error: Any = error(pairwise)
        except Exception as exc:  # grouped transposed convolutions
            pairwise_error = f"raises {type(exc).__name__}"
        return {
            "model": name, "bns": bns, "ours_folded": len(report.folded),
            "fx_folded": fx_folded, "unfolded": error(model), "anybn": error(ours),
            "fx": error(fx), "fuse_conv_bn_eval": pairwise_error,
        }  # fmt: skip


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.2e}" if isinstance(value, float) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(TORCHVISION))
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    models = project_models()
    try:
        import torchvision

        for name in args.models.split(","):
            if name:
                models[name] = getattr(torchvision.models, name)(weights=None)
    except ImportError:
        print("(torchvision is not installed: the test models only)")
    rows = [measure(name, model, args.batch, args.size, dtype) for name, model in models.items()]
    print(f"{args.dtype}, batch {args.batch}, {args.size}x{args.size}; torch {torch.__version__}; "
          f"{platform.machine()}, {platform.processor() or platform.system()}")  # fmt: skip
    print()
    print("| model | batch norms | folded: anybn / torch.fx | unfolded | anybn.torch.fold | "
          "torch.fx fuse | fuse_conv_bn_eval |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bns']} | {r['ours_folded']} / {fmt(r['fx_folded'])} | "
              f"{fmt(r['unfolded'])} | {fmt(r['anybn'])} | {fmt(r['fx'])} | "
              f"{fmt(r['fuse_conv_bn_eval'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
