"""Synchronized batch norm: the forward and backward of the functional API over ranks.

Each rank holds one shard of the batch. In training the statistics are those of
the whole (concatenated) batch:

Forward
    every rank computes its per-channel ``(count, mean, M2)`` with the corrected
    two-pass algorithm (:func:`anybn._core.stats.centered_moments`); one all-gather
    brings every rank's ``(mean, M2)``, and the exact Chan merge
    (:func:`anybn._core.stats.chan_merge`), done in rank order on every rank, gives the
    statistics of the concatenated batch, bit-identical on all ranks. Ranks with
    an empty shard contribute nothing. ``y`` is then the core's eval forward with
    the global ``(mean, M2 / N)`` in place of the running statistics. With a
    mask, each rank's statistics are those of its counted values, its counts per
    channel travel with them, and the merge is weighted by those counts (a rank
    or channel that counts nothing adds nothing, and no ``0 / 0`` is formed).
Backward
    with ``xhat = (x - mean) * invstd`` the gradient needs two per-channel sums
    over the whole batch; one all-reduce of ``(sum_dy, sum_dy_xhat)`` gives them::

        dx = weight * invstd * (dy - SUM_dy / N - xhat * SUM_dy_xhat / N)

    The local sums and ``weight * invstd * dy`` come from the core's eval backward
    (mean and invstd held constant), the rest from one more eval forward.
    ``dweight`` and ``dbias`` stay this rank's own sums (DistributedDataParallel,
    or the user, sums parameter gradients over ranks), as in ``torch.nn.SyncBatchNorm``.
    With a mask the counted values ``N`` per channel join the all-reduce and the
    two global terms apply where the mask is True (the core's masked formula).

Reusing the core's public functions for every pass over x keeps its checks and
per-backend fast paths, and keeps the math of this module to the merge and the
two global corrections.

Before the statistics, the ranks exchange a small header of ints (operation,
local check status, channel count, dtype, device type, local count, options: a
mask or none and the variance estimator, which every rank must share) in a cheap
first exchange (coordinated by rank 0 with a deadline, see
``anybn.distributed.deadline``: a rank that does not come in ``timeout``
seconds makes every rank raise :class:`~anybn.distributed.CollectiveTimeout`
naming it), so that a rank with another channel count, dtype or device
type, or a rank whose own arguments failed their checks, makes *every* rank
raise, instead of a collective on mismatched buffers. The header also carries
the counts: the global count ``N`` is known before the statistics move, so
``N <= 1`` raises ValueError on every rank.

Every check of a call (its options and autodiff mode included) runs before the
header, so that a call failing on one rank fails on every rank and the next calls
pair; PyTorch tensors that autograd records go through an ``autograd.Function``
(:mod:`anybn.distributed.torch_autograd`) whose backward is the synchronized one.

Statistics travel in the accumulation dtype: float32 for float16/bfloat16/float32
input, float64 for float64 input; the backward widens half-precision x and dy to
float32 and rounds dx once.
"""

from __future__ import annotations

import functools
import math
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import array_api_compat as compat

from .. import _kernels as kernels
from .._call import Call, resolve_backward, resolve_forward, resolve_timeout
from .._checks import check_eps, check_momentum
from .._core.generic import running_update
from .._core.outputs import BatchNormGrads, BatchNormOutput
from .._core.stats import (
    centered_moments,
    chan_merge,
    channel_dot,
    channel_sum,
    masked_centered_moments,
    reaching_loss,
)
from .._xp import (
    Array,
    channel_shape,
    compute_dtype,
    dtype_name,
    is_concrete,
    normalize_axis,
    param_shape,
    reduction_axes,
    writeable,
)
from .comm import Communicator, MPIComm, TorchComm, as_communicator

__all__ = [
    "SyncForward",
    "backward",
    "failures_reported",
    "forward",
    "reports_failures",
]

