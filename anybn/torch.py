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

Differences from PyTorch: a forward that raises (one value per channel in
training, say) leaves ``num_batches_tracked`` unchanged, where PyTorch has
already incremented it; ``torch.jit.script`` is not supported.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._functional import batch_norm as _forward
from ._functional import batch_norm_backward as _backward
from ._torch_sync import SyncBatchNorm

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm", "batch_norm", "convert"]


class _BatchNormFunction(torch.autograd.Function):
    """y = batch_norm(x, ...) with anybn's analytic, twice-differentiable backward.

    Returns ``(y, new_running_mean, new_running_var)``; the running statistics
    are None unless updated (training with running statistics) and never
    differentiable.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        out = _forward(
            x, running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=eps,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, out.mean, out.invstd)
        ctx.training, ctx.eps = training, eps
        if not (training and running_mean is not None):
            return out.y, None, None
        ctx.mark_non_differentiable(out.new_running_mean, out.new_running_var)
        return out.y, out.new_running_mean, out.new_running_var

    @staticmethod
    def backward(
        ctx: Any, dy: Tensor, _d_running_mean: Any, _d_running_var: Any
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        if ctx.training and x.requires_grad and torch.is_grad_enabled():
            # create_graph=True: this gradient will be differentiated again, and in
            # training the batch statistics are functions of x. Recompute them under
            # autograd (the core is plain array-API code that autograd traces) so the
            # second derivative sees that dependence; the saved ones are constants.
            stats = _forward(x, training=True, eps=ctx.eps)
            mean, invstd = stats.mean, stats.invstd
        dx, dweight, dbias = _backward(dy, x, weight, mean, invstd, training=ctx.training)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            dweight if need_weight else None,
            dbias if need_bias else None,
            None, None, None, None, None,
        )  # fmt: skip


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """Drop-in for :func:`torch.nn.functional.batch_norm`, computed by anybn.

    Same signature and semantics: in training the running statistics, if given,
    are updated in place; the channels are on dimension 1.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> x = torch.tensor([[1.0, 10.0], [3.0, 30.0]], requires_grad=True)
    >>> rm, rv = torch.zeros(2), torch.ones(2)
    >>> y = anybn.torch.batch_norm(x, rm, rv, training=True)
    >>> y
    tensor([[-1.0000, -1.0000],
            [ 1.0000,  1.0000]], grad_fn=<_BatchNormFunctionBackward>)
    >>> rm
    tensor([0.2000, 2.0000])
    """
    y, new_mean, new_var = _BatchNormFunction.apply(
        input, weight, bias, running_mean, running_var, training, momentum, eps
    )
    if new_mean is not None:
        assert running_mean is not None and running_var is not None
        with torch.no_grad():
            running_mean.copy_(new_mean)
            running_var.copy_(new_var)
    return y


class _AnyBNForward(nn.modules.batchnorm._BatchNorm):
    """``_BatchNorm.forward`` with the computation done by :func:`batch_norm`."""

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        # The counter to advance: training with running statistics only.
        tracked = self.num_batches_tracked if self.training and self.track_running_stats else None
        factor = 0.0 if self.momentum is None else self.momentum
        if tracked is not None and self.momentum is None:  # cumulative moving average
            factor = 1.0 / (float(tracked) + 1.0)
        # Batch statistics in training, and in eval when there are no running ones.
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # Running statistics are passed to be used (eval) or updated (training with tracking).
        use_running = not self.training or self.track_running_stats
        y = batch_norm(
            input,
            self.running_mean if use_running else None,
            self.running_var if use_running else None,
            self.weight,
            self.bias,
            use_batch_stats,
            factor,
            self.eps,
        )
        if tracked is not None:
            tracked.add_(1)
        return y


class BatchNorm1d(_AnyBNForward, nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` computed by anybn: input ``(N, C)`` or ``(N, C, L)``.

    Takes the arguments of ``torch.nn.BatchNorm1d`` (``num_features, eps=1e-5,
    momentum=0.1, affine=True, track_running_stats=True, device=None,
    dtype=None``) and behaves the same; see :mod:`anybn.torch`.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> bn = anybn.torch.BatchNorm1d(3)
    >>> bn(torch.randn(8, 3)).shape
    torch.Size([8, 3])
    >>> bn(torch.randn(8, 3, 4, 4))
    Traceback (most recent call last):
        ...
    ValueError: expected 2D or 3D input (got 4D input)
    """


class BatchNorm2d(_AnyBNForward, nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` computed by anybn: input ``(N, C, H, W)``.

    Takes the arguments of ``torch.nn.BatchNorm2d`` and behaves the same,
    channels_last inputs and float16/bfloat16 inputs with float32 parameters
    included; see :mod:`anybn.torch`.

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
    """


class BatchNorm3d(_AnyBNForward, nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` computed by anybn: input ``(N, C, D, H, W)``.

    Takes the arguments of ``torch.nn.BatchNorm3d`` and behaves the same; see
    :mod:`anybn.torch`.

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
    train/eval mode and (sync) their ``process_group``. Only modules whose type
    is exactly ``nn.BatchNorm1d``, ``nn.BatchNorm2d``, ``nn.BatchNorm3d`` or
    ``nn.SyncBatchNorm`` are replaced: subclasses (whose behaviour may differ)
    and lazy batch norms are left alone.

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
        assert isinstance(module, nn.modules.batchnorm._BatchNorm)
        converted = drop_in(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device="meta",  # placeholders: every tensor is replaced below
        )
        converted.weight, converted.bias = module.weight, module.bias
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            setattr(converted, name, getattr(module, name))
        converted.train(module.training)
        if hasattr(module, "qconfig"):
            converted.qconfig = module.qconfig
        if isinstance(module, nn.SyncBatchNorm):
            converted.process_group = module.process_group  # type: ignore[assignment]
    for name, child in module.named_children():
        converted.add_module(name, convert(child))
    return converted
