"""The PyTorch functional drop-in: PyTorch's argument rules, the autograd Functions.

:func:`batch_norm` checks a call by PyTorch's rules (its exception types and
messages) and runs it in one of three ``torch.autograd.Function`` classes: a lean
one for plain eager calls, one with a generated vmap rule for ``torch.func``
transforms, one for ``torch.compile``. :mod:`anybn.torch` (the modules) and
:mod:`anybn.torch.sync` (``SyncBatchNorm``) build on it; it imports neither.
"""

from __future__ import annotations

import inspect
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn

from .. import _kernels as kernels
from .._call import Call
from .._kernels import numba_cpu, torch_cpu
from .._kernels.pool import _quiet as pool_quiet
from .._layer.rules import running_factor, uses_batch_stats
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
    """NumPy views of CPU tensors (None stays None), or None where NumPy cannot view one.

    bfloat16, which NumPy lacks, becomes a float32 copy (per-channel tensors: C values)."""
    out: list[Any] = []
    for t in tensors:
        if t is None:
            out.append(None)
            continue
        try:
            if t.dtype is torch.bfloat16:
                out.append(t.detach().float().numpy())
            else:
                out.append(t.detach().numpy() if t.requires_grad else t.numpy())
        except (RuntimeError, TypeError):  # conjugate or negative bits, sparse
            return None
    return out


def _bits(t: Tensor) -> Any:
    """A NumPy view of x or dy for the kernels: bfloat16 as its bits (``int16``)."""
    if t.requires_grad:
        t = t.detach()
    return t.view(torch.int16).numpy() if t.dtype is torch.bfloat16 else t.numpy()


def _tensor(a: np.ndarray, like: Tensor) -> Tensor:
    """The kernels' y or dx for ``like`` (x): a tensor on the same memory, bfloat16 again."""
    t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if like.dtype is torch.bfloat16 else t


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


class Lane(NamedTuple):
    """A plain eager call on CPU tensors, in the form the compiled kernels take it.

    Built once per call by :func:`batch_norm`, or kept between calls by the modules
    (:mod:`anybn.torch`), whose parameters and buffers are the same tensors call after
    call: the NumPy views of the per-channel tensors are then made once.
    """

    running_mean: np.ndarray  #: the kernels' per-channel arrays (empty: absent)
    running_var: np.ndarray
    weight: np.ndarray
    bias: np.ndarray
    training: bool
    momentum: float
    eps: float
    #: training with running statistics: the update is written
    update: bool
    #: NumPy views of the caller's running statistics, updated in place through them; None:
    #: the update is copied into ``store``
    running_out: tuple[np.ndarray, np.ndarray] | None
    #: whether the kernels write ``running_out`` themselves (it has their dtype)
    in_kernel: bool
    #: the running statistics as the caller gave them (any shape)
    store: tuple[Tensor, Tensor] | None


def lane(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    store: tuple[Tensor, Tensor] | None,
    *,
    keep: bool = False,
) -> Lane | None:
    """The :class:`Lane` of a checked eager call, or None where the compiled kernels do not
    serve it (no Numba, fast paths off, forward-mode AD, a dtype or tensor NumPy cannot view).

    ``store`` is ``(running_mean, running_var)`` as the caller gave them (any shape), to
    update in training, or None. ``keep``: the lane is kept between calls, and its views
    are made of detached tensors, which hold the memory they view even where a tensor's
    ``.data`` is later replaced.
    """
    cpu = _kernels(x)
    if cpu is None or not _viewable(x) or x.dtype not in _LANE_DTYPES or x.numel() == 0:
        return None
    vectors = (running_mean, running_var, weight, bias)
    if keep:
        vectors = tuple(None if t is None else t.detach() for t in vectors)  # type: ignore[assignment]
    views = _views(vectors)
    if views is None:
        return None
    dt = _LANE_DTYPES[x.dtype]
    rm, rv, w, b = laid = [cpu._vector(v, dt) for v in views]
    if keep and (
        any(v is not None and k is not v for k, v in zip(laid, views, strict=True))
        or any(t is not None and t.dtype is torch.bfloat16 for t in vectors)
    ):
        return None  # a copy in the kernels' dtype (float16 parameters) would not follow them
    update = store is not None and training
    running_out = None
    if update:
        assert store is not None
        # In place through the views where they are the caller's very (1-D) tensors
        # (a direct write leaves the version counter as it is, as nn's kernels do).
        if (
            store[0] is running_mean
            and store[1] is running_var
            and store[0].dtype is not torch.bfloat16
            and store[1].dtype is not torch.bfloat16
        ):
            running_out = (views[0], views[1])
    elif training:
        rm = rv = cpu._vector(None, dt)
    in_kernel = running_out is not None and cpu.vectors_serve(*running_out, dtype=dt)
    return Lane(
        rm, rv, w, b, training, momentum, eps, update, running_out, in_kernel,
        store if update else None,
    )  # fmt: skip


