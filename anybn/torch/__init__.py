"""PyTorch drop-ins computed by the anybn core.

:class:`BatchNorm1d`, :class:`BatchNorm2d` and :class:`BatchNorm3d` are
subclasses of ``torch.nn.BatchNorm1d/2d/3d``: same constructor arguments,
input-rank checks, parameters, buffers, state-dict keys and train/eval rules,
so code that checks ``isinstance(m, nn.BatchNorm2d)`` (weight-decay groups,
fusers) keeps working. Only the computation differs: it runs through
:func:`anybn.batch_norm` and :func:`anybn.batch_norm_backward` inside a
``torch.autograd.Function``, so the gradient is anybn's analytic backward, not
autograd tracing through the forward. That backward is itself differentiable
(double backward, ``gradgradcheck``), as PyTorch's is.

:func:`convert` swaps every ``nn.BatchNorm1d/2d/3d`` of a model for these,
keeping its parameters and buffers.

One keyword more than PyTorch's: ``forward(input, mask=None)`` takes a boolean padding
mask (True where a value counts for the statistics) of the input's shape, a shape that
broadcasts to it, or the input's shape without the channel dimension; the output is
computed everywhere and autograd differentiates through the masked statistics.

Differences from PyTorch: a forward that raises (one value per channel in
training, say) leaves ``num_batches_tracked`` unchanged, where PyTorch has
already incremented it; an input with no channels gives an empty output with
weight and bias too (PyTorch raises IndexError); ``torch.jit.script`` is not
supported.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .fold import FoldReport, fold
from .frozen import (
    FrozenBatchNorm,
    FrozenBatchNorm1d,
    FrozenBatchNorm2d,
    FrozenBatchNorm3d,
    freeze,
)
from .function import KeptCall, batch_norm, masked_forward, module_arguments
from .recalibrate import recalibrate
from .sync import SyncBatchNorm
from .variants import init_variants, variant_forward

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FoldReport",
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "SyncBatchNorm",
    "batch_norm",
    "convert",
    "fold",
    "freeze",
    "recalibrate",
]


class _AnyBNForward(nn.modules.batchnorm._BatchNorm):
    """``_BatchNorm.forward`` with the computation done by :func:`batch_norm`."""

    #: batch renormalization and ghost batches (see anybn.torch.variants); class-level
    #: defaults for modules made by convert() or unpickled from before the options
    renorm = False
    virtual_batch_size: int | None = None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: Any = None,
        *,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.01,
        virtual_batch_size: int | None = None,
        **options: Any,
    ) -> None:
        # options: PyTorch's keywords of newer releases (bias=False), passed on
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats, device, dtype, **options
        )
        init_variants(self, renorm, renorm_clipping, renorm_momentum, virtual_batch_size)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        if self.renorm or self.virtual_batch_size is not None:
            self._check_input_dim(input)
            y = variant_forward(self, input, mask=mask)
            if y is not None:
                return y
        if mask is not None:  # the masked statistics: never the kept call's lane
            return masked_forward(self, input, mask)
        eager = not torch.compiler.is_compiling()
        if eager:
            kept = self.__dict__.get("_anybn_kept")
            if kept is not None:
                y = kept.forward(self, input)
                if y is not None:
                    return y
        self._check_input_dim(input)
        running_mean, running_var, use_batch_stats, factor, tracked = module_arguments(self)
        y = batch_norm(
            input, running_mean, running_var, self.weight, self.bias,
            use_batch_stats, factor, self.eps,
        )  # fmt: skip
        if tracked is not None:
            tracked.add_(1)
        if eager:  # the next call like this one skips the checks above (see KeptCall)
            self.__dict__["_anybn_kept"] = KeptCall.of(self, input)
        return y

    def __getstate__(self) -> dict[str, object]:
        """The module's state without the kept call (NumPy views of its own tensors)."""
        state = dict(super().__getstate__())
        state.pop("_anybn_kept", None)
        return state

    def __prepare_scriptable__(self) -> nn.Module:
        """``torch.jit.script`` calls this first: say that TorchScript is not supported."""
        raise RuntimeError(
            f"{type(self).__module__}.{type(self).__qualname__} does not support "
            "torch.jit.script: TorchScript cannot compile anybn's Python core. Use "
            "torch.compile (supported, fullgraph=True included) or torch.export instead"
        )


