"""The synchronised batch norm as a ``torch.autograd.Function``: gradients through the
global statistics, for :func:`anybn.batch_norm` with ``comm=`` on tensors that autograd
records and for :class:`anybn.torch.SyncBatchNorm`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .._core.outputs import BatchNormOutput
from . import sync as _sync
from .comm import Communicator

__all__ = ["SyncBatchNormFunction", "function_batch_norm"]


class SyncBatchNormFunction(torch.autograd.Function):
    """y = batch_norm over the ranks of a group, with the synchronized analytic backward.

    Outputs ``(y, mean, invstd, new_running_mean, new_running_var)``. With
    ``stats=True`` (the functional API) ``mean`` and ``invstd`` are
    differentiable too: their gradients join the backward's all-reduce. With
    ``stats=False`` (the module, which returns only y) they are not, and the
    all-reduce carries ``2 * C`` sums. Every rank must run the backward.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        momentum: float,
        eps: float,
        axis: int,
        comm: Communicator,
        stats: bool,
        momentum_range: bool,
        timeout: float | None = None,
        mask: Tensor | None = None,
        var_estimator: str = "unbiased",
    ) -> tuple[Tensor | None, ...]:
        out, total, call, seconds = _sync.forward(
            x, running_mean, running_var, weight, bias,
            momentum=momentum, eps=eps, axis=axis, xp=None, comm=comm,
            momentum_range=momentum_range, timeout=timeout, mask=mask,
            var_estimator=var_estimator,
        )  # fmt: skip
        ctx.save_for_backward(x, weight, out.mean, out.invstd)
        ctx.comm, ctx.total, ctx.call, ctx.stats = comm, total, call, stats
        ctx.timeout = seconds
        fixed = [out.new_running_mean, out.new_running_var]
        if not stats:
            fixed += [out.mean, out.invstd]
        ctx.mark_non_differentiable(*(t for t in fixed if t is not None))
        return out.y, out.mean, out.invstd, out.new_running_mean, out.new_running_var

    @staticmethod
    @once_differentiable
    def backward(
        ctx: Any, dy: Tensor, d_mean: Tensor | None, d_invstd: Tensor | None, *_: Any
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        stats = ctx.stats
        # Every rank must take part in the all-reduce, even one that needs no dx. The
        # forward's call serves (autograd gives dy the shape, dtype and device of y).
        dx, dweight, dbias = _sync.backward(
            ctx.comm, ctx.call, dy.contiguous(), x, weight, mean, invstd, ctx.total,
            _zeros_if_none(d_mean, mean) if stats else None,
            _zeros_if_none(d_invstd, invstd) if stats else None,
            timeout=ctx.timeout,
        )  # fmt: skip
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        return (
            dx if need_x else None,
            _as_param(dweight, weight) if need_weight else None,
            _as_param(dbias, weight) if need_bias else None,
            None, None, None, None, None, None, None, None, None, None, None,
        )  # fmt: skip


def _zeros_if_none(grad: Tensor | None, like: Tensor) -> Tensor:
    return torch.zeros_like(like) if grad is None else grad


def _as_param(grad: Tensor, param: Tensor | None) -> Tensor:
    """A parameter's gradient in the parameter's dtype (autograd requires it)."""
    return grad if param is None or grad.dtype == param.dtype else grad.to(param.dtype)


def function_batch_norm(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    momentum: float,
    eps: float,
    axis: object,
    comm: Communicator,
    timeout: float | None = None,
    mask: Tensor | None = None,
    var_estimator: str = "unbiased",
) -> BatchNormOutput:
    """:func:`anybn.batch_norm` with ``comm=`` on tensors that autograd records.

    ``y``, ``mean`` and ``invstd`` differentiate through the global statistics
    (the synchronized backward); the new running statistics carry no graph.
    """
    y, mean, invstd, new_mean, new_var = SyncBatchNormFunction.apply(
        x, weight, bias, running_mean, running_var, momentum, eps, axis, comm, True, True,
        timeout, mask, var_estimator,
    )
    return BatchNormOutput(y, mean, invstd, new_mean, new_var)