def _viewable(x: Tensor) -> bool:
    """Whether ``x.numpy()`` gives a view: a strided tensor without the negative bit."""
    return x.layout is torch.strided and not x.is_neg()


#: x dtypes the lane serves -> the dtype of the kernels' arithmetic
_LANE_DTYPES = {
    torch.bfloat16: np.dtype(np.float32),
    torch.float16: np.dtype(np.float32),
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


class Eager(NamedTuple):
    """A plain eager call that the compiled kernels do not serve: the operators'
    implementations compute it (:mod:`anybn.torch.ops`)."""

    running_mean: Tensor | None
    running_var: Tensor | None
    training: bool
    momentum: float
    eps: float
    #: the running statistics as the caller gave them (any shape), to update, or None
    store: tuple[Tensor, Tensor] | None


class _BatchNormFunction(torch.autograd.Function):
    """The plain eager call: y only, the running statistics written in the forward.

    ``call`` is a :class:`Lane` (the compiled CPU kernels on NumPy views of the tensors:
    the kernels and results of the fast paths, without their routing) or an
    :class:`Eager` call (the operators' implementations). On the lane the batch
    statistics stay NumPy arrays on ``ctx``, and only x and the weight are saved
    tensors, so that autograd still sees an in-place change to them.

    ``Function.apply`` binds the arguments to ``forward``'s signature (inspect) on
    every call when ``setup_context`` is defined; without it, it does not. The
    generated vmap rule needs ``setup_context``, so calls under ``torch.func``
    transforms use :class:`_TransformFunction` and compiled code uses
    :class:`_BatchNormBase`; the arithmetic is the same.
    """

    @staticmethod
    def forward(
        ctx: Any, x: Tensor, weight: Tensor | None, bias: Tensor | None, call: Lane | Eager
    ) -> Tensor:
        ctx.weight_dtype = None if weight is None else weight.dtype
        ctx.bias_dtype = None if bias is None else bias.dtype
        if type(call) is Eager:
            ctx.laid = None
            args = (x, weight, bias, call.running_mean, call.running_var, call.training,
                    call.momentum, call.eps)  # fmt: skip
            y, mean, invstd, new_mean, new_var = _torch_ops.batch_norm_impl(*args)
            _save(ctx, args, mean, invstd)
            if call.store is not None and call.training and new_mean.numel():
                _store(call.store[0], new_mean)
                _store(call.store[1], new_var)
            return y
        return _lane_forward(ctx, x, weight, call)  # type: ignore[arg-type]

    @staticmethod
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.laid is None:
            return (*_backward(ctx, dy, *ctx.saved_tensors)[:3], None)
        return _lane_backward(ctx, dy)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor | None) -> Tensor | None:
        # (the lane is never taken under forward-mode AD: see _kernels)
        return _TransformFunction.jvp(ctx, *tangents[:3])[0]


def _lane_forward(ctx: Any, x: Tensor, weight: Tensor | None, lane: Lane) -> Tensor:
    """:meth:`_BatchNormFunction.forward` on the compiled kernels."""
    xc, layout = numba_cpu._layout(_bits(x), 1)
    running_out = lane.running_out if lane.in_kernel else None
    if lane.update and running_out is None:
        channels = layout.view[1]
        running_out = (np.empty(channels), np.empty(channels))  # float64, rounded below
    y, mean, invstd = numba_cpu.forward_laid(
        xc, layout, lane.running_mean, lane.running_var, lane.weight, lane.bias,
        training=lane.training, momentum=lane.momentum, eps=lane.eps, ddof=1.0,
        running_out=running_out,
    )  # fmt: skip
    if lane.update and not lane.in_kernel:
        assert running_out is not None and lane.store is not None
        with pool_quiet():  # (a float64 -> float32/float16 cast may overflow)
            if lane.running_out is not None:
                for view, new in zip(lane.running_out, running_out, strict=True):
                    np.copyto(view, new)
            else:
                for buffer, new in zip(lane.store, running_out, strict=True):
                    _store(buffer, _rounded(new, buffer.dtype))
    ctx.save_for_backward(x, weight)
    ctx.laid = (xc, layout, lane.weight, mean, invstd)
    ctx.training, ctx.eps = lane.training, lane.eps
    return _like(_tensor(y, x), x, layout)


def _rounded(new: np.ndarray, dtype: torch.dtype) -> Tensor:
    """A float64 running statistic as a tensor of ``dtype``."""
    if dtype is torch.bfloat16:
        return torch.from_numpy(new).to(dtype)
    return torch.from_numpy(new.astype(_NUMPY[dtype]))


