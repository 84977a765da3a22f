"""The PyTorch functional drop-in: PyTorch's argument rules, the autograd Functions.

:func:`batch_norm` checks a call by PyTorch's rules (its exception types and
messages) and runs it in one of three ``torch.autograd.Function`` classes: a lean
one for plain eager calls, one with a generated vmap rule for ``torch.func``
transforms, one for ``torch.compile``. :mod:`anybn.torch` (the modules) and
:mod:`anybn.torch.sync` (``SyncBatchNorm``) build on it; it imports neither.
"""

from __future__ import annotations

import inspect
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from .. import _kernels as kernels
from .._call import Call
from .._kernels import torch_cpu
from . import ops as _torch_ops
from .ops import _xp

__all__ = ["batch_norm", "module_arguments"]


def _channel_view(v: Tensor, x: Tensor) -> Tensor:
    """A per-channel vector shaped to broadcast along dim 1 of ``x``."""
    return v.reshape(1, -1, *([1] * (x.dim() - 2)))


def _save(ctx: Any, inputs: tuple[Any, ...], mean: Tensor, invstd: Tensor) -> None:
    """What the backward and the forward-mode derivative need, on ``ctx``."""
    x, weight, bias, _, _, training, _, eps = inputs
    ctx.save_for_backward(x, weight, mean, invstd)
    ctx.save_for_forward(x, weight, mean, invstd)
    ctx.training, ctx.eps = training, eps
    ctx.weight_dtype = None if weight is None else weight.dtype
    ctx.bias_dtype = None if bias is None else bias.dtype


