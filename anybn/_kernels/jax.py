"""The JAX kernel: training-mode batch norm as a ``jax.custom_vjp``.

Imported by the dispatcher when ``x`` is a JAX array (never at ``import anybn``).
The forward is the generic kernel (:mod:`anybn._core.generic`) on ``jax.numpy``;
the ``custom_vjp`` makes reverse-mode autodiff (``jax.grad``, ``jax.vjp``,
``jax.jacrev``) use anybn's analytic backward instead of tracing through the
forward's two-pass statistics. Both rules are plain ``jax.numpy`` code, so the
function works under ``jax.jit`` and ``jax.vmap`` and reverse-over-reverse
(``jax.jacrev(jax.grad(f))``) differentiates the backward itself: second
derivatives are exact.

Forward-mode autodiff (``jax.jvp``, ``jax.jacfwd``, and so ``jax.hessian``,
which is ``jacfwd(jacrev)``) is not defined for a ``custom_vjp`` function: JAX
raises. Use ``jax.jacrev(jax.jacrev(f))`` for a Hessian.

Eval mode needs no custom rule (``y = x * scale + shift``: JAX's own derivative
is the analytic one) and runs the generic kernel directly, as does the backward
called on JAX arrays.

Named axes (``axis_name=``, inside ``jax.pmap`` or ``jax.shard_map``)
    Each device computes its per-channel ``(count, first-pass mean, correction,
    M2)`` (the corrected two-pass algorithm; the count is per channel, from the
    mask when there is one), one ``jax.lax.all_gather`` over the axis (and its
    ``axis_index_groups``) brings every device's, and the many-way Chan merge
    (:func:`_merge`), computed alike on every device, gives the statistics of
    the whole batch, weighted by the counts. The backward gathers the two sums
    (and the counts) the same way. ``all_gather`` is the one collective used:
    ``shard_map`` has no ``psum`` with ``axis_index_groups``, and a gather summed
    in device order gives the same bits on every device.

    Cotangents follow JAX's own convention for collectives (what ``jax.grad``
    of a plain ``jax.numpy`` batch norm over ``all_gather`` gives): the
    gradient of the sum over devices of each device's loss. Under
    ``shard_map``'s varying-axis types a replicated (invariant) weight receives
    the sum of every device's ``dweight``, and invariant statistics' cotangents
    are not summed again; under ``pmap`` every argument is per device.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import array_api_compat as compat
import jax

from .._call import Call
from .._core import generic
from .._core.outputs import BatchNormGrads, BatchNormOutput
from .._core.stats import (
    centered_moments,
    channel_dot,
    channel_sum,
    masked_centered_moments,
    reaching_loss,
)
from .._xp import Array, channel_shape, compute_dtype, param_shape, reduction_axes

__all__ = ["accepts", "run_backward", "run_forward"]

NAME = "jax"
FAST = False  # not a fast path: JAX's differentiation rule for the forward


class _Static(NamedTuple):
    """The non-array arguments: hashable, so that ``jit`` caches on them."""

    momentum: float
    eps: float
    axis: int | tuple[int, ...]
    n_values: int
    var_estimator: str
    axis_name: Any = None
    axis_index_groups: tuple[tuple[int, ...], ...] | None = None


def _call(static: _Static, mask: Array | None) -> Call:
    import jax.numpy as jnp

    return Call(
        jnp, static.axis, static.n_values, True, static.momentum, static.eps,
        static.var_estimator, mask, static.axis_name, static.axis_index_groups,
    )  # fmt: skip


# --- named axes: the statistics and sums of the whole batch ---------------------------------


def _gather(call: Call, *parts: Array) -> Array:
    """Every device's ``parts`` (each of shape ``(C,)``), stacked: ``(devices, len(parts), C)``."""
    import jax.numpy as jnp

    return jax.lax.all_gather(
        jnp.stack(parts), call.axis_name, axis_index_groups=call.axis_index_groups
    )


def _flat(a: Array) -> Array:
    """A keepdims-shaped per-channel array as ``(C,)`` (C the product of the channel axes)."""
    return a.reshape(-1)


class _Merged(NamedTuple):
    """The whole batch's statistics, per channel, ``(C,)`` in the compute dtype."""

    n: Array  #: values counted over every device
    anchor: Array  #: the first non-empty device's first-pass mean
    offset: Array  #: mean - anchor, to the digits of each device's (m1, correction) pair
    m2: Array


