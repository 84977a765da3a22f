"""Synchronized batch norm: the forward and backward of :mod:`anybn._functional` over ranks.

Each rank holds one shard of the batch. In training the statistics are those of
the whole (concatenated) batch:

Forward
    every rank computes its per-channel ``(count, mean, M2)`` with the corrected
    two-pass algorithm (:func:`anybn._stats.centered_moments`); one all-gather
    brings every rank's ``(mean, M2)``, and the exact Chan merge
    (:func:`anybn._stats.chan_merge`), done in rank order on every rank, gives the
    statistics of the concatenated batch, bit-identical on all ranks. Ranks with
    an empty shard contribute nothing. ``y`` is then the core's eval forward with
    the global ``(mean, M2 / N)`` in place of the running statistics.
Backward
    with ``xhat = (x - mean) * invstd`` the gradient needs two per-channel sums
    over the whole batch; one all-reduce of ``(sum_dy, sum_dy_xhat)`` gives them::

        dx = weight * invstd * (dy - SUM_dy / N - xhat * SUM_dy_xhat / N)

    The local sums and ``weight * invstd * dy`` come from the core's eval backward
    (mean and invstd held constant), the rest from one more eval forward.
    ``dweight`` and ``dbias`` stay this rank's own sums (DistributedDataParallel,
    or the user, sums parameter gradients over ranks), as in ``torch.nn.SyncBatchNorm``.

Reusing the core's public functions for every pass over x keeps its checks and
per-backend fast paths, and keeps the math of this module to the merge and the
two global corrections.

Before the statistics, the ranks exchange a small header of ints (operation,
local check status, channel count, dtype, device type, local count) in a cheap
first collective, so that a rank with another channel count, dtype or device
type, or a rank whose own arguments failed their checks, makes *every* rank
raise, instead of a collective on mismatched buffers. The header also carries
the counts: the global count ``N`` is known before the statistics move, so
``N <= 1`` raises ValueError on every rank.

Statistics travel in the accumulation dtype: float32 for float16/bfloat16/float32
input, float64 for float64 input.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any, NamedTuple, TypeVar

import array_api_compat as compat

from ._comm import Communicator, as_communicator
from ._functional import BatchNormGrads, BatchNormOutput
from ._functional import backward as _core_backward
from ._functional import batch_norm as _local_batch_norm
from ._functional import batch_norm_backward as _local_batch_norm_backward
from ._functional import forward as _core_forward
from ._stats import centered_moments, chan_merge
from ._validation import (
    check_channel_vector,
    check_eps,
    check_input,
    check_momentum,
    check_training,
)
from ._xp import (
    Array,
    check_floating,
    compute_dtype,
    dtype_name,
    normalize_axis,
    reduction_axes,
    resolve_namespace,
    values_per_channel,
    writeable,
)

__all__ = [
    "SyncForward",
    "batch_norm",
    "batch_norm_backward",
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


class _Local(NamedTuple):
    """One rank's checked call: what its header says and what the math needs."""

    xp: ModuleType
    axis: int
    channels: int
    values: int  # per channel, on this rank


_OK, _FAILED, _UNREADABLE = 0, 1, 2  # the header's status: checks passed / failed / no x


def _header(op: int, local: _Local | None, x: Any, axis: int) -> list[int]:
    """``[magic, op, status, channels, dtype, device type, count]`` for this rank.

    A rank whose own checks failed still describes its x when it can, so that
    a channel, dtype or device mismatch is reported as such on every rank.
    """
    if local is not None:
        status, channels, count = _OK, local.channels, local.values
    else:
        try:
            status, channels, count = _FAILED, int(x.shape[axis]), 0
        except Exception:  # not even an array with that axis
            return [_MAGIC, op, _UNREADABLE, 0, 0, 0, 0]
    name = dtype_name(getattr(x, "dtype", ""))
    return [
        _MAGIC,
        op,
        status,
        channels,
        _DTYPES.index(name) if name in _DTYPES else len(_DTYPES),
        _DEVICES.index(_device_type(x)),
        count,
    ]


def _name(table: tuple[str, ...], code: int) -> str:
    return table[code] if 0 <= code < len(table) else "unknown"


