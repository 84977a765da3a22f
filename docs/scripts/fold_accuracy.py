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
import statistics
import warnings
from typing import Any

import torch
import torch.fx.experimental.optimization
from torch import nn

import anybn.torch

TORCHVISION = ("resnet18", "resnet50", "mobilenet_v3_small", "efficientnet_b0", "regnet_y_400mf",
               "vgg11_bn", "densenet121")  # fmt: skip


def _test_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.Conv2d(32, 32, 3, groups=32, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10), nn.BatchNorm1d(10),
    )  # fmt: skip


def _test_decoder() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.ConvTranspose2d(8, 8, 2, stride=2, groups=2), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 4, 1), nn.BatchNorm2d(4),
    )  # fmt: skip


#: The test suite's models (tests/test_torch_fold.py, and a decoder), rebuilt here.
PROJECT_MODELS = {"test cnn": _test_cnn, "test decoder": _test_decoder}


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


def measure(name: str, build: Any, batch: int, size: int, dtype: torch.dtype,
            seeds: int) -> dict:  # fmt: skip
    """The errors of one model over ``seeds`` draws (of the model and the input): for each
    method the median over draws of the maximum relative error, in ``dtype`` and with the
    folded weights run in float64 (the folding's own rounding alone)."""
    errors: dict[str, list[float]] = {}
    failures: dict[str, str] = {}
    for seed in range(seeds):
        torch.manual_seed(seed)
        model = prepare(build(), size, seed=1000 + seed)
        x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))
        with torch.no_grad():
            exact = copy.deepcopy(model).double()(x.double())
            scale = exact.abs().max().item()
            model = model.to(dtype)
            bns = count_batch_norms(model)
            ours, report = anybn.torch.fold(model, report=True)
            methods: dict[str, nn.Module | None] = {"unfolded": model, "anybn": ours}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    methods["fx"] = torch.fx.experimental.optimization.fuse(model)
                fx_folded: int | str = bns - count_batch_norms(methods["fx"])
            except Exception as exc:  # torch.fx cannot trace it, or its fuser raises
                failures["fx"] = fx_folded = f"raises {type(exc).__name__}"
            try:
                methods["pairwise"] = pairwise_torch(model, report.folded)
            except Exception as exc:  # grouped transposed convolutions
                failures["pairwise"] = f"raises {type(exc).__name__}"
            for method, m in methods.items():
                assert m is not None
                out = m(x.to(dtype)).double()
                errors.setdefault(method, []).append((out - exact).abs().max().item() / scale)
                if method != "unfolded":
                    out64 = copy.deepcopy(m).double()(x.double())
                    errors.setdefault(method + "64", []).append(
                        (out64 - exact).abs().max().item() / scale)  # fmt: skip
    row: dict[str, Any] = {"model": name, "bns": bns, "ours_folded": len(report.folded),
                           "fx_folded": fx_folded}  # fmt: skip
    for method in ("unfolded", "anybn", "fx", "pairwise", "anybn64", "fx64", "pairwise64"):
        row[method] = failures.get(method.removesuffix("64")) or statistics.median(errors[method])
    return row


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
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    builders: dict[str, Any] = dict(PROJECT_MODELS)
    try:
        import torchvision

        for name in args.models.split(","):
            if name:
                builders[name] = lambda name=name: getattr(torchvision.models, name)(weights=None)
    except ImportError:
        print("(torchvision is not installed: the test models only)")
    rows = [measure(name, build, args.batch, args.size, dtype, args.seeds)
            for name, build in builders.items()]  # fmt: skip
    print(f"{args.dtype}, batch {args.batch}, {args.size}x{args.size}, median of {args.seeds} "
          f"draws; torch {torch.__version__}; {platform.machine()}, "
          f"{platform.processor() or platform.system()}")  # fmt: skip
    print()
    print("| model | batch norms | folded: anybn / torch.fx | unfolded | anybn.torch.fold | "
          "torch.fx fuse | fuse_conv_bn_eval | folded weights in float64: anybn / torch.fx / "
          "fuse_conv_bn_eval |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['bns']} | {r['ours_folded']} / {fmt(r['fx_folded'])} | "
              f"{fmt(r['unfolded'])} | {fmt(r['anybn'])} | {fmt(r['fx'])} | "
              f"{fmt(r['pairwise'])} | {fmt(r['anybn64'])} / {fmt(r['fx64'])} / "
              f"{fmt(r['pairwise64'])} |")  # fmt: skip


if __name__ == "__main__":
    main()