_MAGIC = 0x616E7962  # "anyb": a header from anybn's sync, not from some other collective
_FORWARD, _BACKWARD = 1, 2
_OPS = {_FORWARD: "forward", _BACKWARD: "backward"}
_DTYPES = ("float16", "bfloat16", "float32", "float64")
_DEVICES = ("cpu", "cuda", "other")


def _device_type(x: Array) -> str:
    """``cpu``, ``cuda`` or ``other``: the device *type* every rank must share."""
    if compat.is_numpy_array(x):
        return "cpu"
    if compat.is_cupy_array(x):
        return "cuda"
    if compat.is_torch_array(x):
        return x.device.type if x.device.type in _DEVICES else "other"
    return "other"


_OK, _FAILED, _UNREADABLE = 0, 1, 2  # the header's status: checks passed / failed / no x


def _options(call: Call) -> int:
    """The options every rank must share, as bits: a mask (1), the biased estimator (2)."""
    return int(call.mask is not None) + 2 * int(call.var_estimator == "biased")


def _header(op: int, local: Call | None, x: Any, axis: int | None) -> list[int]:
    """``[magic, op, status, channels, dtype, device type, count, options]`` for this rank.

    A rank whose own checks failed still describes its x when it can, so that
    a channel, dtype or device mismatch is reported as such on every rank; its
    channel count is -1 (unknown) when its ``axis`` is not valid for its x, and
    its options are -1 (unknown). ``channels`` is the number of channels (the
    product of the channel axes' extents); ``options`` see :func:`_options`.
    """
    if local is not None:
        status, count, options = _OK, local.n, _options(local)
        channels = math.prod(param_shape(tuple(x.shape), local.axis))
    else:
        try:
            status, count, options = _FAILED, 0, -1
            channels = -1 if axis is None else int(x.shape[axis])
        except Exception:  # not even an array with that axis
            return [_MAGIC, op, _UNREADABLE, 0, 0, 0, 0, -1]
    name = dtype_name(getattr(x, "dtype", ""))
    return [
        _MAGIC,
        op,
        status,
        channels,
        _DTYPES.index(name) if name in _DTYPES else len(_DTYPES),
        _DEVICES.index(_device_type(x)),
        count,
        options,
    ]


def _name(table: tuple[str, ...], code: int) -> str:
    return table[code] if 0 <= code < len(table) else "unknown"


def timed(comm: Communicator, timeout: float | None, what: str) -> dict[str, Any]:
    """The keywords of a collective: ``timeout`` when given, and the name of the exchange
    for anybn's own communicators (a user's subclass may take neither)."""
    kwargs: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
    if isinstance(comm, (TorchComm, MPIComm)):
        kwargs["what"] = what
    return kwargs


def _lenient_timeout(timeout: object) -> float | None:
    """``timeout`` resolved, or None (the engine's default) where it is invalid: the
    header of a rank whose own checks failed (that failure is reported) still goes."""
    try:
        return resolve_timeout(timeout)
    except (TypeError, ValueError):
        return None