def _agree(
    comm: Communicator,
    op: int,
    local: _Local | None,
    error: BaseException | None,
    x: Any,
    axis: int,
) -> list[int]:
    """Exchange headers; raise on every rank unless all ranks agree. Returns the counts.

    Raised, in this order: ranks in different calls (RuntimeError); ranks whose x
    differ in channel count (ValueError), dtype (TypeError) or device type
    (ValueError); a rank whose own checks failed (its own error there, RuntimeError
    on the others).
    """
    _exchanges.count = getattr(_exchanges, "count", 0) + 1
    rows = comm.all_gather_ints(_header(op, local, x, axis), like=x)
    where = f"anybn synchronized batch norm ({comm.engine}, {len(rows)} ranks)"
    if any(r[0] != _MAGIC for r in rows) or len({r[1] for r in rows}) > 1:
        ops = ", ".join(f"rank {i}: {_OPS.get(r[1], 'unknown')}" for i, r in enumerate(rows))
        raise RuntimeError(f"{where}: the ranks are not in the same call ({ops})")
    described = [(i, r) for i, r in enumerate(rows) if r[2] != _UNREADABLE]

    def mismatch(column: int, what: str, show: Any) -> str | None:
        if len({r[column] for _, r in described}) <= 1:
            return None
        per_rank = ", ".join(f"rank {i}: {show(r[column])}" for i, r in described)
        return f"{where}: every rank must pass x with the same {what}, got {per_rank}"

    for column, what, show, kind in (
        (3, "number of channels", str, ValueError),
        (4, "dtype", lambda c: _name(_DTYPES, c), TypeError),
        (5, "device type", lambda c: _name(_DEVICES, c), ValueError),
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


def _axis_or_zero(axis: object, x: Any) -> int:
    """``axis`` normalized for x, or 0 when either is invalid (the header is best effort)."""
    try:
        return normalize_axis(axis, x.ndim)
    except Exception:
        return 0


#: Per thread: how many header exchanges this thread has entered (see failures_reported).
_exchanges = threading.local()


@contextmanager
def failures_reported(comm: object, x: Any, axis: object = 1) -> Iterator[None]:
    """Make an error raised before this rank reached the header exchange fail every rank.

    Callers that check their own arguments before calling :func:`forward` (the
    layer's channel count, the torch module's input rank) run those checks in
    this context: if one raises before any header was exchanged, this rank still
    takes part in the exchange, as a failed rank, so that the other ranks raise
    too instead of waiting in the collective. Then the error propagates.
    """
    before = getattr(_exchanges, "count", 0)
    try:
        yield
    except Exception as exc:
        if getattr(_exchanges, "count", 0) == before:
            _agree(as_communicator(comm), _FORWARD, None, exc, x, _axis_or_zero(axis, x))
        raise


_Method = TypeVar("_Method", bound=Callable[..., Any])


def reports_failures(method: _Method) -> _Method:
    """Decorate a layer's ``forward(self, x)``: :func:`failures_reported` when it syncs.

    It syncs when ``self.comm`` is set and ``self.training`` is true.
    """

    @functools.wraps(method)
    def wrapper(self: Any, x: Any, /, **options: Any) -> Any:
        comm = getattr(self, "comm", None)
        if comm is None or not getattr(self, "training", False):
            return method(self, x, **options)
        with failures_reported(comm, x, getattr(self, "axis", 1)):
            return method(self, x, **options)

    return wrapper  # type: ignore[return-value]


def _check_forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    axis: int,
    xp: ModuleType | None,
) -> _Local:
    """The local checks of :func:`anybn.batch_norm`, minus the local count (it is global here)."""
    xp = resolve_namespace(
        x,
        {"running_mean": running_mean, "running_var": running_var, "weight": weight, "bias": bias},
        xp=xp,
    )
    check_input(xp, x)
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    for name, a in (
        ("running_mean", running_mean),
        ("running_var", running_var),
        ("weight", weight),
        ("bias", bias),
    ):
        check_channel_vector(xp, a, name, channels, x.dtype)
    if (running_mean is None) != (running_var is None):
        raise ValueError(
            "running_mean and running_var must be given together, got only "
            + ("running_mean" if running_var is None else "running_var")
        )
    return _Local(xp, axis, channels, values_per_channel(tuple(x.shape), axis))


