"""The PyTorch CPU fast path: torch's own fused kernels, kept exact.

``torch.native_batch_norm`` applies the statistics as ``y = x * alpha + beta``
with ``beta = bias - mean * alpha`` in float32, which cancels when the mean is
large compared with the spread (error about ``eps * |mean| * invstd``: 1e-2 at an
offset of 1e5 and unit spread). Its statistics are exact (double, two passes)
for contiguous ``(N, C, *spatial)`` input, but for 2-D and channels-last input
they are float32 sums that lose about ``n * eps`` (3e-5 in y for 65536 values
per channel, measured). So:

* contiguous ``(N, C, *spatial)``, training: the native kernel once; if
  ``max |mean| * invstd`` is at most :data:`RATIO`, its y is as good as the
  generic path's and is returned. Else the input is centred exactly on the
  float32 batch mean ``m1`` (the native kernel in eval mode with weight 1, mean
  ``m1``, variance 1 and eps 0 computes exactly ``x - m1``) and the native kernel
  runs again on ``c = x - m1``: the corrected two-pass algorithm of
  :mod:`anybn._core.stats` with torch's kernels doing the passes.
* other layouts, training: ``m1 = x.mean``, ``c = x - m1`` (exact, as above),
  ``sum(c)`` and ``sum(c * c)`` with torch's cascade sums, merged in float64;
  y is the native eval kernel on ``c`` (weight ``invstd * w``, bias
  ``b - mean(c) * invstd * w``), which no longer cancels.
* eval: the same ratio test on the running statistics, known in advance; above
  it, centre on ``running_mean`` first.
* backward (training): ``native_batch_norm_backward`` with the given mean and
  invstd; for the layouts whose kernel cancels, on ``x - mean`` (exact) when the
  ratio is above :data:`RATIO`.

The kernel for CPU tensors (:func:`run_forward`, :func:`run_backward`) picks
among three: the compiled CPU kernels on NumPy views of the tensors (no copies)
where Numba is installed, these native kernels where they are faster, and the
NumPy block kernels on NumPy views (float16 included).

Only float32/float64 CPU tensors take the native kernels (not tracked by autograd); the
running statistics are updated on copies, never in place.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

import array_api_compat as compat

from .._core.outputs import BatchNormGrads, BatchNormOutput
from . import numba_cpu, numpy_blocks

if TYPE_CHECKING:
    from .._call import Call

__all__ = ["RATIO", "accepts", "backward", "forward", "run_backward", "run_forward", "supports"]

NAME = "torch_cpu"
FAST = True

#: Above this ``|mean| * invstd`` torch's ``x * alpha + beta`` loses more than
#: about 4 ulps of y to cancellation, and anybn centres the input first: the
#: same bound as the NumPy kernels'.
RATIO = numpy_blocks.RATIO

Tensor = Any
Array = Any


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


def wanted(x: Tensor, axis: int) -> bool:
    """Whether this path beats the NumPy kernels on NumPy views of the tensors.

    Large inputs: torch's multi-threaded kernels. Small ones: one native call
    costs less than anybn's few NumPy calls when the native statistics are exact
    enough (few values per channel); between the two, the NumPy small path.
    Never an empty tensor (no channels or no values): the generic path's.
    """
    size = x.numel()
    if size == 0:
        return False
    return bool(size > numpy_blocks.SMALL or size // x.shape[axis] <= NATIVE_STATS_COUNT)


def _channel1(a: Tensor, axis: int) -> Tensor:
    return a if axis == 1 else a.movedim(axis, 1)


def _clone(a: Tensor | None) -> Tensor | None:
    return None if a is None else a.clone()


#: Up to this many values per channel, float32 sums lose at most ~256 ulps (and
#: typically ~16): torch's native statistics are then good for any layout.
NATIVE_STATS_COUNT = 256


def _exact_native_stats(xt: Tensor) -> bool:
    """Whether torch's native statistics are exact enough for this input.

    Contiguous ``(N, C, *spatial)``: computed in double. Other layouts: float32
    sums, good for few values per channel only.
    """
    if xt.dim() > 2 and xt.is_contiguous():
        return True
    return bool(xt.numel() // xt.shape[1] <= NATIVE_STATS_COUNT)


def _near_zero(mean: Tensor, invstd: Tensor) -> bool:
    """Whether every channel's ``|mean| * invstd`` is at most :data:`RATIO`.

    False when any channel is NaN or infinite: one non-finite channel must not
    turn exact centring off for the others.
    """
    return bool(float((mean.abs() * invstd).max()) <= RATIO)


def _centre(xt: Tensor, mean: Tensor) -> Tensor:
    """``x - mean`` along dim 1, exactly rounded, by the native kernel (any layout)."""
    import torch

    ones = torch.ones_like(mean)
    return torch.ops.aten.native_batch_norm(xt, None, None, mean, ones, False, 0.0, 0.0)[0]


def _affine(c: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
    """``c * scale + shift`` along dim 1 by the native kernel (one fused pass)."""
    import torch

    zeros, ones = torch.zeros_like(scale), torch.ones_like(scale)
    return torch.ops.aten.native_batch_norm(c, scale, shift, zeros, ones, False, 0.0, 0.0)[0]


def _own_stats_forward(
    xt: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    momentum: float,
    eps: float,
    var_estimator: str = "unbiased",
) -> tuple[Tensor, ...]:
    """Training forward with anybn's statistics and torch's fused passes."""
    import torch

    dims = [0, *range(2, xt.dim())]
    count = xt.numel() // xt.shape[1]
    m1 = xt.mean(dims)
    c = _centre(xt, m1)
    s1 = c.sum(dims).double()
    q = c.square_().sum(dims).double()  # c is ours: square it in place
    mean_c = s1 / count
    m2 = (q - s1 * mean_c).clamp_min(0.0)
    invstd = torch.rsqrt(m2 / count + eps)
    scale = invstd if weight is None else invstd * weight.double()
    shift = -mean_c * scale
    if bias is not None:
        shift = shift + bias.double()
    scale32, shift32 = scale.to(xt.dtype), shift.to(xt.dtype)
    # One x-sized temporary at a time: torch's CPU allocator returns freed large
    # blocks to the system, and every fresh one costs its page faults (about a pass).
    del c
    if _near_zero(m1, invstd):
        # y = x * scale + (shift - m1 * scale): cancels by at most ~2 * RATIO ulps
        ones = torch.ones_like(m1)
        y = torch.ops.aten.native_batch_norm(xt, scale32, shift32, m1, ones, False, 0.0, 0.0)[0]
    else:
        y = _affine(_centre(xt, m1), scale32, shift32)
    mean = m1.double() + mean_c
    new_rm, new_rv = running_mean, running_var
    if running_mean is not None and running_var is not None:
        new_rm = ((1.0 - momentum) * running_mean.double() + momentum * mean).to(running_mean.dtype)
        batch_var = m2 / (count - 1 if var_estimator == "unbiased" else count)
        new_rv = ((1.0 - momentum) * running_var.double() + momentum * batch_var).to(
            running_var.dtype
        )
    return y, mean.to(xt.dtype), invstd.to(xt.dtype), new_rm, new_rv


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
    var_estimator: str = "unbiased",
) -> tuple[Tensor, ...]:
    """``(y, mean, invstd, new_running_mean, new_running_var)``; arguments validated.

    The native kernel's running update is the unbiased one: ``var_estimator="biased"``
    (denominator ``n``) takes the batch's unbiased variance from it and rescales it.
    """
    import torch

    native = torch.ops.aten.native_batch_norm
    with torch.no_grad():
        xt = _channel1(x, axis)
        biased_update = var_estimator != "unbiased" and running_var is not None
        if training and not _exact_native_stats(xt):
            y, mean, invstd, new_rm, new_rv = _own_stats_forward(
                xt, running_mean, running_var, weight, bias, momentum, eps, var_estimator
            )
        elif training:
            # The biased estimator: the native kernel writes the batch's mean and unbiased
            # variance into zeroed buffers (momentum 1), rescaled to denominator n below.
            rm_arg, rv_arg, factor = running_mean, running_var, momentum
            if biased_update:
                assert running_mean is not None and running_var is not None
                rm_arg, rv_arg = torch.zeros_like(running_mean), torch.zeros_like(running_var)
                factor = 1.0
            new_rm, new_rv = _clone(rm_arg), _clone(rv_arg)
            y, mean, invstd = native(xt, weight, bias, new_rm, new_rv, True, factor, eps)
            if not _near_zero(mean, invstd):
                m1 = mean
                centred = _centre(xt, m1)  # x - m1, exactly
                new_rm, new_rv = _clone(rm_arg), _clone(rv_arg)
                y, mean_c, invstd = native(centred, weight, bias, new_rm, new_rv, True, factor, eps)
                mean = m1 + mean_c
                if new_rm is not None:
                    new_rm += factor * m1
            if biased_update:
                assert running_mean is not None and running_var is not None
                assert new_rv is not None
                count = xt.numel() // xt.shape[1]
                batch_var = new_rv.double() * ((count - 1) / count)
                new_rm = ((1.0 - momentum) * running_mean.double() + momentum * mean.double()).to(
                    running_mean.dtype
                )
                new_rv = ((1.0 - momentum) * running_var.double() + momentum * batch_var).to(
                    running_var.dtype
                )
        else:
            assert running_mean is not None and running_var is not None
            mean = running_mean
            invstd = torch.rsqrt(running_var + eps)
            new_rm, new_rv = running_mean, running_var
            if _near_zero(running_mean, invstd):
                y = native(xt, weight, bias, running_mean, running_var, False, 0.0, eps)[0]
            else:
                scale = invstd if weight is None else invstd * weight
                shift = torch.zeros_like(invstd) if bias is None else bias
                y = _affine(_centre(xt, running_mean), scale, shift)
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
        xt = _channel1(x, axis)
        if not _exact_native_stats(xt) and not _near_zero(mean, invstd):
            xt, mean = _centre(xt, mean), torch.zeros_like(mean)
        dx, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            _channel1(dy, axis), xt, weight, None, None, mean, invstd, True, 0.0, [True, True, True]
        )
        if axis != 1:
            dx = dx.movedim(1, axis)
    return dx, dweight, dbias


# --- PyTorch CPU tensors as NumPy arrays --------------------------------------------------
#
# These run on every call with tensors: a few hundred nanoseconds per attribute read, so they
# read as little as they can (the core has already checked dtypes, shapes and devices).

_torch: Any = None  # the torch module, bound on first eager use (torch is optional)


def _torch_module() -> Any:
    global _torch
    if _torch is not None:
        return _torch
    import torch

    # Not while torch.compile traces: a global bound there is a side effect, which an
    # autograd.Function's backward may not have (fullgraph=True then fails).
    if not torch.compiler.is_compiling():
        _torch = torch
    return torch


def torch_has_tangent(tensors: tuple[Array | None, ...]) -> bool:
    """Whether forward-mode AD is tracking any of these tensors."""
    forward_ad = _torch_module().autograd.forward_ad
    # No dual level entered (the common case): nothing to unpack. The level is
    # private to torch.autograd.forward_ad; without it, unpack every tensor.
    if getattr(forward_ad, "_current_level", 0) < 0:
        return False
    return any(t is not None and forward_ad.unpack_dual(t).tangent is not None for t in tensors)


def torch_transformed(arrays: tuple[Array | None, ...]) -> bool:
    """Whether torch.func or forward-mode AD is tracing these tensors.

    The fast paths read tensors as NumPy views, call ``.item()`` and update
    temporaries in place: under ``torch.func.vmap``/``grad``/``jvp`` that fails,
    and forward-AD tangents would be dropped silently. The generic path's torch
    operations compose with both.
    """
    if _torch_module()._C._functorch.maybe_current_level() is not None:
        return True
    return torch_has_tangent(arrays)


def _torch_as_numpy(arrays: tuple[Array | None, ...]) -> list[Any] | None:
    """NumPy views of the CPU tensors of a validated call that autograd does not track, or None.

    The core has checked that the tensors share x's device and a floating dtype;
    ``numpy()`` refuses what NumPy cannot view (other devices, bfloat16, sparse,
    conjugate or negative bits), and then None sends the call elsewhere.
    """
    grad = _torch_module().is_grad_enabled()
    out: list[Any] = []
    for a in arrays:
        if a is None:
            out.append(None)
            continue
        if a.requires_grad:
            if grad:
                return None
            a = a.detach()
        try:
            out.append(a.numpy())
        except (RuntimeError, TypeError):
            return None
    return out


def _to_torch(
    results: tuple[Any, ...], views: list[Any] | tuple[()] = (), tensors: tuple[Any, ...] = ()
) -> tuple[Any, ...]:
    """Wrap NumPy results as tensors; a result that *is* one of ``views`` returns its tensor."""
    from_numpy = _torch_module().from_numpy
    out: list[Any] = []
    for r in results:
        if r is None:
            out.append(None)
            continue
        for v, t in zip(views, tensors, strict=True):
            if r is v:
                out.append(t)
                break
        else:
            out.append(from_numpy(r))
    return tuple(out)


# --- the kernel protocol -------------------------------------------------------------------

def _cpu_kernels() -> ModuleType | None:
    """:mod:`anybn._kernels.numba_cpu` when Numba is installed (and ``ANYBN_NUMBA`` is not 0)."""
    return numba_cpu if numba_cpu.AVAILABLE else None


def _numpy_module(*arrays: Any) -> Any:
    """The kernels for these NumPy arrays: compiled where they serve them, else NumPy's."""
    cpu = _cpu_kernels()
    if cpu is not None and all(cpu.supports(a) for a in arrays):
        return cpu
    return numpy_blocks


