"""Batch renormalization and ghost batches on the ``anybn.torch`` modules.

The modules' keyword options ``renorm``, ``renorm_clipping``, ``renorm_momentum`` and
``virtual_batch_size`` (see :class:`anybn.BatchNorm`): a training forward with either
goes through :func:`anybn.batch_norm` (whose composition of the plain forward autograd
differentiates, ``r`` and ``d`` as constants), and the module's buffers are updated in
place afterwards, as PyTorch's modules update theirs. Eval, and modules without these
options, keep the modules' own path.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .._api import batch_norm as core_batch_norm
from .._checks import check_bool
from .._variants import check_clipping, check_renorm_momentum, check_virtual_batch_size
from .function import module_arguments

__all__ = ["init_variants", "variant_forward"]

def init_variants(
    module: nn.modules.batchnorm._BatchNorm,
    renorm: object,
    renorm_clipping: Mapping[str, float] | None,
    renorm_momentum: float,
    virtual_batch_size: int | None,
) -> None:
    """Check the options and keep them on ``module``; register the renorm buffers."""
    m: Any = module  # (attributes of its own, which nn.Module's typing does not know)
    m.renorm = check_bool(renorm, "renorm")
    m.virtual_batch_size = check_virtual_batch_size(virtual_batch_size)
    m.renorm_clipping = renorm_clipping
    m.renorm_momentum = renorm_momentum
    if not m.renorm:
        return
    check_clipping(renorm_clipping)
    check_renorm_momentum(renorm_momentum)
    running_var: Any = module.running_var
    if running_var is None:
        raise ValueError(
            "renorm=True needs running statistics (the corrections are taken against them): "
            "pass track_running_stats=True"
        )
    module.register_buffer("running_std", torch.ones_like(running_var))
    module.register_buffer("renorm_mean", torch.zeros_like(running_var))
    module.register_buffer("renorm_std", torch.ones_like(running_var))


def variant_forward(
    module: nn.modules.batchnorm._BatchNorm,
    input: Tensor,
    comm: Any = None,
    *,
    mask: Tensor | None = None,
) -> Tensor | None:
    """The training forward with renorm or ghost batches, or None (the module's own path).

    ``mask``: as the modules' ``forward`` takes it (see :func:`anybn.batch_norm`).
    """
    m: Any = module
    renorm = getattr(module, "renorm", False)
    k = getattr(module, "virtual_batch_size", None)
    if not renorm and k is None:
        return None
    running_mean, running_var, use_batch_stats, factor, tracked = module_arguments(module)
    if not use_batch_stats:
        return None
    options: dict[str, Any] = {"virtual_batch_size": k}
    if renorm:
        options.update(
            renorm=True, renorm_clipping=m.renorm_clipping,
            renorm_momentum=m.renorm_momentum, renorm_mean=m.renorm_mean,
            renorm_std=m.renorm_std, running_std=m.running_std,
        )  # fmt: skip
    if comm is not None:
        options.update(comm=comm, timeout=getattr(module, "timeout", None))
    out: Any = core_batch_norm(
        input, running_mean, running_var, module.weight, module.bias,
        training=True, momentum=factor, eps=module.eps, mask=mask, **options,
    )  # fmt: skip
    with torch.no_grad():
        if running_mean is not None and running_var is not None:
            running_mean.copy_(out.new_running_mean)
            running_var.copy_(out.new_running_var)
        if renorm:
            m.running_std.copy_(out.new_running_std)
            m.renorm_mean.copy_(out.new_renorm_mean)
            m.renorm_std.copy_(out.new_renorm_std)
    if tracked is not None:
        tracked.add_(1)
    y: Tensor = out.y
    return y
