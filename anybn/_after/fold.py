"""Fold an eval-mode batch norm into the linear or convolution layer before it.

A batch norm in eval mode is an affine map per channel, so it can be merged into the
layer that produces its input. With ``s = bn_weight / sqrt(running_var + eps)``
per output channel ``c``::

    weight'[c] = weight[c] * s[c]
    bias'[c]   = (bias[c] - running_mean[c]) * s[c] + bn_bias[c]

Each value is computed in float64 where the library has it (float32 elsewhere)
and rounded once to the layer's dtype.
"""

from __future__ import annotations

import numbers
from types import ModuleType
from typing import Any, NamedTuple

from .._checks import check_bool, check_eps
from .._typing import AnyArray
from .._xp import Array, check_floating, normalize_axis, resolve_namespace
from .wide import wide_dtype

__all__ = ["FoldedWeights", "fold", "output_channels"]


class FoldedWeights(NamedTuple):
    """What :func:`anybn.fold` returns: the folded weight and bias of the layer.

    Attributes
    ----------
    weight : array
        The layer's weight with the batch norm's scale folded in: weight's shape and dtype.
    bias : array
        The folded bias, shape ``(C,)``: the bias's dtype, or the weight's where the
        layer had no bias.

    Examples
    --------
    >>> import numpy as np
    >>> import anybn
    >>> folded = anybn.fold(np.ones((2, 3)), None, np.zeros(2), np.full(2, 4.0), eps=1e-12)
    >>> folded.weight
    array([[0.5, 0.5, 0.5],
           [0.5, 0.5, 0.5]])
    >>> folded.bias
    array([0., 0.])
    """

    weight: Array
    bias: Array


def _check_groups(groups: object) -> int:
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral):
        raise TypeError(f"groups must be a positive int, got {type(groups).__name__}")
    if groups < 1:
        raise ValueError(f"groups must be a positive int, got {groups}")
    return int(groups)


def output_channels(
    shape: tuple[int, ...], *, axis: int | None, transposed: bool, groups: int
) -> tuple[int, int | None]:
    """``(C, axis)``: the number of output channels of a weight of ``shape`` and the axis
    that holds them (None for a grouped transposed weight, whose groups span two axes).

    Raises ValueError for a weight of fewer than 2 dimensions, an axis out of range, or a
    channel count that ``groups`` does not divide.
    """
    if len(shape) < 2:
        raise ValueError(
            "weight must have at least 2 dimensions (a linear layer's (out, in), a "
            f"convolution's (out, in / groups, *kernel)), got shape {shape}"
        )
    if transposed:
        if axis is not None:
            raise ValueError(
                "axis and transposed=True cannot be combined: transposed=True means "
                "PyTorch's layout (in, out / groups, *kernel); for a channels-last "
                "transposed kernel without groups (Keras: (*kernel, out, in)) pass axis=-2 "
                "alone"
            )
        if shape[0] % groups:
            raise ValueError(
                f"a transposed weight of shape {shape} has {shape[0]} input channels, "
                f"which groups={groups} does not divide"
            )
        return shape[1] * groups, (1 if groups == 1 else None)
    out_axis = normalize_axis(0 if axis is None else axis, len(shape))
    channels = shape[out_axis]
    if channels % groups:
        raise ValueError(
            f"weight of shape {shape} has {channels} output channels on axis {out_axis}, "
            f"which groups={groups} does not divide"
        )
    return channels, out_axis


