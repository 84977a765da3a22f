"""The functional API: :func:`batch_norm` and :func:`batch_norm_backward`.

One call's way: resolve it (:mod:`anybn._call`: the plain branch or the full
checks), hand a synchronised training call to :mod:`anybn.distributed.sync`,
else to the dispatcher (:mod:`anybn._kernels`), which runs the first kernel that
computes it and applies the post-conditions once.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from datetime import timedelta
from types import ModuleType
from typing import Any, Literal, overload

import array_api_compat as compat

from . import _kernels as kernels
from . import _variants as variants
from ._call import resolve_backward, resolve_forward, resolve_timeout
from ._checks import check_training
from ._core.outputs import BatchNormGrads, BatchNormOutput
from ._typing import AnyArray
from ._variants import RenormOutput
from .distributed import sync as _sync
from .distributed.comm import as_communicator

__all__ = [
    "BatchNormGrads",
    "BatchNormOutput",
    "RenormOutput",
    "batch_norm",
    "batch_norm_backward",
]

Array = Any


@overload
def batch_norm(
    x: AnyArray,
    running_mean: AnyArray | None = None,
    running_var: AnyArray | None = None,
    weight: AnyArray | None = None,
    bias: AnyArray | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = 1,
    mask: AnyArray | None = None,
    var_estimator: str = "unbiased",
    renorm: Literal[False] = False,
    virtual_batch_size: int | None = None,
    comm: object = None,
    timeout: float | timedelta | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    xp: ModuleType | None = None,
) -> BatchNormOutput: ...


@overload
def batch_norm(
    x: AnyArray,
    running_mean: AnyArray | None = None,
    running_var: AnyArray | None = None,
    weight: AnyArray | None = None,
    bias: AnyArray | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = 1,
    mask: AnyArray | None = None,
    var_estimator: str = "unbiased",
    renorm: Literal[True],
    renorm_clipping: Mapping[str, float] | None = None,
    renorm_momentum: float = 0.01,
    renorm_mean: AnyArray | None = None,
    renorm_std: AnyArray | None = None,
    running_std: AnyArray | None = None,
    virtual_batch_size: int | None = None,
    comm: object = None,
    timeout: float | timedelta | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    xp: ModuleType | None = None,
) -> RenormOutput: ...


@overload
def batch_norm(
    x: AnyArray,
    running_mean: AnyArray | None = None,
    running_var: AnyArray | None = None,
    weight: AnyArray | None = None,
    bias: AnyArray | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = 1,
    mask: AnyArray | None = None,
    var_estimator: str = "unbiased",
    renorm: bool,
    renorm_clipping: Mapping[str, float] | None = None,
    renorm_momentum: float = 0.01,
    renorm_mean: AnyArray | None = None,
    renorm_std: AnyArray | None = None,
    running_std: AnyArray | None = None,
    virtual_batch_size: int | None = None,
    comm: object = None,
    timeout: float | timedelta | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    xp: ModuleType | None = None,
) -> BatchNormOutput | RenormOutput: ...


def batch_norm(
    x: AnyArray,
    running_mean: AnyArray | None = None,
    running_var: AnyArray | None = None,
    weight: AnyArray | None = None,
    bias: AnyArray | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: int | tuple[int, ...] = 1,
    mask: AnyArray | None = None,
    var_estimator: str = "unbiased",
    renorm: bool = False,
    renorm_clipping: Mapping[str, float] | None = None,
    renorm_momentum: float = 0.01,
    renorm_mean: AnyArray | None = None,
    renorm_std: AnyArray | None = None,
    running_std: AnyArray | None = None,
    virtual_batch_size: int | None = None,
    comm: object = None,
    timeout: float | timedelta | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    xp: ModuleType | None = None,
) -> BatchNormOutput | RenormOutput:
    r"""Batch normalization over every axis of ``x`` but the channel ``axis``.

    With ``training=True`` the batch statistics are used and, if running
    statistics are given, updated copies are returned::

        y                = (x - mean) / sqrt(var + eps) * weight + bias
        new_running_mean = (1 - momentum) * running_mean + momentum * mean
        new_running_var  = (1 - momentum) * running_var  + momentum * var * n / (n - 1)

    where ``var`` is the biased batch variance and ``n`` the number of values
    per channel (``var_estimator="biased"`` stores ``var`` itself, as Keras and
    Flax do). With ``mask``, ``mean``, ``var`` and ``n`` are those of the values
    where the mask is True; ``y`` is still computed at every position. With
    ``training=False`` the running statistics are used in place of ``mean`` and
    ``var`` and are returned unchanged. This matches
    :func:`torch.nn.functional.batch_norm`.

    Parameters
    ----------
    x : array
        Input of shape ``(N, C, ...)`` (or with the channels on ``axis``), any
        real floating dtype. float16 and bfloat16 accumulate in float32.
    running_mean, running_var : array or None, optional
        Running statistics of shape ``(C,)``. Required when ``training=False``;
        give both or neither. Never modified: updated copies are returned.
    weight, bias : array or None, optional
        Affine parameters of shape ``(C,)``; ``None`` means 1 and 0.
    training : bool, optional
        Normalize with batch statistics (True) or running statistics (False).
    momentum : float, optional
        Weight of the batch statistic in the running update, in [0, 1].
    eps : float, optional
        Added to the variance for stability; must be > 0.
    axis : int or tuple of int, optional
        The channel axis; negative values count from the end (-1 for channels-last).
        A tuple names several channel axes (Keras' list ``axis``, Chainer's
        ``param_shape``): the per-channel arrays then have the shape of those
        axes, in increasing axis order (``x.shape[1], x.shape[2]`` for ``(1, 2)``).
    mask : array or None, optional
        A boolean array, True where a value counts for the batch statistics
        (Keras' and Flax' ``mask``; padding is False): of x's shape, of a shape
        that broadcasts to it, or of x's shape without the channel axes (Keras'
        mask: ``(batch, time)`` for x ``(batch, time, features)`` with
        ``axis=-1``), which is broadcast along them. Values
        where it is False never reach the statistics, even NaN or inf.
        Training with fewer than 2 counted values in a channel raises (lazy
        arrays, which cannot be inspected, give NaN for that channel). Ignored
        for the statistics in eval. None: every value counts.
    var_estimator : {"unbiased", "biased"}, optional
        What ``new_running_var`` accumulates: the unbiased batch variance
        (``n / (n - 1)`` times the biased one; PyTorch, Chainer) or the biased
        one (Keras, Flax).
    renorm : bool, optional
        Batch renormalization (Ioffe 2017), Keras 3's ``renorm=True``: in training
        ``y = ((x - mean) * invstd * r + d) * weight + bias`` with
        ``r = clip(std / max(renorm_std, sqrt(eps)), rmin, rmax)`` and
        ``d = clip((mean - renorm_mean) / max(renorm_std, sqrt(eps)), -dmax, dmax)``
        (``std = sqrt(var + eps)`` of the batch), constants for the gradient. Needs
        ``running_mean``, ``running_var``, ``renorm_mean`` and ``renorm_std``, and
        returns a :class:`anybn.RenormOutput` (``r``, ``d`` and the new moving
        statistics besides the five usual fields). The running variance is then
        updated as Keras 3 does, through a running standard deviation
        (``running_std``); see the math page. Eval is unchanged.
    renorm_clipping : dict, optional
        Keras' clipping: keys among ``"rmin"``, ``"rmax"``, ``"dmax"`` (missing: 0,
        inf, inf), with ``rmin <= 1 <= rmax`` and ``dmax >= 0``. A schedule of rmax
        and dmax (the paper relaxes them over training) is a new dict per call.
    renorm_momentum : float, optional
        Weight of the batch statistics in the update of ``renorm_mean`` and
        ``renorm_std``, in [0, 1] (Keras' ``renorm_momentum=0.99`` is 0.01 here).
    renorm_mean, renorm_std : array, optional
        The renorm moving statistics, shape ``(C,)`` (start: 0 and 1). Never
        modified: updated copies are returned.
    running_std : array, optional
        The running standard deviation ``sqrt(var + eps)`` of Keras 3's update
        (``moving_stddev``, start: 1); None derives it as ``sqrt(running_var + eps)``.
    virtual_batch_size : int, optional
        Ghost batch norm (Keras 2's ``virtual_batch_size=k``): in training x of shape
        ``(N, ...)`` is read as ``(k, N // k, ...)`` and each of the ``N // k``
        groups (sample ``i`` in group ``i % (N // k)``) is normalised with its own
        statistics; ``mean`` and ``invstd`` are returned per group, shape
        ``(N // k, C)``; the running statistics are updated once, from the groups'
        mean statistics. ``N`` must be a multiple of ``k``; axis 0 must not be a
        channel axis. Eval is unchanged. Not combinable with ``comm`` or
        ``axis_name`` in training (ValueError: ghost batches are one process's).
    comm : optional
        Synchronize over processes: a ``torch.distributed`` ProcessGroup, an
        mpi4py communicator, ``"torch"`` (the default process group), ``"mpi"``
        (``COMM_WORLD``) or an :class:`anybn.distributed.Communicator`. In
        training every rank must call with its shard of the batch; the batch
        statistics (and the running-statistics update) are then those of the
        concatenated batch, on every rank. Ignored in eval. None: local.
        See :mod:`anybn.distributed`. Every option applies (``mask``, several
        channel axes, ``var_estimator``): with a mask each rank's counted values,
        mean and M2 merge exactly (count-weighted Chan merge), and a rank whose
        mask is all False contributes nothing; every rank passes a mask or none,
        and the same ``var_estimator``. A check that fails on one rank raises
        on every rank (every check runs before the ranks communicate); torch
        tensors that require grad differentiate through the global statistics.
        With ``renorm=True`` the corrections use the statistics of the whole
        batch, the same on every rank; ``virtual_batch_size`` is refused in
        training (ValueError on every rank).
    timeout : float or datetime.timedelta, optional
        With ``comm=``: how long, in seconds, a rank waits for the others to make
        the same call. A rank that does not answer in time makes every rank raise
        :class:`anybn.distributed.CollectiveTimeout` (a ``TimeoutError``) naming
        the collective and the ranks that did not answer, the late ranks included
        when they come. None: the engine's default (torch.distributed: the process
        group's timeout; MPI: ``anybn.distributed.deadline.DEFAULT_TIMEOUT``, 30 minutes).
    axis_name : str or tuple of str, optional
        JAX only: inside ``jax.pmap`` or ``jax.shard_map``, the named axis whose
        devices hold the shards of the batch. In training the statistics are those
        of the whole batch, exactly (every device's count, mean and M2 gathered
        with ``jax.lax.all_gather`` and merged by the Chan formula, weighted by the
        counts, so uneven ``mask=`` counts are exact), and ``jax.grad`` reduces
        the backward's two sums over the same axis. Ignored in eval. As Flax's
        ``BatchNorm(axis_name=...)``, but count-weighted.
    axis_index_groups : sequence of sequences of int, optional
        With ``axis_name``: groups of device indices that share statistics (each
        group normalises its own batch), as ``jax.lax.all_gather`` takes them and
        Flax's ``BatchNorm`` does.
    xp : module, optional
        The array namespace; resolved from ``x`` when omitted.

    Returns
    -------
    BatchNormOutput
        ``(y, mean, invstd, new_running_mean, new_running_var)``.

    Raises
    ------
    TypeError
        Non-floating dtypes, arrays from different libraries, wrong argument types.
    ValueError
        Bad shapes or axis, a ``mask`` of a shape it does not take, ``eps <= 0``,
        ``momentum`` outside [0, 1], arrays on different devices, one value per
        channel in training (fewer than 2 counted values with a mask), eval
        without running statistics, or only one of them given.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0]])
    >>> out = anybn.batch_norm(x, training=True)
    >>> out.y
    array([[-0.99999...,  -0.99999...],
           [ 0.99999...,  0.99999...]])
    >>> out.mean
    array([ 2., 20.])

    Batch renormalization, with Keras' clipping:

    >>> ones, zeros = np.ones(2), np.zeros(2)
    >>> rn = anybn.batch_norm(x, zeros, ones, training=True, renorm=True,
    ...                       renorm_mean=zeros, renorm_std=ones,
    ...                       renorm_clipping={"rmax": 3.0, "dmax": 1.0})
    >>> rn.d
    array([1., 1.])
    """
    if (
        renorm is not False
        or virtual_batch_size is not None
        or renorm_mean is not None
        or renorm_std is not None
        or running_std is not None
    ):
        return variants.forward(
            batch_norm, x, running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=eps, axis=axis, mask=mask,
            var_estimator=var_estimator, renorm=renorm, renorm_clipping=renorm_clipping,
            renorm_momentum=renorm_momentum, renorm_mean=renorm_mean, renorm_std=renorm_std,
            running_std=running_std, virtual_batch_size=virtual_batch_size,
            options={
                "comm": comm, "timeout": timeout, "axis_name": axis_name,
                "axis_index_groups": axis_index_groups,
            },
            xp=xp,
        )  # fmt: skip
    if comm is not None:
        return _sync_batch_norm(
            x, running_mean, running_var, weight, bias,
            training=training, momentum=momentum, eps=eps, axis=axis, mask=mask,
            var_estimator=var_estimator, xp=xp, comm=comm, timeout=timeout,
            axis_name=axis_name,
        )  # fmt: skip
    if timeout is not None:
        resolve_timeout(timeout)  # checked, and unused without comm=
    call, (running_mean, running_var, weight, bias) = resolve_forward(
        x, running_mean, running_var, weight, bias,
        training=training, momentum=momentum, eps=eps, axis=axis, mask=mask,
        var_estimator=var_estimator, xp=xp, axis_name=axis_name,
        axis_index_groups=axis_index_groups,
    )  # fmt: skip
    return kernels.forward(call, x, running_mean, running_var, weight, bias)


def batch_norm_backward(
    dy: AnyArray,
    x: AnyArray,
    weight: AnyArray | None,
    mean: AnyArray,
    invstd: AnyArray,
    *,
    training: bool = True,
    axis: int | tuple[int, ...] = 1,
    mask: AnyArray | None = None,
    renorm_r: AnyArray | None = None,
    renorm_d: AnyArray | None = None,
    virtual_batch_size: int | None = None,
    comm: object = None,
    timeout: float | timedelta | None = None,
    axis_name: Hashable | None = None,
    axis_index_groups: Sequence[Sequence[int]] | None = None,
    xp: ModuleType | None = None,
) -> BatchNormGrads:
    r"""Gradients of :func:`batch_norm` with respect to x, weight and bias.

    With ``xhat = (x - mean) * invstd`` and per-channel sums over the ``n``
    values of each channel::

        sum_dy      = sum(dy)
        sum_dy_xhat = sum(dy * xhat)
        dbias       = sum_dy
        dweight     = sum_dy_xhat
        dx          = weight * invstd * (dy - sum_dy / n - xhat * sum_dy_xhat / n)   (training)
        dx          = weight * invstd * dy                                           (eval)

    In training the batch statistics depend on x and the gradient flows through
    them; in eval ``mean`` and ``invstd`` are constants. With a ``mask`` the sums
    still run over every position (every output depends on the statistics), and
    with ``m`` the mask as 0/1 and ``n`` the counted values per channel::

        dx = weight * invstd * (dy - m * (sum_dy + xhat * sum_dy_xhat) / n)         (training)

    A masked-out position whose ``dy`` is 0 adds nothing to the sums, even where its
    ``x`` is NaN or inf (padding), and ``dx`` there is ``weight * invstd * dy``.

    Parameters
    ----------
    dy : array
        Gradient of the loss with respect to ``y``; same shape as ``x``.
    x : array
        The forward input.
    weight : array or None
        The forward weight, shape ``(C,)``; ``None`` means 1.
    mean, invstd : array
        The ``mean`` and ``invstd`` returned by the forward call, shape ``(C,)``.
    training : bool, optional
        Whether the forward call normalized with batch statistics.
    axis : int or tuple of int, optional
        The channel axis (or axes) used in the forward call.
    mask : array or None, optional
        The mask of the forward call (see :func:`batch_norm`); only training uses it.
    renorm_r, renorm_d : array, optional
        The corrections ``out.r`` and ``out.d`` of a forward with ``renorm=True``
        (give both): ``dx`` is then the plain one with ``weight * r``, and
        ``dweight = r * sum(dy * xhat) + d * sum(dy)``. Ignored in eval.
    virtual_batch_size : int, optional
        That of the forward (see :func:`batch_norm`); ``mean`` and ``invstd`` are
        then the forward's per-group ones, shape ``(N // k, C)``; ``dweight`` and
        ``dbias`` are summed over the groups.
    comm : optional
        The communicator of a synchronized forward (see :func:`batch_norm`):
        in training the two sums (and, with a mask, the counted values) are
        all-reduced over its ranks and ``dx`` is the gradient through the global
        statistics; ``dweight`` and ``dbias`` stay this rank's own sums. Not
        differentiable (TypeError on every rank). Ignored in eval. None: local.
    timeout : float or datetime.timedelta, optional
        With ``comm=``: the deadline of the call, as for :func:`batch_norm`.
    axis_name, axis_index_groups : optional
        JAX only: the named axis (and its groups) of a synchronised forward (see
        :func:`batch_norm`): in training the two sums, and the counts, are
        reduced over its devices, and ``dx`` is the gradient through the
        statistics of the whole batch; ``dweight`` and ``dbias`` stay this
        device's own sums. ``jax.grad`` of a forward with ``axis_name`` does
        this by itself.
    xp : module, optional
        The array namespace; resolved from ``x`` when omitted.

    Returns
    -------
    BatchNormGrads
        ``(dx, dweight, dbias)``; dx in x's dtype, the others in the
        accumulation dtype (float32 for half-precision x).

    Raises
    ------
    TypeError, ValueError
        As for :func:`batch_norm`, and ValueError when ``dy.shape != x.shape``.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> x = np.array([[1.0, 10.0], [3.0, 30.0], [5.0, 20.0]])
    >>> out = anybn.batch_norm(x, training=True)
    >>> g = anybn.batch_norm_backward(np.ones_like(x), x, None, out.mean, out.invstd)
    >>> g.dbias
    array([3., 3.])
    >>> bool(np.allclose(g.dx, 0.0))
    True
    """
    if renorm_r is not None or renorm_d is not None or virtual_batch_size is not None:
        return variants.backward(
            batch_norm_backward, dy, x, weight, mean, invstd,
            training=training, axis=axis, mask=mask, renorm_r=renorm_r, renorm_d=renorm_d,
            virtual_batch_size=virtual_batch_size,
            options={
                "comm": comm, "timeout": timeout, "axis_name": axis_name,
                "axis_index_groups": axis_index_groups,
            },
            xp=xp,
        )  # fmt: skip
    if comm is not None:
        return _sync_batch_norm_backward(
            dy, x, weight, mean, invstd, training=training, axis=axis, mask=mask, xp=xp,
            comm=comm, timeout=timeout, axis_name=axis_name,
        )  # fmt: skip
    if timeout is not None:
        resolve_timeout(timeout)  # checked, and unused without comm=
    call, (dy, weight, mean, invstd) = resolve_backward(
        dy, x, weight, mean, invstd, training=training, axis=axis, mask=mask, xp=xp,
        axis_name=axis_name, axis_index_groups=axis_index_groups,
    )  # fmt: skip
    return kernels.backward(call, dy, x, weight, mean, invstd)


# --- comm=: the synchronised calls ---------------------------------------------------------


def _torch_autograd(*arrays: object) -> bool:
    """Whether autograd should record a synchronized call on these arrays."""
    if not compat.is_torch_array(arrays[0]):
        return False
    import torch

    return torch.is_grad_enabled() and any(
        a is not None and a.requires_grad  # type: ignore[attr-defined]
        for a in arrays
    )


def _sync_batch_norm(
    x: Array,
    running_mean: Array | None = None,
    running_var: Array | None = None,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
    axis: object = 1,
    mask: Array | None = None,
    var_estimator: str = "unbiased",
    xp: ModuleType | None = None,
    comm: object,
    timeout: object = None,
    axis_name: object = None,
) -> BatchNormOutput:
    """:func:`anybn.batch_norm` over the ranks of ``comm``.

    In training: the statistics of the batch concatenated over ranks (two
    collectives: the header, then one all-gather of ``3 * C`` values, ``4 * C``
    with a mask); every
    check, the options' included, runs before the header and fails every rank.
    PyTorch tensors that autograd records go through an ``autograd.Function``
    whose backward is the synchronized one (one all-reduce), so that gradients
    flow through the global statistics. In eval: the local computation, with
    every option of the local one (``mask`` and ``var_estimator`` change
    nothing in eval), and no communication.
    """
    if not check_training(training):
        resolve_timeout(timeout)
        return batch_norm(  # type: ignore[call-overload, misc]
            x, running_mean, running_var, weight, bias,
            training=False, momentum=momentum, eps=eps, axis=axis, mask=mask,
            var_estimator=var_estimator, xp=xp,
        )  # fmt: skip
    with _sync.failures_reported(comm, x, axis, timeout=timeout):
        if _torch_autograd(x, weight, bias):
            axis = _sync.check_options(axis, axis_name)
            seconds = resolve_timeout(timeout)
            _sync.check_autodiff(x, running_mean, running_var, weight, bias, mask)
            from .distributed.torch_autograd import function_batch_norm

            return function_batch_norm(
                x, running_mean, running_var, weight, bias,
                momentum=momentum, eps=eps, axis=axis, comm=as_communicator(comm),
                timeout=seconds, mask=mask, var_estimator=var_estimator,
            )  # fmt: skip
        return _sync.forward(
            x, running_mean, running_var, weight, bias,
            momentum=momentum, eps=eps, axis=axis, xp=xp, comm=comm, mask=mask,
            var_estimator=var_estimator, timeout=timeout, axis_name=axis_name,
        ).out  # fmt: skip



def _sync_batch_norm_backward(
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    *,
    training: bool = True,
    axis: object = 1,
    mask: Array | None = None,
    xp: ModuleType | None = None,
    comm: object,
    timeout: object = None,
    axis_name: object = None,
) -> BatchNormGrads:
    """:func:`anybn.batch_norm_backward` over the ranks of ``comm``.

    In training: the header exchange, then one all-reduce of ``(sum_dy, sum_dy_xhat)``
    (``2 * C`` values); every check runs before the header and fails every rank. In
    eval: local, with every option of the local one.
    """
    if not check_training(training):
        resolve_timeout(timeout)
        return batch_norm_backward(
            dy, x, weight, mean, invstd, training=False, axis=axis, mask=mask,  # type: ignore[arg-type]
            xp=xp,
        )  # fmt: skip
    return _sync.checked_backward(
        dy, x, weight, mean, invstd, axis=axis, mask=mask, xp=xp, comm=comm, timeout=timeout,
        axis_name=axis_name,
    )


