"""``anybn.torch.recalibrate``: the running statistics of a model's batch norms, recomputed.

The counterpart of ``torch.optim.swa_utils.update_bn`` (same batches, same training-mode
forward), with the exact population statistics as an option, ``comm=`` to merge the
statistics of every rank, and the model left exactly as it was where anything raises.
The accumulators and the merge over ranks are :mod:`anybn._after.recalibrate`'s, shared
with :func:`anybn.recalibrate`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from typing import Any

import array_api_compat as compat
import torch
from torch import Tensor, nn

from .._after.recalibrate import (
    Accumulator,
    batch_moments,
    check_method,
    check_values_per_channel,
    run_batches,
)
from ..distributed.comm import as_communicator
from .function import batch_norm

__all__ = ["recalibrate"]


def _recording_forward(module: nn.modules.batchnorm._BatchNorm, accumulator: Accumulator) -> Any:
    """The forward a batch norm runs during a recalibration: the module's input checks,
    normalization with the batch's statistics (as in training), and their record."""

    def forward(input: Tensor) -> Tensor:
        if type(module)._check_input_dim is not nn.modules.batchnorm._NormBase._check_input_dim:
            module._check_input_dim(input)
        elif input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        running_mean, running_var = module.running_mean, module.running_var
        assert running_mean is not None and running_var is not None
        if input.numel() == 0:  # an empty batch: an empty output, nothing recorded
            return batch_norm(input, running_mean, running_var, module.weight, module.bias,
                              False, 0.0, module.eps)  # fmt: skip
        if input.shape[1] != running_mean.numel():
            raise ValueError(
                f"{type(module).__name__} has {running_mean.numel()} channels, got input of "
                f"shape {tuple(input.shape)} ({input.shape[1]} channels on dimension 1)"
            )
        x = input.detach()
        count, mean, m2 = batch_moments(compat.array_namespace(x), x, 1)
        check_values_per_channel(count, tuple(input.shape))
        accumulator.add(count, mean, m2)
        stats = torch.float32 if input.dtype in (torch.float16, torch.bfloat16) else input.dtype
        return batch_norm(
            input, mean.to(stats), (m2 / count).to(stats), module.weight, module.bias,
            False, 0.0, module.eps,
        )  # fmt: skip

    return forward


def _default_forward(device: Any) -> Callable[[nn.Module, Any], object]:
    """``update_bn``'s rule: the first element of a list or tuple, moved to ``device``."""

    def forward(model: nn.Module, batch: Any) -> object:
        if isinstance(batch, (list, tuple)):
            batch = batch[0]
        if device is not None:
            batch = batch.to(device)
        return model(batch)

    return forward


