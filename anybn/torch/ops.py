"""anybn's forward and backward as PyTorch custom operators.

``anybn::batch_norm`` and ``anybn::batch_norm_backward`` run the anybn core on
tensors. As operators registered with :func:`torch.library.custom_op` they are
opaque to ``torch.compile`` (which needs only their fake, shape-only
implementations below, so a model compiles with ``fullgraph=True``), and they
carry vmap rules, so ``torch.func.vmap`` works over them. Autograd and forward-mode
AD are added by :mod:`anybn.torch`, in an ``autograd.Function`` that calls them.

Custom operators may neither return their inputs nor ``None``: where the running
statistics are not updated, the last two outputs are empty tensors.

(This module does not use ``from __future__ import annotations``: the operator
schemas are inferred from the annotations, which must be real types.)
"""

import array_api_compat
import torch
from torch import Tensor
from torch._C import _functorch

from .. import _kernels as kernels
from .._call import Call

__all__ = [
    "batch_norm",
    "batch_norm_backward",
    "batch_norm_backward_impl",
    "batch_norm_impl",
    "direct",
]

_xp = array_api_compat.array_namespace(torch.empty(0))


def direct() -> bool:
    """Whether a call may run the implementations directly, without the dispatcher.

    In plain eager mode the operators add only dispatch overhead (tens of
    microseconds a call); under ``torch.compile`` and ``torch.func`` transforms
    the operators are what make the call traceable and vmappable.
    """
    return not torch.compiler.is_compiling() and _functorch.maybe_current_level() is None


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _layout_like(out: Tensor, like: Tensor) -> Tensor:
    """``out`` with the strides ``torch.empty_like(like)`` would have (what the fake gives)."""
    if like.is_contiguous():
        return out.contiguous()
    expected = torch.empty_like(like, device="meta").stride()
    if out.stride() == expected:
        return out
    result = torch.empty_like(like, dtype=out.dtype)
    result.copy_(out)
    return result


def _count(x: Tensor) -> int:
    return x.numel() // x.shape[1]


def batch_norm_impl(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(y, mean, invstd, new_running_mean, new_running_var)`` for ``(N, C, ...)`` input.

    Arguments are checked by the caller (:func:`anybn.torch.batch_norm`). The new
    running statistics are empty unless updated (training with running statistics).
    """
    call = Call(_xp, 1, _count(input), training, momentum, eps)
    out = kernels.forward(call, input, running_mean, running_var, weight, bias)
    if training and running_mean is not None:
        new_mean, new_var = out.new_running_mean, out.new_running_var
    else:  # two tensors: outputs may not alias each other
        new_mean, new_var = input.new_empty(0), input.new_empty(0)
    y: Tensor = _layout_like(out.y, input)
    return y, out.mean, out.invstd, new_mean, new_var  # type: ignore[return-value]


batch_norm = torch.library.custom_op("anybn::batch_norm", mutates_args=())(batch_norm_impl)


@batch_norm.register_fake
def _batch_norm_fake(
    input: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    stats = input.new_empty((input.shape[1],), dtype=_accumulation_dtype(input.dtype))
    if training and running_mean is not None and running_var is not None:
        new_mean, new_var = torch.empty_like(running_mean), torch.empty_like(running_var)
    else:
        new_mean, new_var = input.new_empty(0), input.new_empty(0)
    return torch.empty_like(input), stats, torch.empty_like(stats), new_mean, new_var


def batch_norm_backward_impl(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)``; dweight and dbias in the accumulation dtype."""
    call = Call(_xp, 1, _count(input), training)
    g = kernels.backward(call, grad_output, input, weight, mean, invstd)
    return _layout_like(g.dx, input), g.dweight, g.dbias


batch_norm_backward = torch.library.custom_op("anybn::batch_norm_backward", mutates_args=())(
    batch_norm_backward_impl
)


@batch_norm_backward.register_fake
def _batch_norm_backward_fake(
    grad_output: Tensor,
    input: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    training: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    sums = input.new_empty((input.shape[1],), dtype=_accumulation_dtype(input.dtype))
    return torch.empty_like(input), sums, torch.empty_like(sums)


# --- vmap: the vmapped dimension becomes more channels --------------------------------------
#
# Under vmap each slice along the batched dimension B is a batch norm of its own, so
# (B, N, C, ...) is normalized as (N, B*C, ...): the per-channel vectors become B*C long.


def _batched(t: Tensor, dim: int | None, size: int) -> Tensor:
    """``t`` with its vmapped dimension first (expanded to ``size`` where it has none)."""
    return t.unsqueeze(0).expand(size, *t.shape) if dim is None else t.movedim(dim, 0)


def _fold(x: Tensor) -> Tensor:
    """(B, N, C, ...) -> (N, B*C, ...)."""
    b, n, c = x.shape[:3]
    return x.movedim(0, 1).reshape(n, b * c, *x.shape[3:])


def _unfold(x: Tensor, size: int) -> Tensor:
    """(N, B*C, ...) -> (B, N, C, ...)."""
    n, bc = x.shape[:2]
    return x.reshape(n, size, bc // size, *x.shape[2:]).movedim(1, 0)


def _fold_vector(t: Tensor | None, dim: int | None, size: int) -> Tensor | None:
    return None if t is None else _batched(t, dim, size).reshape(-1)


def _batch_norm_vmap(
    info, in_dims, input, weight, bias, running_mean, running_var, training, momentum, eps
):
    size = info.batch_size
    x_dim, w_dim, b_dim, rm_dim, rv_dim = in_dims[:5]
    y, mean, invstd, new_mean, new_var = batch_norm(
        _fold(_batched(input, x_dim, size)),
        _fold_vector(weight, w_dim, size),
        _fold_vector(bias, b_dim, size),
        _fold_vector(running_mean, rm_dim, size),
        _fold_vector(running_var, rv_dim, size),
        training,
        momentum,
        eps,
    )
    stats = (mean.reshape(size, -1), invstd.reshape(size, -1))
    if new_mean.numel():
        running = (new_mean.reshape(size, -1), new_var.reshape(size, -1))
        running_dims = (0, 0)
    else:
        running, running_dims = (new_mean, new_var), (None, None)
    return (_unfold(y, size), *stats, *running), (0, 0, 0, *running_dims)


def _batch_norm_backward_vmap(info, in_dims, grad_output, input, weight, mean, invstd, training):
    size = info.batch_size
    g_dim, x_dim, w_dim, m_dim, i_dim = in_dims[:5]
    dx, dweight, dbias = batch_norm_backward(
        _fold(_batched(grad_output, g_dim, size)),
        _fold(_batched(input, x_dim, size)),
        _fold_vector(weight, w_dim, size),
        _fold_vector(mean, m_dim, size),
        _fold_vector(invstd, i_dim, size),
        training,
    )
    return (_unfold(dx, size), dweight.reshape(size, -1), dbias.reshape(size, -1)), (0, 0, 0)


torch.library.register_vmap("anybn::batch_norm", _batch_norm_vmap)
torch.library.register_vmap("anybn::batch_norm_backward", _batch_norm_backward_vmap)