def _merge(gathered: Array) -> _Merged:
    """The many-way Chan merge of every device's ``(n, m1, correction, M2)``.

    Each device's mean is measured from one anchor (the first non-empty device's
    first-pass mean), as the offset ``(m1 - anchor) + correction``, so that the
    pair's digits survive; then, with ``N = sum n_d``::

        offset = sum_d n_d * offset_d / N
        M2     = sum_d (M2_d + n_d * (offset_d - offset)^2)

    which is Chan's pairwise update applied to every device at once: exact, and
    weighted by the counts. Empty devices contribute nothing.
    """
    import jax.numpy as jnp

    n_d, m1_d, corr_d, m2_d = (gathered[:, i] for i in range(4))
    present = n_d > 0
    first = jnp.argmax(present, axis=0)
    zero = jnp.zeros((), dtype=m1_d.dtype)
    # the first present device's m1, selected (a sum of it and zeros: exact)
    chosen = jnp.arange(gathered.shape[0])[:, None] == first[None, :]
    anchor = jnp.sum(jnp.where(chosen, m1_d, zero), axis=0)
    offset_d = jnp.where(present, (m1_d - anchor) + corr_d, zero)
    n = jnp.sum(n_d, axis=0)
    offset = jnp.sum(n_d * offset_d, axis=0) / n
    delta = jnp.where(present, offset_d - offset, zero)
    m2 = jnp.sum(jnp.where(present, m2_d, zero) + n_d * delta * delta, axis=0)
    return _Merged(n, anchor, offset, m2)


def _local_moments(call: Call, xc: Array, mask: Array | None) -> tuple[Array, ...]:
    """This device's ``(n, m1, correction, M2)``, each ``(C,)``: zeros for no counted value."""
    import jax.numpy as jnp

    axes = reduction_axes(xc.ndim, call.axis)
    if mask is None:
        m = centered_moments(jnp, xc, axes, call.n)
        n = jnp.full(m.m2.shape, call.n, dtype=xc.dtype)
    else:
        n = channel_sum(jnp, mask.astype(xc.dtype), axes)
        m = masked_centered_moments(jnp, xc, mask, axes, jnp.maximum(n, 1))
    return tuple(_flat(a) for a in (n, m.first_pass_mean, m.correction, m.m2))


def _synced_forward(
    call: Call,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
) -> tuple[BatchNormOutput, Array]:
    """The training forward with the statistics of the whole batch; and the total count.

    ``y = (x - anchor) * scale + (bias - offset * scale)``: ``x - anchor`` is as
    exact as the local kernel's ``x - m1``, and the offset carries the digits of
    the mean that a rounded mean would lose.
    """
    import jax.numpy as jnp

    cdt: Any = compute_dtype(jnp, x.dtype)
    channels = param_shape(tuple(x.shape), call.axis)
    bshape = channel_shape(x.ndim, call.axis, channels)
    xc = x.astype(cdt)
    gathered = _gather(call, *_local_moments(call, xc, call.mask))
    if call.mask is None and gathered.shape[0] * call.n < 2:
        raise ValueError(
            "Expected more than 1 value per channel when training, got "
            f"{gathered.shape[0] * call.n} over the {gathered.shape[0]} device(s) of axis_name="
            f"{call.axis_name!r} (local input size {tuple(x.shape)})"
        )
    merged = _merge(gathered)
    var = merged.m2 / merged.n
    if call.mask is not None:  # fewer than 2 counted values in a channel: NaN (lazy)
        var = jnp.where(merged.n < 2, jnp.asarray(float("nan"), dtype=cdt), var)
    invstd = 1.0 / jnp.sqrt(var + call.eps)
    scale = invstd if weight is None else invstd * _flat(weight.astype(cdt))
    shift = -merged.offset * scale
    if bias is not None:
        shift = shift + _flat(bias.astype(cdt))
    y = (xc - merged.anchor.reshape(bshape)) * scale.reshape(bshape) + shift.reshape(bshape)
    mean = (merged.anchor + merged.offset).reshape(channels)
    new_mean, new_var = running_mean, running_var
    if running_mean is not None and running_var is not None:
        new_mean, new_var = generic.running_update(
            call, running_mean, running_var, mean, merged.m2.reshape(channels),
            merged.n.reshape(channels), channels,
        )  # fmt: skip
    out = BatchNormOutput(y.astype(x.dtype), mean, invstd.reshape(channels), new_mean, new_var)
    return out, merged.n


def _varying(a: Array, axis_name: Any) -> bool | None:
    """Whether ``a`` varies along ``axis_name`` in ``shard_map``'s types; None where JAX
    does not type it (``pmap``, ``shard_map(check_vma=False)``, older JAX)."""
    kind = getattr(jax.typeof(a), "manual_axis_type", None)
    varying = getattr(kind, "varying", None)
    if varying is None:
        varying = getattr(jax.typeof(a), "vma", None)
    if varying is None:
        return None
    names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return all(n in varying for n in names)