def _like(out: Tensor, x: Tensor, layout: Any) -> Tensor:
    """The kernels' y or dx as a tensor with the strides ``torch.empty_like(x)`` has; a
    C-ordered x (no permutation, no copy) gives a C-ordered result as it is."""
    if layout.perm is None and not layout.copy:
        return out
    return _torch_ops._layout_like(out, x)


def _lane_backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
    """:meth:`_BatchNormFunction.backward` on the compiled kernels (or, where dy is not
    for them, the operators')."""
    x, weight = ctx.saved_tensors  # (raises if either was changed in place)
    xc, layout, w, mean, invstd = ctx.laid
    dyv = None
    if not torch.is_grad_enabled() and dy.dtype == x.dtype and _kernels(dy) is not None:
        try:
            dyv = _bits(dy)
        except (RuntimeError, TypeError):  # conjugate or negative bits
            dyv = None
    if dyv is None:
        stats = torch.from_numpy(mean), torch.from_numpy(invstd)
        return (*_backward(ctx, dy, x, weight, *stats)[:3], None)
    dx, dw, db = numba_cpu.backward_laid(
        numba_cpu.dy_laid(dyv, layout, dyv.dtype), xc, layout, w, mean, invstd,
        training=ctx.training,
    )  # fmt: skip
    need_x, need_weight, need_bias = ctx.needs_input_grad[:3]
    from_numpy = torch.from_numpy
    dweight = dbias = None
    if need_weight:
        dweight = from_numpy(dw)
        if dweight.dtype != ctx.weight_dtype:
            dweight = dweight.to(ctx.weight_dtype)
    if need_bias:
        dbias = from_numpy(db)
        if dbias.dtype != ctx.bias_dtype:
            dbias = dbias.to(ctx.bias_dtype)
    return _like(_tensor(dx, x), x, layout) if need_x else None, dweight, dbias, None


#: x dtype -> the dtype of the kernels' arithmetic (the per-channel tensors a kept call views)
_COMPUTE = {
    torch.bfloat16: torch.float32,
    torch.float16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}

_NUMPY = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64}


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