def accepts(call: Call, x: Any) -> bool:
    """CPU tensors, one channel axis, no mask."""
    return call.plain and compat.is_torch_array(x) and x.is_cpu


def run_forward(
    call: Call,
    x: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
) -> BatchNormOutput | None:
    """The forward on CPU tensors: compiled kernels on NumPy views, torch's, or NumPy's."""
    args = (x, running_mean, running_var, weight, bias)
    if torch_transformed(args):
        return None
    options = {
        "training": call.training, "momentum": call.momentum, "eps": call.eps,
        "axis": call.axis, "var_estimator": call.var_estimator,
    }  # fmt: skip
    out = _torch_cpu_forward(args, options)
    return None if out is None else BatchNormOutput(*out)


def run_backward(
    call: Call, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
) -> BatchNormGrads | None:
    """The backward on CPU tensors: compiled kernels on NumPy views, torch's, or NumPy's."""
    args = (dy, x, weight, mean, invstd)
    if torch_transformed(args):
        return None
    out = _torch_cpu_backward(args, {"training": call.training, "axis": call.axis})
    return None if out is None else BatchNormGrads(*out)


def _bits_views(args: tuple[Array | None, ...], big: int) -> list[Any] | None:
    """NumPy views for the compiled kernels of a call on bfloat16 tensors, or None.

    The first ``big`` tensors (x, or dy and x) must be bfloat16: ``int16`` views of their
    bits (:mod:`anybn._kernels.half`); the per-channel ones are viewed as they are, or, in
    bfloat16, copied to float32 (C values). None where autograd tracks one or NumPy cannot
    view one.
    """
    torch = _torch_module()
    grad = torch.is_grad_enabled()
    out: list[Any] = []
    for i, a in enumerate(args):
        if a is None:
            out.append(None)
            continue
        if a.requires_grad:
            if grad:
                return None
            a = a.detach()
        if i < big and a.dtype is not torch.bfloat16:
            return None
        try:
            if a.dtype is torch.bfloat16:
                out.append(a.view(torch.int16).numpy() if i < big else a.float().numpy())
            else:
                out.append(a.numpy())
        except (RuntimeError, TypeError):
            return None
    return out