def _synced_grads(
    call: Call,
    dy: Array,
    x: Array,
    weight: Array | None,
    mean: Array,
    invstd: Array,
    d_mean: Array | None = None,
    d_invstd: Array | None = None,
    summed: tuple[bool, bool] = (True, True),
) -> tuple[Array, Array, Array]:
    """``(dx, dweight, dbias)`` through the statistics of the whole batch.

    The local ``sum(dy)`` and ``sum(dy * (x - mean))`` (masked as the generic
    backward does), the counts and, when given, the cotangents of the ``mean`` and
    ``invstd`` outputs are gathered and summed over the devices (each cotangent only
    where ``summed`` says so: an invariant one already is the total); ``dweight``
    and ``dbias`` are this device's own sums.
    """
    import jax.numpy as jnp

    cdt: Any = compute_dtype(jnp, x.dtype)
    channels = param_shape(tuple(x.shape), call.axis)
    bshape = channel_shape(x.ndim, call.axis, channels)
    axes = reduction_axes(x.ndim, call.axis)
    mask = call.mask
    dyc = dy.astype(cdt)
    invstd_f = _flat(invstd.astype(cdt))
    centered = x.astype(cdt) - mean.astype(cdt).reshape(bshape)
    sum_dy = channel_sum(jnp, dyc, axes)
    reaching = centered if mask is None else reaching_loss(jnp, centered, mask, dyc)
    sum_dy_centered = channel_dot(jnp, dyc, reaching, axes)
    if mask is None:
        n_local = jnp.full(sum_dy.shape, call.n, dtype=cdt)
    else:
        n_local = channel_sum(jnp, mask.astype(cdt), axes)
    parts = [_flat(n_local), _flat(sum_dy), _flat(sum_dy_centered)]
    stats = [a if a is None else _flat(a.astype(cdt)) for a in (d_mean, d_invstd)]
    parts += [a for a, s in zip(stats, summed, strict=True) if a is not None and s]
    totals = list(jnp.sum(_gather(call, *parts), axis=0))
    n, total_dy, total_dy_xhat = totals[0], totals[1], invstd_f * totals[2]
    del totals[:3]
    stats = [
        a if a is None or not s else totals.pop(0) for a, s in zip(stats, summed, strict=True)
    ]
    scale = invstd_f if weight is None else invstd_f * _flat(weight.astype(cdt))
    # dx = scale * (dy - m * (SUM_dy + xhat * SUM_dy_xhat) / N), m the mask (1 without one),
    # minus the gradients through the mean and invstd outputs, m * (dmean - dinvstd *
    # invstd^3 * (x - mean)) / N
    slope = scale * invstd_f * total_dy_xhat / n
    shift = scale * total_dy / n
    if stats[1] is not None:
        slope = slope + stats[1] * invstd_f**3 / n
    if stats[0] is not None:
        shift = shift - stats[0] / n
    through_stats = centered * slope.reshape(bshape) + shift.reshape(bshape)
    if mask is not None:
        through_stats = jnp.where(mask, through_stats, jnp.zeros((), dtype=cdt))
    dx = dyc * scale.reshape(bshape) - through_stats
    dweight = (invstd_f * _flat(sum_dy_centered)).reshape(channels)
    return dx.astype(x.dtype), dweight, sum_dy.reshape(channels)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _train(
    static: _Static,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    mask: Array | None,
) -> tuple[Array, ...]:
    return tuple(_train_fwd(static, x, running_mean, running_var, weight, bias, mask)[0])


def _train_fwd(
    static: _Static,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
    mask: Array | None,
) -> tuple[tuple[Array, ...], tuple[Any, ...]]:
    call = _call(static, mask)
    if static.axis_name is None:
        out = generic.forward(call, x, running_mean, running_var, weight, bias)
    else:
        out, _ = _synced_forward(call, x, running_mean, running_var, weight, bias)
    residuals = (x, weight, out.mean, out.invstd, mask, running_mean, running_var, bias)
    return tuple(out), residuals