def _agree(
    comm: Communicator,
    op: int,
    local: Call | None,
    error: BaseException | None,
    x: Any,
    axis: int | None,
    timeout: object = None,
) -> list[int]:
    """Exchange headers; raise on every rank unless all ranks agree. Returns the counts.

    Raised, in this order: ranks in different calls (RuntimeError); ranks whose x
    differ in channel count (ValueError), dtype (TypeError) or device type
    (ValueError); ranks with a mask and ranks without one, or with different
    ``var_estimator`` (ValueError); a rank whose own checks failed (its own error
    there, RuntimeError on the others). If the exchange itself fails, a rank whose
    checks failed raises its own error (from the exchange's).
    """
    _exchanges.count = getattr(_exchanges, "count", 0) + 1
    what = f"{_OPS[op]} header exchange"
    kwargs = timed(comm, _lenient_timeout(timeout), what)
    try:
        rows = comm.all_gather_ints(_header(op, local, x, axis), like=x, **kwargs)
    except Exception as failure:  # the ranks could not be told (no group, a dead peer)
        if error is not None:
            raise error from failure  # this rank's own error comes first
        raise
    where = f"anybn synchronized batch norm ({comm.engine}, {len(rows)} ranks)"
    if any(r[0] != _MAGIC for r in rows) or len({r[1] for r in rows}) > 1:
        ops = ", ".join(f"rank {i}: {_OPS.get(r[1], 'unknown')}" for i, r in enumerate(rows))
        raise RuntimeError(f"{where}: the ranks are not in the same call ({ops})")
    described = [(i, r) for i, r in enumerate(rows) if r[2] != _UNREADABLE]

    def mismatch(column: int, what: str, show: Any) -> str | None:
        known = [(i, r) for i, r in described if r[column] >= 0]
        if len({r[column] for _, r in known}) <= 1:
            return None
        per_rank = ", ".join(f"rank {i}: {show(r[column])}" for i, r in known)
        return f"{where}: every rank must pass x with the same {what}, got {per_rank}"

    def options(bits: int) -> str:
        return f"mask={'given' if bits & 1 else 'None'}" + (
            f", var_estimator={'biased' if bits & 2 else 'unbiased'}" if op == _FORWARD else ""
        )

    for column, what, show, kind in (
        (3, "number of channels", str, ValueError),
        (4, "dtype", lambda c: _name(_DTYPES, c), TypeError),
        (5, "device type", lambda c: _name(_DEVICES, c), ValueError),
        (7, "options (a mask on every rank or on none; one var_estimator)", options,
         ValueError),
    ):
        message = mismatch(column, what, show)
        if message:
            raise kind(message)
    failed = [i for i, r in enumerate(rows) if r[2] != _OK]
    if failed:
        if error is not None:
            raise error
        raise RuntimeError(
            f"{where}: rank(s) {failed} rejected their arguments (see the error on "
            "those ranks); nothing was computed or updated"
        )
    return [r[6] for r in rows]


def _axis_or_none(axis: object, x: Any) -> int | None:
    """``axis`` (an int, or a sequence of one) normalized for x, or None when either is
    invalid or names several axes: the header of a failed rank is best effort."""
    try:
        if isinstance(axis, (tuple, list)):
            if len(axis) != 1:
                return None
            axis = axis[0]
        return normalize_axis(axis, x.ndim)
    except Exception:
        return None


#: Per thread: how many header exchanges this thread has entered (see failures_reported).
_exchanges = threading.local()


@contextmanager
def failures_reported(
    comm: object, x: Any, axis: object = 1, *, backward: bool = False, timeout: object = None
) -> Iterator[None]:
    """Make an error raised before this rank reached the header exchange fail every rank.

    Callers that check their own arguments before calling :func:`forward` (the
    layer's channel count, the torch module's input rank, the options of
    :func:`batch_norm`) run those checks in this context: if one raises before
    any header was exchanged, this rank still takes part in the exchange, as a
    failed rank, so that the other ranks raise too instead of waiting in the
    collective (or pairing with this rank's next call). Then the error
    propagates. ``backward``: the exchange is that of :func:`batch_norm_backward`;
    ``timeout``: that of the call (the engine's default where it is invalid).
    """
    before = getattr(_exchanges, "count", 0)
    try:
        yield
    except Exception as exc:
        if getattr(_exchanges, "count", 0) == before:
            op = _BACKWARD if backward else _FORWARD
            _agree(as_communicator(comm), op, None, exc, x, _axis_or_none(axis, x), timeout)
        raise


_Method = TypeVar("_Method", bound=Callable[..., Any])


def reports_failures(method: _Method) -> _Method:
    """Decorate a layer's ``forward(self, x)``: :func:`failures_reported` when it syncs.

    It syncs when ``self.comm`` is set and ``self.training`` is true; the exchange
    has ``self.timeout``.
    """

    @functools.wraps(method)
    def wrapper(self: Any, x: Any, /, *args: Any, **options: Any) -> Any:
        comm = getattr(self, "comm", None)
        if comm is None or not getattr(self, "training", False):
            return method(self, x, *args, **options)
        timeout = getattr(self, "timeout", None)
        with failures_reported(comm, x, getattr(self, "axis", 1), timeout=timeout):
            return method(self, x, *args, **options)

    return wrapper  # type: ignore[return-value]