def _bfloat16_forward(args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, ...] | None:
    """The forward on bfloat16 CPU tensors by the compiled kernels, or None."""
    if args[0].numel() == 0:  # no values: the generic path's empty results
        return None
    views = _bits_views(args, 1)
    if views is None:
        return None
    torch = _torch_module()
    y, mean, invstd, new_rm, new_rv = numba_cpu.forward(*views, **options)
    running = []
    for new, view, given in ((new_rm, views[1], args[1]), (new_rv, views[2], args[2])):
        if new is None or new is view:
            running.append(given)  # unchanged: the caller's tensor
        else:
            t = torch.from_numpy(new)
            running.append(t.to(given.dtype) if t.dtype != given.dtype else t)
    from_numpy = torch.from_numpy
    y_t = from_numpy(y).view(torch.bfloat16)
    return (y_t, from_numpy(mean), from_numpy(invstd), *running)


def _bfloat16_backward(args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, ...] | None:
    """The backward on bfloat16 CPU tensors by the compiled kernels, or None."""
    if args[1].numel() == 0:  # no values: the generic path's empty results
        return None
    views = _bits_views(args, 2)
    if views is None:
        return None
    torch = _torch_module()
    dx, dweight, dbias = numba_cpu.backward(*views, **options)
    from_numpy = torch.from_numpy
    return from_numpy(dx).view(torch.bfloat16), from_numpy(dweight), from_numpy(dbias)


