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
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import array_api_compat as compat
import jax

from .._call import Call
from .._core import generic
from .._core.outputs import BatchNormOutput
from .._core.stats import channel_sum
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


def _call(static: _Static, mask: Array | None) -> Call:
    import jax.numpy as jnp

    return Call(
        jnp, static.axis, static.n_values, True, static.momentum, static.eps,
        static.var_estimator, mask,
    )  # fmt: skip


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

    out = generic.forward(_call(static, mask), x, running_mean, running_var, weight, bias)
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

    def zero(a: Array | None) -> Array | None:
        return None if a is None else jnp.zeros_like(a)

    dweight = None if weight is None else grads.dweight.astype(weight.dtype)
    dbias = None if bias is None else grads.dbias.astype(bias.dtype)
    return dx, zero(running_mean), zero(running_var), dweight, dbias, None


_train.defvjp(_train_fwd, _train_bwd)


def accepts(call: Call, x: Array) -> bool:
    """JAX arrays in training (eval and the backward run the generic kernel)."""
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
    static = _Static(call.momentum, call.eps, call.axis, call.n, call.var_estimator)
    y, mean, invstd, rm, rv = _train(static, x, running_mean, running_var, weight, bias, call.mask)
    if running_mean is not None:
        rm, rv = jax.lax.stop_gradient(rm), jax.lax.stop_gradient(rv)
    return BatchNormOutput(y, mean, invstd, rm, rv)


def run_backward(
    call: Call, dy: Array, x: Array, weight: Array | None, mean: Array, invstd: Array
) -> None:
    """None: the generic kernel is JAX's backward."""
    return None