def check_options(axis: object, axis_name: object = None) -> object:
    """Raise for ``axis_name`` (JAX devices) with ``comm=`` (processes); returns the axis.

    Run inside the agreement (:func:`forward`, :func:`failures_reported`), so that a
    rank whose options fail makes every rank raise. A sequence of one axis becomes
    that axis.
    """
    if axis_name is not None:
        raise ValueError(
            "comm= (processes) and axis_name= (JAX devices) cannot be combined; pass one"
        )
    if isinstance(axis, (tuple, list)) and len(axis) == 1:
        axis = axis[0]
    return axis


def check_autodiff(*arrays: object, differentiable: bool = True) -> None:
    """Raise for what the collectives cannot carry, or autodiff cannot see through them.

    JAX tracers (under ``jax.jit``, ``jax.grad``, ``jax.vmap``): the collectives
    run outside JAX. PyTorch ``torch.func`` transforms and forward-mode AD (dual
    tensors): the synchronized function defines reverse mode only. With
    ``differentiable=False`` (the synchronized backward, whose own result is not
    differentiable), any tensor that autograd records is refused too.
    """
    for a in arrays:
        if a is None:
            continue
        if compat.is_jax_array(a) and not is_concrete(a):
            raise TypeError(
                "comm= (synchronized batch norm) needs concrete JAX arrays, got a traced "
                f"{type(a).__name__}: its collectives run outside JAX, so jax.jit, jax.grad "
                "and jax.vmap cannot see through them; call it outside the transformation"
            )
        if not compat.is_torch_array(a):
            continue
        import torch
        from torch._C import _functorch

        if _functorch.maybe_current_level() is not None:
            raise TypeError(
                "comm= (synchronized batch norm) does not support torch.func transforms "
                "(grad, vjp, jvp, vmap); use loss.backward() / torch.autograd.grad"
            )
        if torch.autograd.forward_ad.unpack_dual(a).tangent is not None:
            raise TypeError(
                "comm= (synchronized batch norm) does not support forward-mode AD (a dual "
                "tensor was given); use reverse mode (loss.backward() / torch.autograd.grad)"
            )
        if not differentiable and a.requires_grad and torch.is_grad_enabled():
            raise TypeError(
                "batch_norm_backward with comm= is not differentiable (double backward "
                "through the synchronized sums is not supported), and an argument requires "
                "grad; call it under torch.no_grad() or on detached tensors"
            )


def _check_forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    axis: object,
    eps: float,
    momentum: float,
    xp: ModuleType | None,
    mask: object = None,
    var_estimator: object = "unbiased",
) -> tuple[Call, tuple[Array | None, Array | None, Array | None, Array | None]]:
    """The resolved call of this rank's shard (:func:`anybn._call.resolve_forward`: the
    checks of :func:`anybn.batch_norm`, but one value per channel, and fewer than two
    counted values, which are decided over every rank), with ``momentum`` as the caller
    checked it, and its per-channel vectors."""
    call, vectors = resolve_forward(
        x, running_mean, running_var, weight, bias,
        training=True, momentum=0.0, eps=eps, axis=axis, mask=mask,
        var_estimator=var_estimator, xp=xp, shard=True,
    )  # fmt: skip
    # (SyncBatchNorm takes any float momentum, as torch's does: checked by the caller)
    return call._replace(momentum=momentum), vectors


