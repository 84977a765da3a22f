"""Frozen batch norms: fixed statistics and affine parameters, in training too.

:class:`anybn.torch.FrozenBatchNorm2d` has the semantics and state-dict keys of torchvision's
``torchvision.ops.misc.FrozenBatchNorm2d``: ``weight``, ``bias``, ``running_mean`` and
``running_var`` are buffers (no gradient reaches them, no optimizer sees them), the
forward is the eval-mode batch norm in training and in eval, and a state dict with a
``num_batches_tracked`` key (a ``BatchNorm2d`` checkpoint) loads without complaint.
:func:`anybn.torch.freeze` swaps every batch norm of a model for one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .function import batch_norm

__all__ = [
    "FrozenBatchNorm",
    "FrozenBatchNorm1d",
    "FrozenBatchNorm2d",
    "FrozenBatchNorm3d",
    "freeze",
]

_COUNTER = "num_batches_tracked"


class FrozenBatchNorm(nn.Module):
    r"""A batch norm whose statistics and affine parameters are fixed, for input of any rank >= 2.

    In training and in eval::

        y = (x - running_mean) / sqrt(running_var + eps) * weight + bias

    per channel (dimension 1), computed by :func:`anybn.torch.batch_norm` in eval mode:
    ``x - running_mean`` first, so that a large mean costs no digits, and half-precision
    input keeps its dtype. ``weight``, ``bias``, ``running_mean`` and ``running_var`` are
    buffers, as in torchvision's ``FrozenBatchNorm2d``: gradients flow to the input only.
    :class:`anybn.torch.FrozenBatchNorm1d`, :class:`anybn.torch.FrozenBatchNorm2d` and
    :class:`anybn.torch.FrozenBatchNorm3d` check the input's rank as ``nn.BatchNorm1d/2d/3d``
    do; this class takes any rank >= 2 (what :func:`anybn.torch.freeze` puts in place of a
    ``SyncBatchNorm``).

    Parameters
    ----------
    num_features : int
        The number of channels ``C``.
    eps : float, optional
        Added to ``running_var`` inside the square root; >= 0 (default 1e-5, as
        ``nn.BatchNorm2d`` and torchvision's).
    device, dtype : optional
        Where and in which dtype to create the buffers (default: PyTorch's defaults).

    Notes
    -----
    A state dict with a ``num_batches_tracked`` key loads: the key is dropped, as
    torchvision does (without modifying the dictionary passed in). ``state_dict()`` has
    the four keys above.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> bn = anybn.torch.FrozenBatchNorm(2, eps=0.0)
    >>> bn.running_mean.fill_(1.0), bn.running_var.fill_(4.0)
    (tensor([1., 1.]), tensor([4., 4.]))
    >>> bn(torch.tensor([[3.0, 5.0]]))
    tensor([[1., 2.]])
    """

    weight: Tensor
    bias: Tensor
    running_mean: Tensor
    running_var: Tensor

    #: The input ranks accepted (None: any rank >= 2), and their description in errors.
    _ranks: tuple[int, ...] | None = None
    _expected = "at least 2D"

    def __init__(
        self, num_features: int, eps: float = 1e-5, device: Any = None, dtype: Any = None
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features < 0:
            raise ValueError(f"num_features must be a non-negative int, got {num_features!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
            raise ValueError(f"eps must be a number >= 0, got {eps!r}")
        self.num_features = num_features
        self.eps = float(eps)
        factory = {"device": device, "dtype": dtype}
        self.register_buffer("weight", torch.ones(num_features, **factory))
        self.register_buffer("bias", torch.zeros(num_features, **factory))
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))

    def _check_input_dim(self, input: Tensor) -> None:
        ranks = self._ranks
        if input.dim() < 2 if ranks is None else input.dim() not in ranks:
            raise ValueError(f"expected {self._expected} input (got {input.dim()}D input)")

    def forward(self, input: Tensor) -> Tensor:
        """Normalize ``input`` (channels on dimension 1) with the fixed statistics."""
        self._check_input_dim(input)
        return batch_norm(
            input, self.running_mean, self.running_var, self.weight, self.bias,
            False, 0.0, self.eps,
        )  # fmt: skip

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        # A BatchNorm checkpoint's counter: dropped (torchvision's rule), from a copy.
        counter = prefix + _COUNTER
        if counter in state_dict:
            state_dict = {k: v for k, v in state_dict.items() if k != counter}
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.num_features}, eps={self.eps})"


class FrozenBatchNorm1d(FrozenBatchNorm):
    """:class:`anybn.torch.FrozenBatchNorm` for ``(N, C)`` or ``(N, C, L)`` input (``BatchNorm1d``).

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> anybn.torch.FrozenBatchNorm1d(3)(torch.zeros(4, 3, 5)).shape
    torch.Size([4, 3, 5])
    >>> anybn.torch.FrozenBatchNorm1d(3)(torch.zeros(1, 4, 3, 5))
    Traceback (most recent call last):
        ...
    ValueError: expected 2D or 3D input (got 4D input)
    """

    _ranks = (2, 3)
    _expected = "2D or 3D"


class FrozenBatchNorm2d(FrozenBatchNorm):
    """:class:`anybn.torch.FrozenBatchNorm` for ``(N, C, H, W)`` input: torchvision's module.

    The same constructor (``num_features, eps=1e-5``; plus ``device`` and ``dtype``),
    buffers, state-dict keys and ``repr``, and the same output up to rounding (closer to
    the exact value where the running mean is large compared with the spread).

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> bn = anybn.torch.FrozenBatchNorm2d(3)
    >>> sorted(bn.state_dict())
    ['bias', 'running_mean', 'running_var', 'weight']
    >>> bn.load_state_dict(torch.nn.BatchNorm2d(3).state_dict())  # the counter is dropped
    <All keys matched successfully>
    >>> x = torch.randn(2, 3, 4, 4, requires_grad=True)
    >>> bn(x).sum().backward()
    >>> x.grad.shape, list(bn.parameters())
    (torch.Size([2, 3, 4, 4]), [])
    """

    _ranks = (4,)
    _expected = "4D"


class FrozenBatchNorm3d(FrozenBatchNorm):
    """:class:`anybn.torch.FrozenBatchNorm` for ``(N, C, D, H, W)`` input, as ``nn.BatchNorm3d``.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> anybn.torch.FrozenBatchNorm3d(2)(torch.ones(1, 2, 3, 3, 3)).shape
    torch.Size([1, 2, 3, 3, 3])
    """

    _ranks = (5,)
    _expected = "5D"


for _cls in (FrozenBatchNorm, FrozenBatchNorm1d, FrozenBatchNorm2d, FrozenBatchNorm3d):
    _cls.__module__ = "anybn.torch"


def _frozen_class(module: nn.Module) -> type[FrozenBatchNorm]:
    """The frozen class for a batch norm: by its input rank, any rank for a sync one."""
    for base, frozen in (
        (nn.BatchNorm1d, FrozenBatchNorm1d),
        (nn.BatchNorm2d, FrozenBatchNorm2d),
        (nn.BatchNorm3d, FrozenBatchNorm3d),
    ):
        if isinstance(module, base):
            return frozen
    return FrozenBatchNorm  # nn.SyncBatchNorm, anybn.torch.SyncBatchNorm: any rank >= 2


def _check_freezable(name: str, module: nn.modules.batchnorm._BatchNorm) -> None:
    label = f"{type(module).__name__} {name!r}" if name else type(module).__name__
    if module.running_mean is None or module.running_var is None:
        raise ValueError(
            f"{label} has no running statistics (track_running_stats=False): it normalizes "
            "with each batch's own statistics, so there is nothing to freeze; nothing was "
            "replaced. Recalibrate it first (anybn.torch.recalibrate) with "
            "track_running_stats=True, or leave it out of the model passed to freeze"
        )
    if any(nn.parameter.is_lazy(t) for t in module._buffers.values() if t is not None):
        raise ValueError(
            f"{label} is a lazy batch norm that has not seen an input yet: its number of "
            "channels is unknown; run the model once before freezing it. Nothing was replaced"
        )


def _frozen(module: nn.modules.batchnorm._BatchNorm) -> FrozenBatchNorm:
    """The frozen copy of one batch norm: its statistics, parameters, eps, mode and hooks."""
    rm, rv = module.running_mean, module.running_var
    assert rm is not None and rv is not None
    frozen = _frozen_class(module)(rm.numel(), eps=module.eps, device=rm.device, dtype=rm.dtype)
    with torch.no_grad():
        for name, value in (
            ("running_mean", rm), ("running_var", rv),
            ("weight", module.weight), ("bias", module.bias),
        ):  # fmt: skip
            buffer = frozen._buffers[name]
            if value is not None and buffer is not None:
                frozen._buffers[name] = value.detach().clone().to(dtype=buffer.dtype).reshape(-1)
    frozen.train(module.training)
    for key, value in module.__dict__.items():  # hooks, shared as convert shares them
        if "hook" in key and key in frozen.__dict__:
            frozen.__dict__[key] = value
    return frozen


def freeze(model: nn.Module) -> nn.Module:
    """Replace every batch norm of ``model`` by a frozen one with its values.

    Every ``torch.nn.modules.batchnorm._BatchNorm`` (``nn.BatchNorm1d/2d/3d``, their
    subclasses, ``nn.SyncBatchNorm``, the :mod:`anybn.torch` drop-ins) becomes a
    :class:`anybn.torch.FrozenBatchNorm1d`, :class:`anybn.torch.FrozenBatchNorm2d` or
    :class:`anybn.torch.FrozenBatchNorm3d` (a ``SyncBatchNorm``: a
    :class:`anybn.torch.FrozenBatchNorm`, any rank), with copies of its running statistics,
    weight and bias (ones and zeros where ``affine=False``), its
    ``eps``, train/eval flag and hooks, in place. Its output is then the batch norm's
    eval output, in training mode too, and only the input gets gradients (as in
    detectron2's ``FrozenBatchNorm2d.convert_frozen_batchnorm``, with the batch norm's
    own ``eps`` kept).

    Parameters
    ----------
    model : torch.nn.Module
        A model, or a single batch norm.

    Returns
    -------
    torch.nn.Module
        ``model``, its batch norms replaced; or the replacement if ``model`` is one.

    Raises
    ------
    TypeError
        ``model`` is not a ``torch.nn.Module``.
    ValueError
        A batch norm without running statistics (``track_running_stats=False``) or a
        lazy one that has not seen an input. Every batch norm is checked before any is
        replaced: on error the model is as it was.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import anybn.torch
    >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU())
    >>> model = anybn.torch.freeze(model)
    >>> model[1]
    FrozenBatchNorm2d(8, eps=1e-05)
    >>> before = model[1].running_mean.clone()
    >>> _ = model.train()(torch.randn(4, 3, 6, 6))  # training mode: nothing changes
    >>> torch.equal(model[1].running_mean, before)
    True
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
    ]
    for name, m in found:
        _check_freezable(name, m)  # every check before any replacement
    if isinstance(model, nn.modules.batchnorm._BatchNorm):
        return _frozen(model)
    replaced = {id(m): _frozen(m) for _, m in found}  # a shared batch norm stays shared
    for parent in list(model.modules()):
        for child_name, child in list(parent._modules.items()):
            if child is not None and id(child) in replaced:
                parent._modules[child_name] = replaced[id(child)]
    return model