def _unwrapped(model: nn.Module) -> nn.Module:
    """The module inside DistributedDataParallel or DataParallel (their training-mode forward
    would synchronize buffers on every batch, and wait for ranks that have none), or inside
    ``torch.compile``'s wrapper (its compiled code would not call the recording forwards)."""
    while True:
        inner = None
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            inner = model.module
        elif type(model).__name__ == "OptimizedModule":
            inner = getattr(model, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


def recalibrate(
    model: nn.Module,
    batches: Iterable[Any],
    /,
    *,
    method: str = "exact",
    comm: object = None,
    device: Any = None,
    forward: Callable[[nn.Module, Any], object] | None = None,
) -> None:
    r"""Recompute the running statistics of every batch norm of ``model`` from data.

    The model runs on every batch in training mode, as in
    ``torch.optim.swa_utils.update_bn``: each batch norm normalizes with the batch's
    own statistics, and records them; no gradient is recorded. Then every batch norm
    with running statistics (``nn.BatchNorm1d/2d/3d``, ``nn.SyncBatchNorm``, the
    :mod:`anybn.torch` modules) gets its ``running_mean``, ``running_var`` and
    ``num_batches_tracked`` (the number of batches it saw), from one of the methods below.
    Frozen batch norms (:class:`anybn.torch.FrozenBatchNorm2d`, torchvision's) keep their
    statistics, and batch norms without running statistics compute as always.

    ``method="exact"`` (the default)
        the population statistics of every value the batch norm saw: its mean, and
        ``M2 / (n - 1)`` (the unbiased variance PyTorch stores), per batch by the
        corrected two-pass algorithm, merged by Chan's update in float64: the same for
        any split of the same values into batches, and any order, up to rounding.
    ``method="cumulative"``
        the average over batches of each batch's mean and unbiased variance:
        ``update_bn``'s result on the same batches (PyTorch's ``momentum=None`` rule).

    Unlike ``update_bn``, nothing of the model changes until every batch has gone
    through: an exception leaves the statistics, ``momentum`` and every module's
    train/eval flag as they were, and afterwards each module has its own flag back.
    A batch norm that saw no batch keeps its statistics (with a warning), where
    ``update_bn`` leaves it reset to 0 and 1; empty batches are not counted.

    Parameters
    ----------
    model : torch.nn.Module
        The model. A ``DistributedDataParallel`` or ``DataParallel`` wrapper is
        unwrapped (its training-mode forward would synchronize buffers on every batch),
        and so is ``torch.compile``'s (the model runs eagerly).
    batches : iterable
        The batches, as ``update_bn`` takes them: tensors, or lists/tuples whose first
        element is the input (a ``DataLoader``).
    method : {"exact", "cumulative"}, optional
        See above.
    comm : optional
        Merge the statistics of every rank (a ``torch.distributed`` ProcessGroup,
        ``"torch"``, an mpi4py communicator, ``"mpi"`` or an
        :class:`anybn.distributed.Communicator`): every rank calls ``recalibrate`` with
        the same model and its own batches (any number, none included) and ends with
        the statistics one process would compute from every rank's batches, each
        count-weighted. One header of ints and one collective of every batch norm's
        statistics, after the last batch. None: this process's batches only.
    device : torch.device, optional
        Move each input there first (as ``update_bn``'s ``device``).
    forward : callable, optional
        ``forward(model, batch)`` runs the model on one batch, for batches of another
        form (dictionaries, several inputs); replaces the rule above and ``device``.

    Raises
    ------
    TypeError
        ``model`` not a module, ``batches`` not iterable.
    ValueError
        A bad ``method``; a model without a batch norm with running statistics, or with a
        lazy one that has not seen an input; a batch with one value per channel (as in
        training). With ``comm``: different models on different ranks; an error on one
        rank makes every rank raise, and no rank changes anything.

    Examples
    --------
    >>> import torch
    >>> from torch import nn
    >>> import anybn.torch
    >>> model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)).eval()
    >>> data = torch.randn(600, 3) * 2 + 5
    >>> anybn.torch.recalibrate(model, data.split(64))
    >>> with torch.no_grad():
    ...     z = model[0](data)
    >>> torch.allclose(model[1].running_mean, z.mean(0), atol=1e-5)
    True
    >>> torch.allclose(model[1].running_var, z.var(0), atol=1e-5)
    True
    >>> int(model[1].num_batches_tracked), model.training
    (10, False)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    method = check_method(method)
    if comm is not None:
        as_communicator(comm)  # a bad comm raises before any batch
    if forward is not None and not callable(forward):
        raise TypeError(f"forward must be callable, got {type(forward).__name__}")
    model = _unwrapped(model)
    norms = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm)
        and m.running_mean is not None
        and m.running_var is not None
    ]
    lazy = [name for name, m in norms if any(nn.parameter.is_lazy(t) for t in m.buffers())]
    if lazy:
        raise ValueError(
            f"model has lazy batch norms that have not seen an input yet ({', '.join(lazy)}): "
            "their number of channels is unknown; run the model on one batch first"
        )
    if not norms:
        raise ValueError(
            "model has no batch norm with running statistics (nn.BatchNorm*d with "
            "track_running_stats=True, SyncBatchNorm, the anybn.torch modules): nothing "
            "to recalibrate"
        )
    accumulators = [Accumulator(method, m.running_mean) for _, m in norms]
    step = _default_forward(device) if forward is None else forward
    modes = {m: m.training for m in model.modules()}
    installed = [(m, m.__dict__.get("forward")) for _, m in norms]
    try:
        for (_, m), accumulator in zip(norms, accumulators, strict=True):
            m.forward = _recording_forward(m, accumulator)  # type: ignore[method-assign]
        model.train()
        with torch.no_grad():
            run_batches(batches, lambda batch: step(model, batch), accumulators, comm)
    finally:
        for m, previous in installed:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.__dict__["forward"] = previous
        for module, training in modes.items():
            module.training = training
    unseen = []
    with torch.no_grad():
        for (name, m), accumulator in zip(norms, accumulators, strict=True):
            result = accumulator.result()
            if result is None:
                unseen.append(name)
                continue
            mean, var = result
            for buffer, value in ((m.running_mean, mean), (m.running_var, var)):
                assert buffer is not None
                buffer.copy_(value.to(buffer.dtype).view_as(buffer))
            if m.num_batches_tracked is not None:
                m.num_batches_tracked.fill_(accumulator.batches)
    if unseen:
        warnings.warn(
            f"anybn.torch.recalibrate: {len(unseen)} batch norm(s) saw no batch and keep "
            f"their statistics: {', '.join(unseen)}",
            UserWarning,
            stacklevel=2,
        )