def _train_bwd(static: _Static, residuals: tuple[Any, ...], cotangents: tuple[Any, ...]) -> Any:
    """Cotangents of (x, running_mean, running_var, weight, bias, mask).

    ``y`` by anybn's backward; the returned ``mean`` and ``invstd`` (rarely part
    of a loss, but outputs all the same) by their own derivatives::

        d mean / d x_i   = m_i / n
        d invstd / d x_i = -invstd^3 * m_i * (x_i - mean) / n

    The running statistics are cut from the graph (their cotangents are zero).
    """
    import jax.numpy as jnp

    x, weight, mean, invstd, mask, running_mean, running_var, bias = residuals
    dy, dmean, dinvstd = cotangents[:3]

    def zero(a: Array | None) -> Array | None:
        return None if a is None else jnp.zeros_like(a)

    if static.axis_name is not None:
        dx, dweight, dbias, dmask = _synced_bwd(static, residuals, dy, dmean, dinvstd)
        return dx, zero(running_mean), zero(running_var), dweight, dbias, dmask
    grads = generic.backward(_call(static, mask), dy, x, weight, mean, invstd)
    cdt = compute_dtype(jnp, x.dtype)
    axes = reduction_axes(x.ndim, static.axis)
    bshape = channel_shape(x.ndim, static.axis, param_shape(tuple(x.shape), static.axis))
    invstd_b = jnp.reshape(invstd, bshape)
    centered = x.astype(cdt) - jnp.reshape(mean, bshape)
    terms = jnp.reshape(dmean, bshape) - jnp.reshape(dinvstd, bshape) * invstd_b**3 * centered
    if mask is None:
        d_stats = terms / static.n_values
    else:
        # m_i / n selected (not multiplied): a NaN or inf x at a masked-out position stays out
        n = channel_sum(jnp, mask.astype(cdt), axes)
        d_stats = jnp.where(mask, terms / n, jnp.zeros_like(terms, shape=()))
    dx = (grads.dx.astype(cdt) + d_stats).astype(x.dtype)
    dweight = None if weight is None else grads.dweight.astype(weight.dtype)
    dbias = None if bias is None else grads.dbias.astype(bias.dtype)
    return dx, zero(running_mean), zero(running_var), dweight, dbias, None


def _synced_bwd(
    static: _Static, residuals: tuple[Any, ...], dy: Array, dmean: Array, dinvstd: Array
) -> tuple[Any, ...]:
    """:func:`_train_bwd` over a named axis: ``(dx, dweight, dbias, None)``.

    The cotangents of ``mean`` and ``invstd`` are summed over the devices where they
    vary (each device's is its own loss's); where ``shard_map`` types them invariant
    they already are the total. A weight or bias that does not vary over the axis
    (replicated in ``shard_map``) receives the sum of every device's gradient, as
    JAX's own transpose of that replication gives it.
    """
    x, weight, mean, invstd, mask, _, _, bias = residuals
    name = static.axis_name
    typed = _varying(x, name)  # x, a shard of the batch, varies wherever JAX types it
    summed = (
        (True, True) if not typed else (bool(_varying(dmean, name)), bool(_varying(dinvstd, name)))
    )
    dx, dweight, dbias = _synced_grads(
        _call(static, mask), dy, x, weight, mean, invstd, dmean, dinvstd, summed
    )

    def param_grad(g: Array, p: Array | None) -> Array | None:
        if p is None:
            return None
        if typed and not _varying(p, name):
            g = jax.lax.psum(g, name)
        return g.astype(p.dtype)

    return dx, param_grad(dweight, weight), param_grad(dbias, bias), None


_train.defvjp(_train_fwd, _train_bwd)


def accepts(call: Call, x: Array) -> bool:
    """JAX arrays in training (eval and the local backward run the generic kernel)."""
    return call.training and compat.is_jax_array(x)


def run_forward(
    call: Call,
    x: Array,
    running_mean: Array | None,
    running_var: Array | None,
    weight: Array | None,
    bias: Array | None,
) -> BatchNormOutput:
    """The training forward with anybn's VJP."""
    static = _Static(
        call.momentum, call.eps, call.axis, call.n, call.var_estimator, call.axis_name,
        call.axis_index_groups,
    )  # fmt: skip
    y, mean, invstd, rm, rv = _train(static, x, running_mean, running_var, weight, bias, call.mask)
    if running_mean is not None:
        rm, rv = jax.lax.stop_gradient(rm), jax.lax.stop_gradient(rv)
    return BatchNormOutput(y, mean, invstd, rm, rv)


def run_backward(
    call: Call, dy: Array, x: Array, weight: Array | None, mean: Array, invstd: Array
) -> BatchNormGrads | None:
    """Over a named axis, the synchronised backward; else None: the generic kernel's."""
    if call.axis_name is None:
        return None
    dx, dweight, dbias = _synced_grads(call, dy, x, weight, mean, invstd)
    return BatchNormGrads(dx, dweight, dbias)