class _BatchNormBase(torch.autograd.Function):
    """y = batch_norm(x, ...) with anybn's analytic backward and forward-mode derivative.

    ``forward`` is the ``anybn::batch_norm`` operator and returns its five
    outputs; only y is differentiable. The first backward is the
    ``anybn::batch_norm_backward`` operator. When that backward is itself
    differentiated (double backward, ``gradgradcheck``, forward-over-reverse) it
    runs the core's generic array-API code on the tensors instead, which
    autograd traces, with the batch statistics recomputed as functions of x. The
    vmap rule is generated from these methods and the operators' vmap rules.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        training: bool,
        momentum: float,
        eps: float,
    ) -> tuple[Tensor, ...]:
        op = _torch_ops.batch_norm_impl if _torch_ops.direct() else torch.ops.anybn.batch_norm
        return tuple(op(x, weight, bias, running_mean, running_var, training, momentum, eps))

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
        _, mean, invstd, new_mean, new_var = output
        ctx.mark_non_differentiable(mean, invstd, new_mean, new_var)
        _save(ctx, inputs, mean, invstd)

    @staticmethod
    def backward(ctx: Any, dy: Tensor, *_unused: Any) -> tuple[Tensor | None, ...]:
        return _backward(ctx, dy, *ctx.saved_tensors)


def _backward(
    ctx: Any, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
) -> tuple[Tensor | None, ...]:
    """:meth:`_BatchNormBase.backward` on the saved tensors."""
    if torch.is_grad_enabled() or torch_cpu.torch_has_tangent((dy, x, weight)):
        dx, dweight, dbias = _differentiable_backward(ctx, dy, x, weight, mean, invstd)
    else:
        op = (
            _torch_ops.batch_norm_backward_impl
            if _torch_ops.direct()
            else torch.ops.anybn.batch_norm_backward
        )
        dx, dweight, dbias = op(dy, x, weight, mean, invstd, ctx.training)
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    return (
        dx if need_x else None,
        dweight.to(ctx.weight_dtype) if need_weight else None,
        dbias.to(ctx.bias_dtype) if need_bias else None,
        None, None, None, None, None,
    )  # fmt: skip


class _TransformFunction(_BatchNormBase):
    """:class:`_BatchNormBase` with forward-mode AD (``jvp``), for ``torch.func`` transforms.

    ``torch.compile`` does not trace an ``autograd.Function`` with a custom
    ``jvp``, so compiled code uses the parent class (forward-mode AD is an eager
    feature there too).
    """

    @staticmethod
    def jvp(
        ctx: Any,
        x_t: Tensor | None,
        weight_t: Tensor | None,
        bias_t: Tensor | None,
        *_unused: Any,
    ) -> tuple[Tensor | None, ...]:
        x, weight, mean, invstd = ctx.saved_tensors
        parts = []
        if x_t is not None:
            # The Jacobian of y with respect to x is symmetric (training and eval),
            # so its product with x_t is the backward's dx for dy = x_t.
            parts.append(
                torch.ops.anybn.batch_norm_backward(x_t, x, weight, mean, invstd, ctx.training)[0]
            )
        if weight_t is not None:
            xhat = (x - _channel_view(mean, x)) * _channel_view(invstd, x)
            parts.append((xhat * _channel_view(weight_t, x)).to(x.dtype))
        if bias_t is not None:
            parts.append(_channel_view(bias_t, x).expand_as(x).to(x.dtype))
        y_t = None
        for part in parts:
            y_t = part if y_t is None else y_t + part
        return y_t, None, None, None, None


def _views(tensors: tuple[Tensor | None, ...]) -> list[Any] | None:
    """NumPy views of CPU tensors (None stays None), or None where NumPy cannot view one."""
    out: list[Any] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        try:
            out.append(t.detach().numpy() if t.requires_grad else t.numpy())
        except (RuntimeError, TypeError):  # bfloat16, conjugate or negative bits, sparse
            return None
    return out


def _kernels(x: Tensor) -> Any:
    """The compiled CPU kernels if they may serve a plain eager call on ``x``, else None.

    The same choice as the fast paths make for CPU tensors (:mod:`anybn._kernels.torch_cpu`),
    made once per call: fast paths on, Numba installed, x a CPU tensor, no
    forward-mode AD level entered.
    """
    if not (x.is_cpu and kernels.enabled()):
        return None
    cpu = torch_cpu._cpu_kernels()
    if cpu is None or getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0:
        return None
    return cpu


class _BatchNormFunction(torch.autograd.Function):
    """The plain eager call: y only, the running statistics written in the forward.

    ``Function.apply`` binds the arguments to ``forward``'s signature (inspect) on
    every call when ``setup_context`` is defined; without it, it does not. The
    generated vmap rule needs ``setup_context``, so calls under ``torch.func``
    transforms use :class:`_TransformFunction` and compiled code uses
    :class:`_BatchNormBase`; the arithmetic is the same. Where the compiled CPU
    kernels serve the call, forward and backward call them on NumPy views of the
    tensors directly (the kernels and results of the fast paths, without their
    routing): the batch statistics stay NumPy arrays on ``ctx`` (only x and the
    weight are saved tensors, so that autograd still sees an in-place change to
    them), and the running statistics are written through their NumPy views.
    Otherwise they run the operators' implementations.

    The last argument, ``store``, is ``(running_mean, running_var)`` as the caller
    gave them (any shape), written in place in training, or None.
    """

    @staticmethod
    def forward(ctx: Any, *inputs: Any) -> Tensor:
        """``inputs``: :class:`_BatchNormBase`'s arguments, then ``store``."""
        *args, store = inputs
        x, weight, bias, running_mean, running_var, training, momentum, eps = args
        cpu = _kernels(x)
        views = None if cpu is None else _views((x, running_mean, running_var, weight, bias))
        if views is None or not cpu.supports(views[0]):
            ctx.stats = None
            y, mean, invstd, new_mean, new_var = _torch_ops.batch_norm_impl(*args)
            _save(ctx, tuple(args), mean, invstd)
            if store is not None and training and new_mean is not None and new_mean.numel():
                _store(store[0], new_mean)
                _store(store[1], new_var)
            return y
        # In place through the views where they are the caller's very (1-D) tensors.
        direct = store is not None and store[0] is running_mean and store[1] is running_var
        result = cpu.forward(
            *views, training=training, momentum=momentum, eps=eps, axis=1,
            running_out=(views[1], views[2]) if direct else None,
        )  # fmt: skip
        ctx.save_for_backward(x, weight)
        ctx.stats = (result[1], result[2])
        ctx.training, ctx.eps = training, eps
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if store is not None and training and not direct:
            # (a direct write leaves the version counter as it is, as nn's kernels do)
            _store(store[0], torch.from_numpy(result[3]))
            _store(store[1], torch.from_numpy(result[4]))
        return _torch_ops._layout_like(torch.from_numpy(result[0]), x)

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.stats is None:
            return (*_BatchNormBase.backward(ctx, dy), None)
        x, weight = ctx.saved_tensors
        mean, invstd = ctx.stats
        cpu: Any = None if torch.is_grad_enabled() else _kernels(x)
        views = None if cpu is None else _views((dy, x, weight))
        if views is None or not (cpu.supports(views[0]) and cpu.supports(views[1])):
            stats = torch.from_numpy(mean), torch.from_numpy(invstd)
            return (*_backward(ctx, dy, x, weight, *stats), None)
        dx, dweight, dbias = cpu.backward(*views, mean, invstd, training=ctx.training, axis=1)
        need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
        from_numpy = torch.from_numpy
        return (
            _torch_ops._layout_like(from_numpy(dx), x) if need_x else None,
            _as(from_numpy(dweight), ctx.weight_dtype) if need_weight else None,
            _as(from_numpy(dbias), ctx.bias_dtype) if need_bias else None,
            None, None, None, None, None, None,
        )  # fmt: skip

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> Tensor | None:
        return _TransformFunction.jvp(ctx, *tangents[:3])[0]


