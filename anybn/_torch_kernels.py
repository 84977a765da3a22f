"""The PyTorch CPU fast path: torch's own fused kernels, kept exact.

``torch.native_batch_norm`` computes its statistics well (in double, two
passes) but applies them as ``y = x * alpha + beta`` with
``beta = bias - mean * alpha`` in float32, which cancels when the mean is
large compared with the spread: the error of y is about
``eps * |mean| * invstd`` (at an offset of 1e5 and unit spread, 1e-2). So:

* training: run the native kernel once; if ``max |mean| * invstd`` is at most
  :data:`RATIO` its y is as good as the generic path's and is returned. Else
  the input is first centred exactly on the (float32) batch mean, ``c = x - m1``
  (the native kernel in eval mode with weight 1, mean ``m1``, variance 1 and
  eps 0 computes exactly ``x - m1``), and the native kernel runs on ``c``: its
  statistics are those of x shifted by ``m1`` and its y no longer cancels. This
  is the corrected two-pass algorithm of :mod:`anybn._stats` with torch's
  kernels doing the passes.
* eval: the same test on the running statistics, known in advance; above the
  ratio, centre on ``running_mean`` and scale, two exact passes.
* backward (training): ``native_batch_norm_backward`` with the saved mean and
  invstd forms ``x - mean`` explicitly and needs nothing else.

Only float32/float64 CPU tensors take this path (no autograd tracking); the
running statistics are updated on copies, never in place.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RATIO", "backward", "forward", "supports"]

#: Above this ``|mean| * invstd`` torch's ``x * alpha + beta`` loses more than
#: about 4 ulps of y to cancellation, and anybn centres the input first.
RATIO = 8.0

Tensor = Any


def supports(x: Tensor, *others: Tensor | None) -> bool:
    """Whether the native kernels serve these tensors: float32/64 on the CPU, untracked."""
    import torch

    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.numel() == 0:
        return False
    if x.layout != torch.strided:
        return False
    if torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (x, *others)):
        return False
    return True


def _channel1(a: Tensor, axis: int) -> Tensor:
    return a if axis == 1 else a.movedim(axis, 1)


def _clone(a: Tensor | None) -> Tensor | None:
    return None if a is None else a.clone()


def forward(
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    *,
    training: bool,
    momentum: float,
    eps: float,
    axis: int,
) -> tuple[Tensor, ...]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``; arguments validated."""
    import torch

    native = torch.ops.aten.native_batch_norm
    with torch.no_grad():
        xt = _channel1(x, axis)
        ones = None
        if training:
            new_rm, new_rv = _clone(running_mean), _clone(running_var)
            y, mean, invstd = native(xt, weight, bias, new_rm, new_rv, True, momentum, eps)
            if float((mean.abs() * invstd).max()) > RATIO:
                m1 = mean
                ones = torch.ones_like(m1)
                centred = native(xt, None, None, m1, ones, False, 0.0, 0.0)[0]  # x - m1, exactly
                new_rm, new_rv = _clone(running_mean), _clone(running_var)
                y, mean_c, invstd = native(
                    centred, weight, bias, new_rm, new_rv, True, momentum, eps
                )
                mean = m1 + mean_c
                if new_rm is not None:
                    new_rm += momentum * m1
        else:
            assert running_mean is not None and running_var is not None
            mean = running_mean
            invstd = torch.rsqrt(running_var + eps)
            new_rm, new_rv = running_mean, running_var
            if float((running_mean.abs() * invstd).max()) <= RATIO:
                y = native(xt, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
            else:
                ones = torch.ones_like(invstd)
                centred = native(xt, None, None, running_mean, ones, False, 0.0, 0.0)[0]
                scale = invstd if weight is None else invstd * weight
                zeros = torch.zeros_like(invstd)
                y = native(centred, scale, bias, zeros, ones, False, 0.0, 0.0)[0]
        if axis != 1:
            y = y.movedim(1, axis)
    return y, mean, invstd, new_rm, new_rv


def backward(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    *,
    axis: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(dx, dweight, dbias)`` in training mode; arguments validated."""
    import torch

    with torch.no_grad():
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            _channel1(dy, axis),
            _channel1(x, axis),
            weight,
            None,
            None,
            mean,
            invstd,
            True,
            0.0,
            [True, True, True],
        )
        if axis != 1:
            dx = dx.movedim(1, axis)
    return dx, dweight, dbias