def _as(xp: ModuleType, a: Array, dtype: object) -> Array:
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _local_moments(
    xp: ModuleType, xc: Array, axis: int | tuple[int, ...], count: int, channels: int
) -> tuple[Array, Array, Array]:
    """This rank's per-channel ``(m1, correction, M2)``, each of shape ``(C,)`` (``C``
    the number of channels, the product of the channel axes' extents).

    The mean is kept as the pair ``m1 + correction`` (first-pass mean, then the
    small mean of ``x - m1``), which holds more digits than their rounded sum: on
    float32 data with a mean of 1e4 the rounded mean alone is off by up to half an
    ulp (5e-4), which would show in y. Zeros for an empty shard.

    The core's corrected two-pass :func:`centered_moments`. For PyTorch tensors
    the same algorithm squares its x-sized temporary in place instead: torch has no
    fused multiply-reduce that sums pairwise (``einsum`` goes through a float32
    ``bmm`` and loses digits), and ``sum(c * c)`` costs one more temporary; this is
    about 3x faster than either on (32, 64, 56, 56) float32 on CPU, and than
    ``torch.var_mean``.
    """
    if count == 0:
        zeros = xp.zeros((channels,), dtype=xc.dtype, device=compat.device(xc))
        return zeros, zeros, zeros
    axes = reduction_axes(xc.ndim, axis)
    if compat.is_torch_array(xc):
        first_pass_mean = xc.sum(dim=axes, keepdim=True) / count
        centered = xc - first_pass_mean
        if writeable(xp, centered):  # not recorded by autograd
            correction = centered.sum(dim=axes) / count
            m2 = centered.square_().sum(dim=axes) - count * correction * correction
            return first_pass_mean.reshape(channels), correction, m2
    moments = centered_moments(xp, xc, axes, count)
    return tuple(
        xp.reshape(a, (channels,))
        for a in (moments.first_pass_mean, moments.correction, moments.m2)
    )


def _local_masked_moments(
    xp: ModuleType, xc: Array, mask: Array, axis: int | tuple[int, ...], channels: int
) -> tuple[Array, Array, Array, Array]:
    """This rank's per-channel ``(n, m1, correction, M2)`` over the values where ``mask``
    is True, each of shape ``(C,)``: the core's :func:`masked_centered_moments`.

    A channel with no counted value on this rank (an all-False mask) gives zeros, never
    ``0 / 0``: it contributes nothing to the merge.
    """
    axes = reduction_axes(xc.ndim, axis)
    n = channel_sum(xp, xp.astype(mask, xc.dtype), axes)
    one = xp.ones((), dtype=xc.dtype, device=compat.device(xc))
    moments = masked_centered_moments(xp, xc, mask, axes, xp.where(n > 0, n, one))
    return tuple(
        xp.reshape(a, (channels,))
        for a in (n, moments.first_pass_mean, moments.correction, moments.m2)
    )


def _masked_merge(
    xp: ModuleType, gathered: Array, channels: int
) -> tuple[Array, Array, Array, Array]:
    """Chan's merge of every rank's masked ``(n, m1, correction, M2)``, per channel.

    ``gathered`` is ``(ranks, 4C)``; returns ``(n, anchor, offset, M2)`` of the
    concatenated batch, each ``(C,)``, with mean ``anchor + offset``. As the unmasked
    merge, in rank order: the anchor is the ``m1`` of the first rank that counts a value
    in the channel, and the weights ``n_r / n`` are guarded so that a rank (or channel)
    with no counted value adds exactly nothing.
    """
    rows = [[gathered[r, i * channels : (i + 1) * channels] for i in range(4)]
            for r in range(int(gathered.shape[0]))]  # fmt: skip
    zero = xp.zeros_like(rows[0][0])
    seen = rows[0][0] > 0
    anchor = xp.where(seen, rows[0][1], zero)
    for c_r, m1_r, _, _ in rows[1:]:
        anchor = xp.where(seen, anchor, m1_r)
        seen = xp.logical_or(seen, c_r > 0)
    n, offset, m2 = zero, zero, zero
    one = xp.ones_like(zero)
    for c_r, m1_r, correction_r, m2_r in rows:
        offset_r = (m1_r - anchor) + correction_r
        both = n + c_r
        safe = xp.where(both > 0, both, one)
        delta = xp.where(c_r > 0, offset_r - offset, zero)
        offset = offset + delta * (c_r / safe)
        m2 = m2 + m2_r + delta * delta * (n * c_r / safe)
        n = both
    return n, anchor, offset, m2