class BatchNorm1d(_AnyBNForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by anybn: input ``(N, C)`` or ``(N, C, L)``.

    Takes the arguments of ``torch.nn.BatchNorm1d`` (``num_features, eps=1e-5,
    momentum=0.1, affine=True, track_running_stats=True, device=None,
    dtype=None``) and behaves the same; see :mod:`anybn.torch`. ``forward``
    takes a ``mask=`` keyword too: True where a value counts for the
    statistics, the input's shape or ``(N, L)`` for ``(N, C, L)``. Keyword
    options beyond PyTorch's: ``renorm``, ``renorm_clipping``, ``renorm_momentum``
    (batch renormalization) and ``virtual_batch_size`` (ghost batches), as
    :class:`anybn.BatchNorm` takes them; they change the training forward only.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> bn = anybn.torch.BatchNorm1d(3)
    >>> bn(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    >>> x = torch.randn(8, 3, 5)
    >>> bn(x, mask=torch.arange(5) < 4).shape  # the last step of every sequence is padding
    torch.Size([8, 3, 5])
    >>> bn(torch.randn(8, 3, 4, 4))
    Traceback (most recent call last):
        ...
    ValueError: expected 2D or 3D input (got 4D input)
    """


class BatchNorm2d(_AnyBNForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by anybn: input ``(N, C, H, W)``.

    Takes the arguments of ``torch.nn.BatchNorm2d`` and behaves the same,
    channels_last inputs and float16/bfloat16 inputs with float32 parameters
    included; see :mod:`anybn.torch`. Keyword options beyond PyTorch's:
    ``renorm``, ``renorm_clipping``, ``renorm_momentum`` (batch renormalization,
    with three more buffers ``running_std``, ``renorm_mean``, ``renorm_std``) and
    ``virtual_batch_size`` (ghost batches), as :class:`anybn.BatchNorm` takes them;
    they change the training forward only.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> bn = anybn.torch.BatchNorm2d(3)
    >>> x = torch.randn(4, 3, 5, 5, requires_grad=True)
    >>> bn(x).sum().backward()
    >>> x.grad.abs().max() < 1e-5
    tensor(True)
    >>> int(bn.num_batches_tracked)
    1
    >>> rn = anybn.torch.BatchNorm2d(3, renorm=True, renorm_clipping={"rmax": 3.0, "dmax": 5.0})
    >>> rn(torch.randn(4, 3, 5, 5) * 2 + 1).shape
    torch.Size([4, 3, 5, 5])
    >>> sorted(k for k in rn.state_dict() if "renorm" in k or "std" in k)
    ['renorm_mean', 'renorm_std', 'running_std']
    >>> ghost = anybn.torch.BatchNorm2d(3, virtual_batch_size=2)
    >>> ghost(torch.randn(6, 3, 5, 5)).shape  # three ghost batches of two samples
    torch.Size([6, 3, 5, 5])
    """


class BatchNorm3d(_AnyBNForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by anybn: input ``(N, C, D, H, W)``.

    Takes the arguments of ``torch.nn.BatchNorm3d`` and behaves the same; see
    :mod:`anybn.torch`. Keyword options beyond PyTorch's: ``renorm``,
    ``renorm_clipping``, ``renorm_momentum`` and ``virtual_batch_size``, as for
    :class:`BatchNorm2d`.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> anybn.torch.BatchNorm3d(2, affine=False)(torch.randn(2, 2, 3, 3, 3)).shape
    torch.Size([2, 2, 3, 3, 3])
    """


_DROP_INS: dict[type[nn.Module], type[nn.modules.batchnorm._BatchNorm]] = {
    nn.BatchNorm1d: BatchNorm1d,
    nn.BatchNorm2d: BatchNorm2d,
    nn.BatchNorm3d: BatchNorm3d,
    nn.SyncBatchNorm: SyncBatchNorm,
}


def convert(module: nn.Module) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` and ``nn.SyncBatchNorm`` in ``module`` by its drop-in.

    In the spirit of ``nn.SyncBatchNorm.convert_sync_batchnorm``: the new
    modules take over the very ``Parameter`` and buffer objects of the old ones
    (so an optimizer built before the conversion keeps working), their
    train/eval mode, their other attributes (a sync batch norm's ``process_group``
    included) and their hooks (forward, forward pre-, backward and state-dict hooks).
    Only modules whose type is exactly ``nn.BatchNorm1d``, ``nn.BatchNorm2d``,
    ``nn.BatchNorm3d`` or ``nn.SyncBatchNorm`` are replaced: subclasses (whose
    behaviour may differ) and lazy batch norms are left alone.

    Parameters
    ----------
    module : torch.nn.Module
        A model, or a single batch-norm module.

    Returns
    -------
    torch.nn.Module
        ``module`` with its batch norms replaced in place, or, if ``module``
        itself is one, its replacement.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import anybn.torch
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> model = anybn.torch.convert(model)
    >>> type(model[1])
    <class 'anybn.torch.BatchNorm2d'>
    >>> isinstance(model[1], nn.BatchNorm2d)
    True
    """
    converted = module
    drop_in = _DROP_INS.get(type(module))
    if drop_in is not None:
        # The same module under the drop-in's class: every attribute carried over
        # (parameters, buffers, mode, bias=False, qconfig, anything a user set), the
        # hook dicts shared so that hooks and their handles keep working.
        converted = drop_in.__new__(drop_in)
        state = module.__dict__.copy()
        for name in ("_parameters", "_buffers", "_modules"):
            state[name] = state[name].copy()
        state["_non_persistent_buffers_set"] = set(state["_non_persistent_buffers_set"])
        converted.__dict__.update(state)
    for name, child in module.named_children():
        converted.add_module(name, convert(child))
    return converted