def _as(xp: ModuleType, a: Array, dtype: object) -> Array:
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _local_moments(
    xp: ModuleType, xc: Array, axis: int, count: int, channels: int
) -> tuple[Array, Array, Array]:
    """This rank's per-channel ``(m1, correction, M2)``, each of shape ``(C,)``.

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


class SyncForward(NamedTuple):
    """What :func:`forward` returns: the output and the global count per channel."""

    out: BatchNormOutput
    total_count: int


def forward(
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    *,
    momentum: float,
    eps: float,
    axis: int,
    xp: ModuleType | None,
    comm: object,
) -> SyncForward:
    """The synchronized training forward; see :func:`batch_norm`."""
    communicator = as_communicator(comm)
    local: _Local | None = None
    error: BaseException | None = None
    try:
        momentum = check_momentum(momentum)
        eps = check_eps(eps)
        local = _check_forward(x, running_mean, running_var, weight, bias, axis, xp)
    except Exception as exc:  # tell the other ranks before raising
        error = exc
    counts = _agree(communicator, _FORWARD, local, error, x, _axis_or_zero(axis, x))
    assert local is not None
    total = sum(counts)
    if total == 1:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{total} over {len(counts)} ranks (local input size {tuple(x.shape)})"
        )
    xp, axis, channels, count = local
    if total == 0:  # every shard empty: the core's empty batch (NaN statistics, as torch)
        out = _core_forward(
            xp, x, running_mean, running_var, weight, bias,
            training=True, momentum=momentum, eps=eps, axis=axis, count=0,
        )  # fmt: skip
        return SyncForward(out, 0)
    cdt = compute_dtype(xp, x.dtype)
    pair_and_m2 = _local_moments(xp, _as(xp, x, cdt), axis, count, channels)
    gathered = communicator.all_gather(xp.concat(pair_and_m2))  # (ranks, 3C): m1, correction, M2

    # Chan's merge, in rank order on every rank, of the means measured from an anchor:
    # the first non-empty rank's m1. Each rank's mean is anchor + offset, with the
    # offset (m1 - anchor) + correction exact to the digits the pair holds, and M2
    # does not depend on where the means are measured from.
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
    mean = anchor + offset

    # y: the core's eval forward with the global statistics as the "running" ones,
    # y = (x - anchor) * invstd * weight + (bias - offset * invstd * weight), so that
    # x - anchor is exact, as the core's x - m1 is (and its fast paths apply).
    var = m2 / total
    scale = 1.0 / xp.sqrt(var + eps)
    if weight is not None:
        scale = scale * _as(xp, weight, cdt)
    shift = -offset * scale
    if bias is not None:
        shift = shift + _as(xp, bias, cdt)
    out = _core_forward(
        xp, x, anchor, var, weight, shift,
        training=False, momentum=0.0, eps=eps, axis=axis, count=count,
    )  # fmt: skip

    new_running_mean, new_running_var = running_mean, running_var
    if running_mean is not None and running_var is not None:
        unbiased = m2 / (total - 1)
        new_running_mean = _as(
            xp, (1.0 - momentum) * _as(xp, running_mean, cdt) + momentum * mean, running_mean.dtype
        )
        new_running_var = _as(
            xp,
            (1.0 - momentum) * _as(xp, running_var, cdt) + momentum * unbiased,
            running_var.dtype,
        )
    return SyncForward(
        BatchNormOutput(out.y, mean, out.invstd, new_running_mean, new_running_var), total
    )


def batch_norm(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    xp: ModuleType | None = None,
    comm: object,
) -> BatchNormOutput:
    """:func:`anybn.batch_norm` over the ranks of ``comm``.

    In training: the statistics of the batch concatenated over ranks (two
    collectives: the header, then one all-gather of ``2 * C`` values). In eval:
    the local computation, with no communication.
    """
    if not check_training(training):
        return _local_batch_norm(
            x, running_mean, running_var, weight, bias,
            training=False, momentum=momentum, eps=eps, axis=axis, xp=xp,
        )  # fmt: skip
    return forward(
        x, running_mean, running_var, weight, bias,
        momentum=momentum, eps=eps, axis=axis, xp=xp, comm=comm,
    ).out  # fmt: skip


def _check_backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    axis: int,
    xp: ModuleType | None,
) -> _Local:
    """The local checks of :func:`anybn.batch_norm_backward`."""
    xp = resolve_namespace(x, {"dy": dy, "weight": weight, "mean": mean, "invstd": invstd}, xp=xp)
    check_input(xp, x)
    check_floating(xp, dy, "dy")
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"dy must have the shape of x {tuple(x.shape)}, got shape {tuple(dy.shape)}"
        )
    axis = normalize_axis(axis, x.ndim)
    channels = x.shape[axis]
    for name, a in (("weight", weight), ("mean", mean), ("invstd", invstd)):
        check_channel_vector(xp, a, name, channels, x.dtype)
    return _Local(xp, axis, channels, values_per_channel(tuple(x.shape), axis))


def batch_norm_backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool = True,
    axis: int = 1,
    xp: ModuleType | None = None,
    comm: object,
    total_count: int | None = None,
) -> BatchNormGrads:
    """:func:`anybn.batch_norm_backward` over the ranks of ``comm``.

    In training: one all-reduce of ``(sum_dy, sum_dy_xhat)`` (``2 * C`` values),
    preceded by the header exchange unless ``total_count`` (the global count per
    channel, known from a synchronized forward) is given. In eval: local.
    """
    if not check_training(training):
        return _local_batch_norm_backward(
            dy, x, weight, mean, invstd, training=False, axis=axis, xp=xp
        )
    communicator = as_communicator(comm)
    if total_count is None:
        local: _Local | None = None
        error: BaseException | None = None
        try:
            local = _check_backward(dy, x, weight, mean, invstd, axis, xp)
        except Exception as exc:  # tell the other ranks before raising
            error = exc
        total_count = sum(_agree(communicator, _BACKWARD, local, error, x, _axis_or_zero(axis, x)))
        assert local is not None
    else:
        local = _check_backward(dy, x, weight, mean, invstd, axis, xp)
    xp, axis, channels, count = local
    if total_count == 0:  # every shard empty (NaN statistics): the core's zeros
        return _core_backward(xp, dy, x, weight, mean, invstd, training=True, axis=axis, count=0)
    # The local sums, and dy * weight * invstd, from the core's eval backward (and its
    # fast paths): with mean and invstd as constants, dweight = sum(dy * xhat) and
    # dbias = sum(dy) over this shard.
    local_grads = _core_backward(
        xp, dy, x, weight, mean, invstd, training=False, axis=axis, count=count
    )
    sum_dy, sum_dy_xhat = local_grads.dbias, local_grads.dweight
    sums = communicator.all_reduce(xp.concat([sum_dy, sum_dy_xhat]))

    # dx = scale * (dy - SUM_dy/N - xhat * SUM_dy_xhat/N), scale = weight * invstd:
    # the eval dx (scale * dy) less the two terms through the global statistics.
    cdt = compute_dtype(xp, x.dtype)
    invstd = _as(xp, invstd, cdt)
    scale = invstd if weight is None else invstd * _as(xp, weight, cdt)
    mean_dy, mean_dy_xhat = sums[:channels] / total_count, sums[channels:] / total_count
    # The correction (x - mean) * (scale * invstd * mean_dy_xhat) + scale * mean_dy is
    # the core's eval forward with running_var=0 and eps=1 (so that 1/sqrt(0 + 1) is
    # exactly 1), in one fused pass: (x - mean) * weight + bias.
    correction = _core_forward(
        xp,
        x,
        _as(xp, mean, cdt),
        xp.zeros_like(invstd),
        scale * invstd * mean_dy_xhat,
        scale * mean_dy,
        training=False,
        momentum=0.0,
        eps=1.0,
        axis=axis,
        count=count,
    ).y
    dx = local_grads.dx
    if dx.dtype == correction.dtype and writeable(xp, dx):
        dx -= correction
    else:
        dx = _as(xp, local_grads.dx, cdt) - _as(xp, correction, cdt)
    return BatchNormGrads(_as(xp, dx, x.dtype), sum_dy_xhat, sum_dy)