class SyncForward(NamedTuple):
    """What :func:`forward` returns: the output, the global count per channel and this
    rank's resolved call (what :func:`backward` takes)."""

    out: BatchNormOutput
    total_count: int  #: values per channel over every rank (before masking)
    call: Call
    timeout: float | None = None  #: the call's, for its backward


def forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    momentum: float,
    eps: float,
    axis: object,
    xp: ModuleType | None,
    comm: object,
    mask: object = None,
    var_estimator: object = "unbiased",
    momentum_range: bool = True,
    timeout: object = None,
    axis_name: object = None,
) -> SyncForward:
    """The synchronized training forward; see :func:`batch_norm`.

    Every check runs before the header exchange and its outcome travels in the
    header, so that a check failing on one rank fails every rank.
    ``momentum_range=False`` accepts any float momentum, as
    ``torch.nn.SyncBatchNorm`` does (for :class:`anybn.torch.SyncBatchNorm`).
    ``timeout``: each exchange's deadline (None: the engine's default).
    """
    communicator = as_communicator(comm)
    local: Call | None = None
    error: BaseException | None = None
    seconds: float | None = None
    try:
        axis = check_options(axis, axis_name)
        seconds = resolve_timeout(timeout)
        momentum = check_momentum(momentum) if momentum_range else float(momentum)
        eps = check_eps(eps)
        check_autodiff(x, running_mean, running_var, weight, bias, mask)
        local, vectors = _check_forward(
            x, running_mean, running_var, weight, bias, axis, eps, momentum, xp, mask,
            var_estimator,
        )
        running_mean, running_var, weight, bias = vectors
    except Exception as exc:  # tell the other ranks before raising
        error = exc
    counts = _agree(communicator, _FORWARD, local, error, x, _axis_or_none(axis, x), timeout)
    assert local is not None
    total = sum(counts)
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} over {len(counts)} ranks (local input size {tuple(x.shape)})"
        )
    xp, axis, count, mask = local.xp, local.axis, local.n, local.mask
    dims = param_shape(tuple(x.shape), axis)  # the per-channel arrays' shape
    channels = math.prod(dims)
    if total == 0:  # every shard empty: the core's empty batch (NaN statistics, as torch)
        out = kernels.forward(local, x, running_mean, running_var, weight, bias)
        return SyncForward(out, 0, local, seconds)
    cdt = compute_dtype(xp, x.dtype)
    xc = _as(xp, x, cdt)
    n: Array | int
    local_stats: tuple[Array, ...]
    if mask is None:
        local_stats = _local_moments(xp, xc, axis, count, channels)
    else:  # the counts per channel travel with the moments
        local_stats = _local_masked_moments(xp, xc, mask, axis, channels)
    gathered = communicator.all_gather(  # (ranks, 3C or 4C): [n,] m1, correction, M2
        xp.concat(local_stats), **timed(communicator, seconds, "statistics all-gather")
    )

    if mask is None:
        # Chan's merge, in rank order on every rank, of the means measured from an
        # anchor: the first non-empty rank's m1. Each rank's mean is anchor + offset,
        # with the offset (m1 - anchor) + correction exact to the digits the pair
        # holds, and M2 does not depend on where the means are measured from.
        ranks = [(c, gathered[r, :channels], gathered[r, channels : 2 * channels],
                  gathered[r, 2 * channels :]) for r, c in enumerate(counts) if c > 0]  # fmt: skip
        anchor = ranks[0][1]
        n, offset, m2 = 0, anchor, anchor  # placeholders, replaced at the first rank
        for c, m1_r, correction_r, m2_r in ranks:
            offset_r = (m1_r - anchor) + correction_r
            if n == 0:
                n, offset, m2 = c, offset_r, m2_r
            else:
                merged = chan_merge(n, offset, m2, c, offset_r, m2_r)
                n, offset, m2 = int(merged[0]), merged[1], merged[2]
        assert n == total
    else:
        n, anchor, offset, m2 = _masked_merge(xp, gathered, channels)
        if is_concrete(n) and bool(xp.any(n < 2)):  # the same on every rank
            raise ValueError(
                "Expected more than 1 counted value per channel when training, got a "
                f"channel with {int(xp.min(n))} over {len(counts)} ranks (local input size "
                f"{tuple(x.shape)}); the masks leave too few values"
            )
        n = xp.reshape(n, dims)
    anchor, offset, m2 = (xp.reshape(a, dims) for a in (anchor, offset, m2))
    mean = anchor + offset

    # y: the core's eval forward with the global statistics as the "running" ones,
    # y = (x - anchor) * invstd * weight + (bias - offset * invstd * weight), so that
    # x - anchor is exact, as the core's x - m1 is (and its fast paths apply). With a
    # mask, y is computed at every position, as without comm=.
    var = m2 / n
    scale = 1.0 / xp.sqrt(var + eps)
    if weight is not None:
        scale = scale * _as(xp, weight, cdt)
    shift = -offset * scale
    if bias is not None:
        shift = shift + _as(xp, bias, cdt)
    out = kernels.forward(Call(xp, axis, count, False, 0.0, eps), x, anchor, var, weight, shift)

    new_running_mean, new_running_var = running_mean, running_var
    if running_mean is not None and running_var is not None:
        new_running_mean, new_running_var = running_update(
            Call(xp, axis, total, True, momentum, eps, local.var_estimator),
            running_mean, running_var, mean, m2, n, dims,
        )  # fmt: skip
    return SyncForward(
        BatchNormOutput(out.y, mean, out.invstd, new_running_mean, new_running_var), total, local,
        seconds,
    )  # fmt: skip