def _as(t: Tensor, dtype: torch.dtype) -> Tensor:
    """``t.to(dtype)``, without the call where t has that dtype already."""
    return t if t.dtype == dtype else t.to(dtype)


# torch's Function.apply binds its arguments with inspect.signature(forward) on every call when
# setup_context is defined (torch/autograd/function.py, bind_default_args): a precomputed
# __signature__ turns that into an attribute lookup (~10 us of the ~70 us a (8,16) call costs).
_BatchNormBase.forward.__signature__ = inspect.signature(_BatchNormBase.forward)  # type: ignore[attr-defined]


def _differentiable_backward(
    ctx: Any, dy: Tensor, x: Tensor, weight: Tensor | None, mean: Tensor, invstd: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The backward by the core's generic path, on tensors that autograd traces."""
    count = x.numel() // x.shape[1]
    with kernels.fast_paths(False):
        if ctx.training:
            # In training the batch statistics are functions of x: recompute them
            # under autograd, so the second derivative sees that dependence.
            stats = kernels.forward(
                Call(_xp, 1, count, True, 0.0, ctx.eps), x, None, None, None, None
            )
            mean, invstd = stats.mean, stats.invstd
        return tuple(
            kernels.backward(Call(_xp, 1, count, ctx.training), dy, x, weight, mean, invstd)
        )


# --- PyTorch's argument rules --------------------------------------------------------------


def _verify_batch_size(size: torch.Size) -> None:
    """PyTorch's ``_verify_batch_size``: one value per channel cannot be trained on."""
    size_prods = size[0]
    for extent in size[2:]:
        size_prods *= extent
    if size_prods == 1:
        raise ValueError(
            f"Expected more than 1 value per channel when training, got input size {size}"
        )


def _scalar_type_name(dtype: torch.dtype) -> str:
    """``Long``, ``Float``, ``ComplexFloat``: the names in PyTorch's dtype errors."""
    return torch.empty(0, dtype=dtype).type().rsplit(".", 1)[-1].removesuffix("Tensor")


def _check_arguments(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: object,
    momentum: object,
    eps: object,
) -> tuple[bool, float, float]:
    """PyTorch's checks, in its order, with its exception types and messages."""
    for position, name, value in (
        (1, "input", input),
        (2, "running_mean", running_mean),
        (3, "running_var", running_var),
        (4, "weight", weight),
        (5, "bias", bias),
    ):
        if not (value is None and position > 1) and not isinstance(value, Tensor):
            raise TypeError(
                f"batch_norm(): argument '{name}' (position {position}) must be Tensor, "
                f"not {type(value).__name__}"
            )
    for option, given, kinds in (
        ("training", training, (bool, np.bool_)),
        ("momentum", momentum, (int, float, np.integer, np.floating)),
        ("eps", eps, (int, float, np.integer, np.floating)),
    ):
        if not isinstance(given, kinds) or (option != "training" and isinstance(given, bool)):
            expected = "bool" if option == "training" else "float"
            raise TypeError(
                f"batch_norm(): argument '{option}' must be {expected}, "
                f"not {type(given).__name__}"
            )
    if training:
        _verify_batch_size(input.size())
    if training and eps <= 0.0:  # type: ignore[operator]
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if eps < 0.0:  # type: ignore[operator]
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    training, momentum, eps = bool(training), float(momentum), float(eps)  # type: ignore[arg-type]
    if training and (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must either both be None or neither be None")
    return training, momentum, eps


def _check_tensors(
    input: Tensor, vectors: dict[str, Tensor | None], training: bool
) -> dict[str, Tensor | None]:
    """Shapes, dtypes and devices as ``torch.batch_norm`` checks them; vectors made 1-D."""
    if not input.dtype.is_floating_point:
        raise NotImplementedError(
            f"\"batch_norm\" not implemented for '{_scalar_type_name(input.dtype)}'"
        )
    if input.dim() < 2:
        raise RuntimeError(
            f"batch_norm: expected input with at least 2 dimensions (N, C, ...), "
            f"got input of size {tuple(input.shape)}"
        )
    channels = input.shape[1]
    out: dict[str, Tensor | None] = {}
    for name, v in vectors.items():
        if v is None:
            if not training and name.startswith("running_"):
                raise RuntimeError(f"{name} must be defined in evaluation mode")
            out[name] = None
            continue
        if v.numel() != channels:
            raise RuntimeError(f"{name} should contain {channels} elements not {v.numel()}")
        if v.device != input.device:
            raise RuntimeError(
                f"Tensor on device {v.device} is not on the expected device {input.device}!"
            )
        out[name] = v.reshape(channels) if v.dim() != 1 else v
    dtypes = {v.dtype for v in out.values() if v is not None}
    if dtypes and dtypes != {input.dtype}:
        half = input.dtype in (torch.float16, torch.bfloat16)
        if not (half and dtypes == {torch.float32}):
            raise RuntimeError(
                "mixed dtype (CPU): all inputs must share same datatype."
                if input.dtype == torch.float64
                else "mixed dtype (CPU): expect parameter to have scalar type of Float"
            )
    return out


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

    Same signature, semantics and argument rules (exception types and messages
    included): in training the running statistics, if given, are updated in
    place; the channels are on dimension 1; ``momentum`` may be any number (it
    is ignored in eval), and ``eps`` may be 0 in eval. An empty batch gives an
    empty output and leaves the running statistics as they are; so does an input
    with no channels, with or without weight and bias (PyTorch raises IndexError
    with them). Forward-mode AD does not differentiate the running statistics, as
    in PyTorch: their tangents never reach the output, and in eval a tangent on
    one of them together with one on ``input``, ``weight`` or ``bias`` raises
    RuntimeError.

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
    training, momentum, eps = _check_arguments(
        input, running_mean, running_var, weight, bias, training, momentum, eps
    )
    if input.numel() == 0:
        # PyTorch's rule for an empty batch: no statistics, no update; the output
        # stays connected to weight and bias so that their gradients are zeros.
        # A 0-d factor keeps x's dtype; with no channels it is an empty sum (PyTorch
        # raises IndexError there).
        out = input.clone()
        if weight is not None:
            out = out * weight.reshape(-1)[:1].sum()
        if bias is not None:
            out = out + bias.reshape(-1)[:1].sum()
        return out
    if torch_cpu.torch_has_tangent((running_mean, running_var)):
        running_mean, running_var = _running_primals(
            input, running_mean, running_var, weight, bias, training
        )
    vectors = _check_tensors(
        input,
        {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias},
        training,
    )
    args = (
        input, vectors["weight"], vectors["bias"], vectors["running_mean"],
        vectors["running_var"], training, momentum, eps,
    )  # fmt: skip
    update = training and running_mean is not None and running_var is not None
    if not torch.compiler.is_compiling() and torch._C._functorch.maybe_current_level() is None:
        y: Tensor = _BatchNormFunction.apply(
            *args, (running_mean, running_var) if update else None
        )
        return y
    function = (
        _BatchNormBase if torch.compiler.is_compiling() else _TransformFunction
    )
    y, _, _, new_mean, new_var = function.apply(*args)
    if update:
        assert running_mean is not None and running_var is not None
        _store(running_mean, new_mean)
        _store(running_var, new_var)
    return y


def _running_primals(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    training: bool,
) -> tuple[Tensor | None, Tensor | None]:
    """The running statistics without their forward-mode tangents, by PyTorch's rule.

    PyTorch does not differentiate batch norm with respect to the running
    statistics: their tangents play no part in the output's (which has none when
    only they carry one), a training update leaves them as they are, and in eval
    a tangent on x, weight or bias as well raises. The primals share the
    statistics' memory, so the update still lands in the given tensors.
    """
    if not training and torch_cpu.torch_has_tangent((input, weight, bias)):
        raise RuntimeError(
            "batch_norm is not differentiable wrt running_mean and running_var, "
            "they cannot have forward grad defined"
        )
    unpack = torch.autograd.forward_ad.unpack_dual
    return (
        None if running_mean is None else unpack(running_mean).primal,
        None if running_var is None else unpack(running_var).primal,
    )


def _store(buffer: Tensor, value: Tensor) -> None:
    """``buffer[...] = value`` outside autograd (running statistics are not differentiable).

    ``value`` never requires grad (the function marks it non-differentiable), so
    only a buffer that does needs ``no_grad`` (a context manager costs ~2 us a call).
    """
    if buffer.dim() != 1:
        value = value.view_as(buffer)
    if buffer.requires_grad:
        with torch.no_grad():
            buffer.copy_(value)
    else:
        buffer.copy_(value)


def module_arguments(
    module: nn.modules.batchnorm._BatchNorm,
) -> tuple[Tensor | None, Tensor | None, bool, float, Tensor | None]:
    """PyTorch's module rule: what ``_BatchNorm.forward`` passes to the functional call.

    Returns ``(running_mean, running_var, use_batch_stats, factor, tracked)``:
    the running statistics to use (eval) or update (training with tracking),
    whether to normalize with the batch's statistics (training, and eval without
    running ones), the momentum factor (``1 / (num_batches_tracked + 1)`` for
    ``momentum=None``, a cumulative average) and the counter to advance after a
    successful call (training with running statistics only), or None.
    """
    training = module.training
    tracked = module.num_batches_tracked if training and module.track_running_stats else None
    momentum = module.momentum
    factor = 0.0 if momentum is None else momentum
    if tracked is not None and momentum is None:
        factor = 1.0 / (float(tracked) + 1.0)
    running_mean, running_var = module.running_mean, module.running_var
    use_batch_stats = training or (running_mean is None and running_var is None)
    if training and not module.track_running_stats:
        running_mean = running_var = None
    return running_mean, running_var, use_batch_stats, factor, tracked
