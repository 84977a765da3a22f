"""``anybn.torch.SyncBatchNorm``: torch.nn.SyncBatchNorm computed by anybn, on CPU and GPU.

Same constructor as ``torch.nn.SyncBatchNorm`` (``process_group=``), same
parameters, buffers, state-dict keys, input checks and ``convert_sync_batchnorm``;
a subclass of ``torch.nn.modules.batchnorm._BatchNorm``, so code that looks for
batch norms by that base class (weight-decay groups, buffer handling) finds it.
It is deliberately *not* a subclass of ``torch.nn.SyncBatchNorm``:
DistributedDataParallel refuses every ``nn.SyncBatchNorm`` instance in a CPU
module ("SyncBatchNorm layers only work with GPU modules",
``DistributedDataParallel._passing_sync_batchnorm_handle`` in
torch/nn/parallel/distributed.py), which would defeat the CPU support.

In training with an initialized process group of more than one rank, it
normalizes with the statistics of the batch concatenated over the group, through
:mod:`anybn.distributed.sync`: CPU tensors over gloo, CUDA tensors over NCCL. In eval,
without a process group, or with a group of one rank, it is
:func:`anybn.torch.batch_norm`, local.

Per training step: the forward exchanges a header of 8 int64 per rank and
all-gathers ``3 * C`` statistics per rank (``4 * C`` with ``mask=``: the counted
values too); the backward all-reduces ``2 * C`` sums (``3 * C`` with a mask; the
global count is known from the forward, so no header). ``dweight``
and ``dbias`` are this rank's own sums, as in PyTorch: DistributedDataParallel
averages them over ranks.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .._call import resolve_timeout
from ..distributed import sync as _sync
from ..distributed.comm import TorchComm
from ..distributed.torch_autograd import SyncBatchNormFunction as _SyncBatchNormFunction
from .function import batch_norm, masked_forward, module_arguments
from .variants import init_variants, variant_forward

__all__ = ["SyncBatchNorm"]


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """``torch.nn.SyncBatchNorm`` computed by anybn: CPU (gloo) and CUDA (NCCL).

    Takes the arguments of ``torch.nn.SyncBatchNorm`` (``num_features, eps=1e-5,
    momentum=0.1, affine=True, track_running_stats=True, process_group=None,
    device=None, dtype=None, *, bias=True``) and behaves the same, except that
    CPU tensors are accepted (under DistributedDataParallel too: this class is
    not an ``nn.SyncBatchNorm`` subclass, which DDP rejects in CPU modules),
    statistics of float64 inputs are combined in float64, and the per-rank
    statistics are merged exactly (count-weighted Chan merge; a rank may hold
    an empty batch). A forward that raises leaves
    ``num_batches_tracked`` and the running statistics unchanged, and raises
    on every rank of the group. ``momentum`` may be any number, as in PyTorch.
    float16 and bfloat16 inputs are synchronized in float32 and ``dx`` is
    rounded once. Double backward, forward-mode AD and ``torch.func``
    transforms are not supported (as in PyTorch; refused on every rank).
    ``forward`` takes a ``mask=`` keyword (padding False), synchronized: every
    rank's counted values merge exactly, and a rank whose mask is all False
    contributes nothing.

    One keyword more than PyTorch's: ``timeout`` (seconds or a ``timedelta``; None,
    the default, is the process group's timeout) bounds each exchange of a
    synchronized forward and backward: a rank that does not make the call in
    time makes every rank raise :class:`anybn.distributed.CollectiveTimeout`,
    naming the ranks that did not answer. Then the keywords of batch renormalization,
    ``renorm``, ``renorm_clipping`` and ``renorm_momentum`` (synchronised: the
    statistics of the whole batch, then the corrections as on one process), and
    ``virtual_batch_size`` (ghost batches, local: refused with a ValueError when
    the forward would synchronise), as :class:`anybn.BatchNorm` takes them.

    Examples
    --------
    >>> import torch
    >>> import anybn.torch
    >>> bn = anybn.torch.SyncBatchNorm(3)
    >>> isinstance(bn, torch.nn.modules.batchnorm._BatchNorm)
    True
    >>> bn(torch.randn(4, 3, 5)).shape  # no process group: local batch norm
    torch.Size([4, 3, 5])
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: Any = None,
        *,
        bias: bool = True,
        timeout: Any = None,
        renorm: bool = False,
        renorm_clipping: Mapping[str, float] | None = None,
        renorm_momentum: float = 0.01,
        virtual_batch_size: int | None = None,
    ) -> None:
        # bias= only when False: torch before 2.10 has no such argument.
        no_bias = {} if bias else {"bias": False}
        super().__init__(
            num_features, eps, momentum, affine, track_running_stats,
            device=device, dtype=dtype, **no_bias,
        )  # fmt: skip
        self.process_group = process_group
        self.timeout = resolve_timeout(timeout)
        init_variants(self, renorm, renorm_clipping, renorm_momentum, virtual_batch_size)

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _sync_comm(self) -> TorchComm | None:
        """The communicator to synchronize over, or None for a local forward."""
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group else dist.group.WORLD
        if dist.get_world_size(group) <= 1:
            return None
        return TorchComm(group)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        """Normalize ``input`` (channels on dimension 1), synchronized over the group in training.

        Parameters
        ----------
        input : torch.Tensor
            This rank's shard, ``(N, C, ...)``; ``N`` may differ between ranks, even be 0.
        mask : torch.Tensor or None, optional
            Boolean, True where a value counts for the statistics (padding False):
            input's shape, a shape that broadcasts to it, or input's shape without
            the channel dimension (``(N, L)`` for ``(N, C, L)``). Every rank passes
            one or none; a rank whose mask is all False contributes nothing. The
            output is computed everywhere.

        Returns
        -------
        torch.Tensor
            The normalized shard, with input's shape and dtype.
        """
        comm = self._sync_comm() if self.training else None
        if comm is None:
            return self._forward(input, None, mask)
        # A rank whose input fails the checks below still tells the others.
        with _sync.failures_reported(comm, input, timeout=getattr(self, "timeout", None)):
            return self._forward(input, comm, mask)

    def _forward(self, input: Tensor, comm: TorchComm | None, mask: Tensor | None) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        if getattr(self, "renorm", False) or getattr(self, "virtual_batch_size", None):
            y = variant_forward(self, input, comm, mask=mask)
            if y is not None:
                return y
        if mask is not None:
            return masked_forward(self, input, mask, comm)
        running_mean, running_var, use_batch_stats, factor, tracked = module_arguments(self)
        if comm is None:
            y = batch_norm(
                input, running_mean, running_var, self.weight, self.bias,
                use_batch_stats, factor, self.eps,
            )  # fmt: skip
        else:
            _sync.check_autodiff(input, self.weight, self.bias, running_mean, running_var)
            y, _, _, new_mean, new_var = _SyncBatchNormFunction.apply(
                input, self.weight, self.bias, running_mean, running_var, factor, self.eps,
                1, comm, False, False, getattr(self, "timeout", None),
            )  # fmt: skip
            if new_mean is not None:
                assert running_mean is not None and running_var is not None
                with torch.no_grad():
                    running_mean.copy_(new_mean)
                    running_var.copy_(new_var)
        if tracked is not None:
            tracked.add_(1)
        return y

    @classmethod
    def convert_sync_batchnorm(cls, module: nn.Module, process_group: Any = None) -> nn.Module:
        """Replace every ``BatchNorm*D`` (and ``SyncBatchNorm``) in ``module`` by this class.

        As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``: the new modules
        take over the parameters and buffers of the old ones, their mode and
        ``qconfig``.

        Parameters
        ----------
        module : torch.nn.Module
            A model, or a single batch-norm module.
        process_group : torch.distributed.ProcessGroup, optional
            The group to synchronize over; the default (world) group by default.

        Returns
        -------
        torch.nn.Module
            ``module`` with its batch norms replaced, or the replacement of
            ``module`` if it is one.

        Examples
        --------
        >>> import torch
        >>> from torch import nn
        >>> import anybn.torch
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))
        >>> model = anybn.torch.SyncBatchNorm.convert_sync_batchnorm(model)
        >>> type(model[1])
        <class 'anybn.torch.SyncBatchNorm'>
        """
        converted = module
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            converted = cls(
                module.num_features,
                module.eps,
                module.momentum,
                module.affine,
                module.track_running_stats,
                process_group,
                device="meta",  # placeholders: every tensor is replaced below
                bias=not module.affine or module.bias is not None,
            )
            if module.affine:
                converted.weight, converted.bias = module.weight, module.bias
            for name in ("running_mean", "running_var", "num_batches_tracked"):
                setattr(converted, name, getattr(module, name))
            converted.train(module.training)
            if hasattr(module, "qconfig"):
                converted.qconfig = module.qconfig
        for name, child in module.named_children():
            converted.add_module(name, cls.convert_sync_batchnorm(child, process_group))
        return converted


SyncBatchNorm.__module__ = "anybn.torch"
