"""Load Keras 3 and Flax batch-norm weights into :class:`anybn.BatchNorm`, and back.

Keras' ``BatchNormalization`` and Flax' ``nn.BatchNorm`` differ from PyTorch's
conventions (anybn's default) in three ways, which the converters translate:

============================  ===============================  =============================
                              Keras 3 / Flax                   anybn (PyTorch)
============================  ===============================  =============================
momentum                      weight of the *old* running      weight of the *batch*
                              value: ``m`` (default 0.99)      statistic: ``1 - m``
running variance              biased batch variance            unbiased (``n / (n - 1)``);
                                                               ``var_estimator="biased"``
channel axis (default)        -1 (channels-last)               1; ``axis=-1``
eps (default)                 Keras 1e-3, Flax 1e-5            1e-5
============================  ===============================  =============================

So a converted layer has ``momentum=1 - m``, ``var_estimator="biased"``, the
library's ``axis`` and ``eps``, and computes, step for step, what the original
layer computes (tests/test_convert.py checks this against the update rules of
both libraries). Flax' default ``use_fast_variance=True`` computes the variance
as ``E[x^2] - E[x]^2``; anybn's two-pass variance agrees with it wherever that
formula is accurate, and stays accurate where it cancels (google/flax#1491).

Keras ``get_weights()`` order: ``[gamma, beta, moving_mean, moving_variance]``,
without ``gamma`` when ``scale=False`` and without ``beta`` when ``center=False``.
Flax variables: ``{"params": {"scale", "bias"}, "batch_stats": {"mean", "var"}}``.

Examples
--------
>>> import numpy as np
>>> from anybn import convert
>>> weights = [np.full(3, 2.0), np.zeros(3), np.ones(3), np.full(3, 4.0)]
>>> bn = convert.from_keras(weights)
>>> bn.momentum, bn.var_estimator, bn.axis, bn.eps
(0.0100..., 'biased', -1, 0.001)
>>> [w.tolist() for w in convert.to_keras(bn)][3]
[4.0, 4.0, 4.0]
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from types import ModuleType
from typing import Any

import numpy as np

from ._layer import BatchNorm
from ._xp import to_host

__all__ = ["from_flax", "from_keras", "to_flax", "to_keras"]


def _momentum(m: float, name: str) -> float:
    if not 0.0 <= float(m) <= 1.0:
        raise ValueError(f"{name} momentum must be in [0, 1] (its running-value weight), got {m}")
    return 1.0 - float(m)


def from_keras(
    weights: Sequence[Any],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-3,
    axis: int | tuple[int, ...] = -1,
    center: bool = True,
    scale: bool = True,
    xp: ModuleType | None = None,
    device: Any = None,
    dtype: Any = None,
) -> BatchNorm:
    """A :class:`~anybn.BatchNorm` equal to a Keras 3 ``BatchNormalization`` layer.

    Parameters
    ----------
    weights : sequence of arrays
        ``layer.get_weights()``: ``[gamma, beta, moving_mean, moving_variance]``,
        without ``gamma`` if ``scale=False`` and without ``beta`` if ``center=False``.
    momentum, epsilon, axis, center, scale
        The Keras layer's arguments (Keras' defaults); ``axis`` may be a list.
    xp, device, dtype
        Where the anybn layer's arrays live (see :class:`~anybn.BatchNorm`);
        by default the first input's library decides (NumPy placeholders until then).

    Returns
    -------
    BatchNorm
        With ``momentum=1 - momentum``, ``var_estimator="biased"``. A Keras
        layer with only one of ``center``/``scale`` gets ``affine=True`` with
        the missing parameter at its neutral value (bias 0, weight 1).

    Examples
    --------
    >>> import numpy as np
    >>> from anybn import convert
    >>> bn = convert.from_keras([np.ones(2), np.zeros(2), np.zeros(2), np.ones(2)])
    >>> bn(np.array([[1.0, 2.0], [3.0, 6.0]]))
    array([[-0.9995..., -0.9998...],
           [ 0.9995...,  0.9998...]])
    >>> bn.running_var  # Keras: 0.99 * 1 + 0.01 * biased variance
    array([1. , 1.03])
    """
    expected = int(scale) + int(center) + 2
    if len(weights) != expected:
        raise ValueError(
            f"weights must have {expected} arrays for center={center}, scale={scale} "
            f"([gamma, beta, moving_mean, moving_variance] minus the absent ones), "
            f"got {len(weights)}"
        )
    arrays = [to_host(w) for w in weights]
    gamma = arrays.pop(0) if scale else None
    beta = arrays.pop(0) if center else None
    moving_mean, moving_var = arrays
    return _build(
        moving_mean, moving_var, gamma, beta, affine=center or scale,
        momentum=_momentum(momentum, "Keras"), eps=epsilon, axis=axis,
        xp=xp, device=device, dtype=dtype,
    )  # fmt: skip


def to_keras(bn: BatchNorm, *, center: bool = True, scale: bool = True) -> list[np.ndarray]:
    """``bn``'s arrays as Keras ``set_weights()`` takes them (NumPy arrays).

    The Keras layer must be built with ``momentum=1 - bn.momentum``, ``epsilon=bn.eps``,
    ``axis=bn.axis`` and the given ``center``/``scale``; ``bn`` should use
    ``var_estimator="biased"`` for the running variance to mean what Keras means.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> from anybn import convert
    >>> [a.tolist() for a in convert.to_keras(anybn.BatchNorm(2, var_estimator="biased"))]
    [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0], [1.0, 1.0]]
    """
    mean, var, weight, bias = _host_arrays(bn)
    out = []
    if scale:
        out.append(weight)
    if center:
        out.append(bias)
    return [*out, mean, var]


def from_flax(
    variables: Mapping[str, Any],
    *,
    momentum: float = 0.99,
    epsilon: float = 1e-5,
    axis: int | tuple[int, ...] = -1,
    xp: ModuleType | None = None,
    device: Any = None,
    dtype: Any = None,
) -> BatchNorm:
    """A :class:`~anybn.BatchNorm` equal to a Flax ``nn.BatchNorm`` module.

    Parameters
    ----------
    variables : mapping
        The module's variables: ``{"params": {"scale": ..., "bias": ...},
        "batch_stats": {"mean": ..., "var": ...}}`` (``params`` may be absent
        or lack either entry: ``use_scale``/``use_bias=False``).
    momentum, epsilon, axis
        The Flax module's arguments (Flax' defaults).
    xp, device, dtype
        Where the anybn layer's arrays live.

    Examples
    --------
    >>> import numpy as np
    >>> from anybn import convert
    >>> variables = {"params": {"scale": np.ones(3), "bias": np.zeros(3)},
    ...              "batch_stats": {"mean": np.zeros(3), "var": np.ones(3)}}
    >>> bn = convert.from_flax(variables, momentum=0.9)
    >>> bn.momentum, bn.eps, bn.axis
    (0.0999..., 1e-05, -1)
    """
    try:
        stats = variables["batch_stats"]
        mean, var = to_host(stats["mean"]), to_host(stats["var"])
    except (KeyError, TypeError):
        raise ValueError(
            "variables must hold batch_stats with 'mean' and 'var' (Flax nn.BatchNorm's)"
        ) from None
    params = variables.get("params", {})
    weight = params.get("scale")
    bias = params.get("bias")
    return _build(
        mean, var,
        None if weight is None else to_host(weight),
        None if bias is None else to_host(bias),
        affine=weight is not None or bias is not None,
        momentum=_momentum(momentum, "Flax"), eps=epsilon, axis=axis,
        xp=xp, device=device, dtype=dtype,
    )  # fmt: skip


def to_flax(bn: BatchNorm) -> dict[str, dict[str, np.ndarray]]:
    """``bn``'s arrays as Flax variables (NumPy arrays; ``jnp.asarray`` them as needed).

    Examples
    --------
    >>> import anybn
    >>> from anybn import convert
    >>> convert.to_flax(anybn.BatchNorm(2))["batch_stats"]
    {'mean': array([0., 0.]), 'var': array([1., 1.])}
    """
    mean, var, weight, bias = _host_arrays(bn)
    return {"params": {"scale": weight, "bias": bias}, "batch_stats": {"mean": mean, "var": var}}


def _host_arrays(bn: BatchNorm) -> tuple[np.ndarray, ...]:
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("the layer has no running statistics (track_running_stats=False)")
    shape = tuple(bn.running_mean.shape)
    weight = np.ones(shape) if bn.weight is None else np.array(to_host(bn.weight), copy=True)
    bias = np.zeros(shape) if bn.bias is None else np.array(to_host(bn.bias), copy=True)
    mean = np.array(to_host(bn.running_mean), copy=True)
    var = np.array(to_host(bn.running_var), copy=True)
    return mean, var, weight, bias


def _build(
    mean: Any,
    var: Any,
    weight: Any,
    bias: Any,
    *,
    affine: bool,
    momentum: float,
    eps: float,
    axis: int | tuple[int, ...],
    xp: ModuleType | None,
    device: Any,
    dtype: Any,
) -> BatchNorm:
    shape = tuple(np.shape(mean))
    features: int | tuple[int, ...] = shape[0] if len(shape) == 1 else shape
    if isinstance(axis, list):
        axis = tuple(axis)
    bn = BatchNorm(
        features, axis=axis, eps=eps, momentum=momentum, affine=affine,
        var_estimator="biased", xp=xp, device=device, dtype=dtype,
    )  # fmt: skip
    state: dict[str, Any] = {"running_mean": mean, "running_var": var}
    if affine:
        state["weight"] = np.ones(shape) if weight is None else weight
        state["bias"] = np.zeros(shape) if bias is None else bias
    bn.load_state_dict(state, strict=False)
    return bn


class _ConverterModule(ModuleType):
    """This module, callable only to say which function converts a PyTorch model."""

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise TypeError(
            "anybn.convert is the Keras and Flax weight converter (anybn.convert.from_keras, "
            "to_keras, from_flax, to_flax), not a function: to replace the batch norms of a "
            "PyTorch model, call anybn.torch.convert(model)"
        )


sys.modules[__name__].__class__ = _ConverterModule