def fold(
    weight: AnyArray,
    bias: AnyArray | None,
    running_mean: AnyArray | None,
    running_var: AnyArray | None,
    bn_weight: AnyArray | None = None,
    bn_bias: AnyArray | None = None,
    *,
    eps: float = 1e-5,
    axis: int | None = None,
    transposed: bool = False,
    groups: int = 1,
    xp: ModuleType | None = None,
) -> FoldedWeights:
    r"""Fold an eval-mode batch norm into the weight and bias of the layer before it.

    For a linear or convolution layer ``z = conv(x, weight) + bias`` followed by a
    batch norm in eval mode, ``bn(z) = (z - running_mean) * s + bn_bias`` with
    ``s = bn_weight / sqrt(running_var + eps)`` per output channel, so that
    ``bn(conv(x, weight) + bias) == conv(x, weight') + bias'`` with::

        weight'[c] = weight[c] * s[c]                          (every value of channel c)
        bias'[c]   = (bias[c] - running_mean[c]) * s[c] + bn_bias[c]

    Computed in float64 where the library has it (float32 for JAX without
    ``jax_enable_x64``, and on MPS) and rounded once to the layer's dtypes. A pure
    function: nothing is modified, and the results are differentiable where the
    library differentiates (torch autograd, JAX).

    Parameters
    ----------
    weight : array
        The layer's weight. In PyTorch's layout (the default): a linear layer's
        ``(out, in)``, a 1-D/2-D/3-D convolution's ``(out, in / groups, *kernel)``
        (depthwise: ``(out, 1, *kernel)``), or with ``transposed=True`` a
        transposed convolution's ``(in, out / groups, *kernel)``.
    bias : array or None
        The layer's bias, shape ``(C,)``; None for a layer without one.
    running_mean, running_var : array
        The batch norm's running statistics, shape ``(C,)``. Required: a batch norm
        without them normalizes with the statistics of each batch and cannot be folded.
    bn_weight, bn_bias : array or None, optional
        The batch norm's affine parameters, shape ``(C,)``; None means 1 and 0
        (``affine=False``).
    eps : float, optional
        The batch norm's ``eps``, added to ``running_var``; > 0.
    axis : int, optional
        The weight's output-channel axis, for other layouts: -1 for Keras and Flax
        ``Dense`` and ``Conv`` kernels (``(in, out)``, ``(*kernel, in / groups, out)``),
        -2 for a Keras ``Conv*DTranspose`` kernel (``(*kernel, out, in)``). Default 0
        (PyTorch's linear and convolution layers).
    transposed : bool, optional
        The weight is a PyTorch transposed convolution's, ``(in, out / groups, *kernel)``:
        output channel ``g * (out / groups) + j`` is ``weight[g * (in / groups) + i, j]``
        for every ``i``. Not combinable with ``axis``.
    groups : int, optional
        The layer's ``groups``; it changes the layout of a transposed weight only.
    xp : module, optional
        The array namespace; resolved from ``weight`` when omitted.

    Returns
    -------
    FoldedWeights
        ``(weight, bias)``: new arrays in weight's library and on its device; the
        weight in its dtype, the bias in bias's dtype (weight's where ``bias`` is None).

    Raises
    ------
    TypeError
        Arrays that are not arrays, of different libraries, of a non-floating dtype.
    ValueError
        Missing running statistics, per-channel arrays whose shape is not ``(C,)`` for
        the weight's ``C`` output channels, ``eps <= 0``, ``groups`` that does not
        divide the channels, an ``axis`` out of range, arrays on different devices.

    Examples
    --------
    A linear layer followed by a batch norm, folded into one linear layer:

    >>> import numpy as np
    >>> import anybn
    >>> rng = np.random.default_rng(0)
    >>> w, b = rng.normal(size=(3, 4)), rng.normal(size=3)
    >>> rm, rv = rng.normal(size=3), rng.uniform(0.5, 2.0, 3)
    >>> gamma, beta = rng.normal(size=3), rng.normal(size=3)
    >>> folded = anybn.fold(w, b, rm, rv, gamma, beta, eps=1e-5)
    >>> x = rng.normal(size=(5, 4))
    >>> z = x @ w.T + b
    >>> y = anybn.batch_norm(z, rm, rv, gamma, beta, eps=1e-5).y
    >>> bool(np.allclose(x @ folded.weight.T + folded.bias, y))
    True
    """
    vectors = {
        "bias": bias, "running_mean": running_mean, "running_var": running_var,
        "bn_weight": bn_weight, "bn_bias": bn_bias,
    }  # fmt: skip
    xp = resolve_namespace(weight, vectors, x_name="weight", xp=xp)
    for name, value in (("running_mean", running_mean), ("running_var", running_var)):
        if value is None:
            raise ValueError(
                f"{name} is None: fold needs the batch norm's running statistics (a batch "
                "norm with track_running_stats=False normalizes with each batch's own "
                "statistics, which no fixed weight can reproduce)"
            )
    check_floating(xp, weight, "weight")
    eps = check_eps(eps)
    groups = _check_groups(groups)
    transposed = check_bool(transposed, "transposed")
    shape = tuple(int(s) for s in weight.shape)
    channels, out_axis = output_channels(shape, axis=axis, transposed=transposed, groups=groups)
    for name, value in vectors.items():
        if value is None:
            continue
        check_floating(xp, value, name)
        if tuple(value.shape) != (channels,):
            where = "transposed, " if transposed else f"axis {out_axis}, "
            raise ValueError(
                f"{name} must have shape ({channels},) to match the {channels} output "
                f"channels of weight (shape {shape}, {where}groups={groups}), got shape "
                f"{tuple(value.shape)}; is the batch norm the one that follows this layer?"
            )

    wide: Any = wide_dtype(xp, weight)

    def widened(a: Array) -> Array:
        return xp.astype(a, wide)

    rm, rv = widened(running_mean), widened(running_var)
    scale = 1.0 / xp.sqrt(rv + eps)
    if bn_weight is not None:
        scale = widened(bn_weight) * scale
    shifted = -rm if bias is None else widened(bias) - rm
    new_bias = shifted * scale
    if bn_bias is not None:
        new_bias = new_bias + widened(bn_bias)

    w = widened(weight)
    if out_axis is None:  # grouped transposed: (in, out / groups, *k) as (g, in / g, out / g, *k)
        per_group = (groups, shape[0] // groups, shape[1], *shape[2:])
        factor = xp.reshape(scale, (groups, 1, shape[1]) + (1,) * (len(shape) - 2))
        new_weight = xp.reshape(xp.reshape(w, per_group) * factor, shape)
    else:
        along = tuple(channels if i == out_axis else 1 for i in range(len(shape)))
        new_weight = w * xp.reshape(scale, along)
    return FoldedWeights(
        xp.astype(new_weight, weight.dtype),
        xp.astype(new_bias, weight.dtype if bias is None else bias.dtype),
    )