def _torch_cpu_forward(args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, ...] | None:
    """The forward on CPU tensors: compiled kernels on NumPy views, torch's, or NumPy's."""
    x = args[0]
    compiled = _cpu_kernels() is not None
    if compiled and x.dtype is _torch_module().bfloat16:
        return _bfloat16_forward(args, options)
    views = _torch_as_numpy(args) if compiled else None
    if views is not None:
        module = _numpy_module(views[0])
        if module is not numpy_blocks:
            return _to_torch(module.forward(*views, **options), views, args)
    if wanted(x, options["axis"]) and supports(*args):
        return forward(*args, **options)
    if views is None:
        views = _torch_as_numpy(args)
    if views is None or not numpy_blocks.supports(views[0]):
        return None
    return _to_torch(numpy_blocks.forward(*views, **options), views, args)


def _torch_cpu_backward(args: tuple[Any, ...], options: dict[str, Any]) -> tuple[Any, ...] | None:
    """The backward on CPU tensors: compiled kernels on NumPy views, torch's, or NumPy's."""
    dy, x = args[0], args[1]
    compiled = _cpu_kernels() is not None
    if compiled and x.dtype is _torch_module().bfloat16:
        return _bfloat16_backward(args, options)
    views = _torch_as_numpy(args) if compiled else None
    if views is not None:
        module = _numpy_module(views[0], views[1])
        if module is not numpy_blocks:
            return _to_torch(module.backward(*views, **options))
    if (
        options["training"]
        and dy.dtype == x.dtype
        and wanted(x, options["axis"])
        and supports(x, dy, *args[2:])
    ):
        return backward(*args, axis=options["axis"])
    if views is None:
        views = _torch_as_numpy(args)
    if views is None or not (
        numpy_blocks.supports(views[0]) and numpy_blocks.supports(views[1])
    ):
        return None
    return _to_torch(numpy_blocks.backward(*views, **options))