def checked_backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    axis: object,
    mask: Array | None,
    xp: ModuleType | None,
    comm: object,
    timeout: object = None,
    axis_name: object = None,
) -> BatchNormGrads:
    """The synchronized training backward of :func:`anybn.batch_norm_backward`.

    The header exchange, then one all-reduce of ``(sum_dy, sum_dy_xhat)`` (``2 * C``
    values, and the ``C`` counts with a mask); every check runs before the header and
    fails every rank.
    """
    communicator = as_communicator(comm)
    local: Call | None = None
    error: BaseException | None = None
    seconds: float | None = None
    try:
        axis = check_options(axis, axis_name)
        seconds = resolve_timeout(timeout)
        check_autodiff(dy, x, weight, mean, invstd, mask, differentiable=False)
        local, (dy, weight, mean, invstd) = resolve_backward(
            dy, x, weight, mean, invstd, training=True, axis=axis, mask=mask, xp=xp
        )
    except Exception as exc:  # tell the other ranks before raising
        error = exc
    total_count = sum(
        _agree(communicator, _BACKWARD, local, error, x, _axis_or_none(axis, x), timeout)
    )
    assert local is not None
    return backward(
        communicator, local, dy, x, weight, mean, invstd, total_count, timeout=seconds
    )


def backward(
    communicator: Communicator,
    local: Call,
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    total_count: int,
    d_mean: Array | None = None,
    d_invstd: Array | None = None,
    timeout: float | None = None,
) -> BatchNormGrads:
    """The synchronized training backward on checked arguments: one all-reduce.

    ``d_mean`` and ``d_invstd``, when given, are this rank's gradients with
    respect to the forward's ``mean`` and ``invstd`` outputs (global statistics,
    so their gradients are summed over ranks in the same all-reduce, ``4 * C``
    values): ``d mean / d x = 1 / N`` and ``d invstd / d x = -invstd**2 * xhat / N``.

    Half-precision x and dy are widened to float32 for the whole computation and
    dx is rounded once: the eval dx and its correction are of the same size and
    nearly cancel, so rounding each to float16 first would lose their digits.
    """
    xp, axis, count, mask = local.xp, local.axis, local.n, local.mask
    dims = param_shape(tuple(x.shape), axis)
    channels = math.prod(dims)
    if total_count == 0:  # every shard empty (NaN statistics): the core's zeros
        return kernels.backward(Call(xp, axis, 0, True), dy, x, weight, mean, invstd)
    cdt = compute_dtype(xp, x.dtype)
    xc, dyc = _as(xp, x, cdt), _as(xp, dy, cdt)
    # The local sums, and dy * weight * invstd, from the core's eval backward (and its
    # fast paths): with mean and invstd as constants, dweight = sum(dy * xhat) and
    # dbias = sum(dy) over this shard.
    local_grads = kernels.backward(Call(xp, axis, count, False), dyc, xc, weight, mean, invstd)
    sum_dy, sum_dy_xhat = local_grads.dbias, local_grads.dweight
    if mask is not None:
        # every position's dy counts (y is computed everywhere), but a masked-out one
        # whose dy is 0 adds nothing, whatever its x (padding may be NaN): the core's rule
        axes = reduction_axes(x.ndim, axis)
        bshape = channel_shape(x.ndim, axis, dims)
        centered = xc - xp.reshape(_as(xp, mean, cdt), bshape)
        sum_dy_xhat = xp.reshape(
            channel_dot(xp, dyc, reaching_loss(xp, centered, mask, dyc), axes), dims
        ) * _as(xp, invstd, cdt)
    parts = [xp.reshape(sum_dy, (channels,)), xp.reshape(sum_dy_xhat, (channels,))]
    if d_mean is not None and d_invstd is not None:
        parts += [xp.reshape(_as(xp, g, cdt), (channels,)) for g in (d_mean, d_invstd)]
    if mask is not None:  # the counted values, per channel, over every rank
        parts.append(xp.reshape(channel_sum(xp, xp.astype(mask, cdt), axes), (channels,)))
    sums = communicator.all_reduce(
        xp.concat(parts), **timed(communicator, timeout, "sums all-reduce")
    )

    def part(i: int) -> Array:
        return xp.reshape(sums[i * channels : (i + 1) * channels], dims)

    # dx = scale * (dy - SUM_dy/N - xhat * SUM_dy_xhat/N), scale = weight * invstd:
    # the eval dx (scale * dy) less the two terms through the global statistics. With a
    # mask, N is the counted values and the two terms apply where the mask is True.
    n: Array | int = total_count
    if mask is not None:
        n = part(len(parts) - 1)
        n = xp.where(n > 0, n, xp.ones_like(n))  # (no counted value: nothing to correct)
    invstd = _as(xp, invstd, cdt)
    scale = invstd if weight is None else invstd * _as(xp, weight, cdt)
    mean_dy = part(0) / n
    mean_dy_xhat = part(1) / n
    slope, shift = scale * invstd * mean_dy_xhat, scale * mean_dy
    if d_mean is not None and d_invstd is not None:  # minus the gradients through the
        slope = slope + part(3) * invstd**3 / n  # mean and invstd outputs
        shift = shift - part(2) / n
    # The correction (x - mean) * slope + shift is the core's eval forward with
    # running_var=0 and eps=1 (so that 1/sqrt(0 + 1) is exactly 1), in one fused
    # pass: (x - mean) * weight + bias.
    correction = kernels.forward(
        Call(xp, axis, count, False, 0.0, 1.0),
        xc, _as(xp, mean, cdt), xp.zeros_like(invstd), slope, shift,
    ).y  # fmt: skip
    if mask is not None:
        correction = xp.where(mask, correction, xp.zeros((), dtype=cdt, device=compat.device(x)))
    dx = local_grads.dx
    if writeable(xp, dx):
        dx -= correction
    else:
        dx = dx - correction
    return BatchNormGrads(_as(xp, dx, x.dtype), sum_dy_xhat, sum_dy)