class KeptCall(NamedTuple):
    """A drop-in module's last call, kept so that the next one like it skips every check.

    It serves a call on a CPU tensor of the same shape and dtype, in plain eager mode
    with the compiled kernels on, on a module whose options are these very objects
    (identity: a reassigned option, even to an equal value, is checked again) and
    whose parameters and buffers are these very tensors on the memory they had
    (``data_ptr``, shape and dtype: the lane's views are of that memory). Anything
    else takes the module's checked call, which keeps a new one.
    """

    shape: torch.Size
    dtype: torch.dtype
    options: tuple[Any, ...]  #: training, momentum, eps, track_running_stats
    tensors: tuple[Tensor | None, ...]  #: weight, bias, running_mean, running_var, counter
    memory: tuple[tuple[int, torch.Size, torch.dtype], ...]  #: of each tensor present
    lane: Lane
    cumulative: bool  #: momentum=None in training: the factor is 1 / (batches + 1)
    #: a NumPy view of the counter to advance (training with running statistics), or None
    counter: np.ndarray | None

    @classmethod
    def of(cls, module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> KeptCall | None:
        """The kept call of the call ``module(x)`` that has just succeeded, or None."""
        if type(x) is not Tensor or torch.compiler.is_compiling() or _kernels(x) is None:
            return None
        if torch._C._functorch.maybe_current_level() is not None:
            return None
        params, buffers = module._parameters, module._buffers
        tensors = (
            params.get("weight"), params.get("bias"), buffers.get("running_mean"),
            buffers.get("running_var"), buffers.get("num_batches_tracked"),
        )  # fmt: skip
        registered = (module.weight, module.bias, module.running_mean, module.running_var)
        if any(t is not r for t, r in zip(tensors, registered, strict=False)):
            return None  # a parameter or buffer that is a plain attribute
        compute = _COMPUTE.get(x.dtype)
        if any(t is not None and (t.dim() != 1 or t.dtype is not compute) for t in tensors[:4]):
            return None  # (the lane would read copies of them in the kernels' dtype)
        running_mean, running_var, use_batch_stats, factor, tracked = module_arguments(module)
        update = use_batch_stats and running_mean is not None and running_var is not None
        kept = lane(
            x, tensors[0], tensors[1], running_mean, running_var, use_batch_stats, factor,
            module.eps, (running_mean, running_var) if update else None, keep=True,  # type: ignore[arg-type]
        )  # fmt: skip
        if kept is None:
            return None
        options = (module.training, module.momentum, module.eps, module.track_running_stats)
        memory = tuple((t.data_ptr(), t.shape, t.dtype) for t in tensors if t is not None)
        cumulative = tracked is not None and module.momentum is None
        counter = None if tracked is None else tracked.detach().numpy()
        return cls(x.shape, x.dtype, options, tensors, memory, kept, cumulative, counter)

    def forward(self, module: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor | None:
        """``module(x)`` if this call serves it (else None): y, the running statistics and
        the counter updated as the checked call would."""
        if (
            type(x) is not Tensor
            or x.shape != self.shape
            or x.dtype is not self.dtype
            or not x.is_cpu
            or not _viewable(x)
        ):
            return None
        training, momentum, eps, track = self.options
        if (
            module.training is not training
            or module.momentum is not momentum
            or module.eps is not eps
            or module.track_running_stats is not track
        ):
            return None
        params, buffers = module._parameters, module._buffers
        weight, bias, running_mean, running_var, counter = self.tensors
        if (
            params.get("weight") is not weight
            or params.get("bias") is not bias
            or buffers.get("running_mean") is not running_mean
            or buffers.get("running_var") is not running_var
            or buffers.get("num_batches_tracked") is not counter
        ):
            return None
        present = (t for t in self.tensors if t is not None)
        for t, (pointer, shape, dtype) in zip(present, self.memory, strict=False):
            if t.data_ptr() != pointer or t.shape != shape or t.dtype is not dtype:
                return None
        if (
            not kernels.enabled()
            or torch.compiler.is_compiling()
            or torch._C._functorch.maybe_current_level() is not None
            or getattr(torch.autograd.forward_ad, "_current_level", 0) >= 0
        ):
            return None
        call = self.lane
        if self.cumulative:
            assert self.counter is not None
            call = call._replace(momentum=running_factor(None, float(self.counter) + 1.0))
        y: Tensor = _BatchNormFunction.apply(x, weight, bias, call)
        if self.counter is not None:
            # (through its view: num_batches_tracked.add_(1) costs 2 us a call here)
            self.counter[()] += 1
        return y


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
        store = (running_mean, running_var) if update else None
        call: Lane | Eager | None = lane(input, *args[1:], store)  # type: ignore[arg-type]
        if call is None:
            call = Eager(*args[3:], store)  # type: ignore[arg-type]
        y: Tensor = _BatchNormFunction.apply(input, args[1], args[2], call)
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


def masked_forward(
    module: nn.modules.batchnorm._BatchNorm, input: Tensor, mask: Tensor, comm: Any = None
) -> Tensor:
    """A module's forward with ``mask=``: the statistics of the values where it is True.

    PyTorch's module rule (which statistics, the momentum factor, the counter), the
    mask checked and broadcast as :func:`anybn.batch_norm` takes it, and the core's
    masked training forward, which autograd differentiates (as the functional API's
    masked path on tensors). ``comm`` (a communicator, training only): synchronised
    over its ranks, with the analytic backward. In eval the mask is checked and
    plays no part. The running statistics and the counter change only when the
    forward succeeds.
    """
    from .._call import resolve_forward

    module._check_input_dim(input)
    running_mean, running_var, use_batch_stats, factor, tracked = module_arguments(module)
    weight, bias = module.weight, module.bias
    # (momentum is PyTorch's, any float: checked as 0, then set, as SyncBatchNorm does)
    call, vectors = resolve_forward(
        input, running_mean, running_var, weight, bias, training=use_batch_stats,
        momentum=0.0, eps=module.eps, axis=1, mask=mask, var_estimator="unbiased", xp=None,
        shard=comm is not None,
    )  # fmt: skip
    if not use_batch_stats:
        return batch_norm(input, running_mean, running_var, weight, bias, False, factor,
                          module.eps)  # fmt: skip
    if comm is None:
        out = kernels.forward(call._replace(momentum=factor), input, *vectors)
        y, new_mean, new_var = out.y, out.new_running_mean, out.new_running_var
    else:
        from ..distributed import sync as _sync
        from ..distributed.torch_autograd import SyncBatchNormFunction

        _sync.check_autodiff(input, weight, bias, running_mean, running_var, mask)
        y, _, _, new_mean, new_var = SyncBatchNormFunction.apply(
            input, weight, bias, running_mean, running_var, factor, module.eps, 1, comm,
            False, False, getattr(module, "timeout", None), mask,
        )  # fmt: skip
    if running_mean is not None and running_var is not None:
        assert new_mean is not None and new_var is not None
        _store(running_mean, new_mean)
        _store(running_var, new_var)
    if tracked is not None:
        tracked.add_(1)
    return _torch_ops._layout_like(y, input)  # the input's memory format, as without a mask


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
        factor = running_factor(None, float(tracked) + 1.0)
    running_mean, running_var = module.running_mean, module.running_var
    use_batch_stats = uses_batch_stats(
        training, running_mean is not None or running_var is not None
    )
    if training and not module.track_running_stats:
        running_mean = running_var = None
    return running_mean, running_var, use_batch_stats, factor, tracked
