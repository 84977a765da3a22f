"""PyTorch's module rule, once: which statistics a call uses, and the running update's factor.

``torch.nn.BatchNorm*d`` (``_BatchNorm.forward``) decides per call:

* a training call normalises with the batch statistics; an eval call with the running
  ones, or with the batch's where the module keeps none (``track_running_stats=False``);
* a training call with running statistics updates them and counts the batch, with the
  factor ``momentum``, or ``1 / num_batches_tracked`` (this batch counted) for
  ``momentum=None``: the cumulative average over every batch seen.

:class:`anybn.BatchNorm` and the ``anybn.torch`` modules both follow it through these
functions.
"""

from __future__ import annotations

__all__ = ["COUNTER", "COUNTER_MAX", "running_factor", "uses_batch_stats"]

#: The state-dict key of the batch counter.
COUNTER = "num_batches_tracked"

#: ``num_batches_tracked`` is stored as int64, as torch stores it.
COUNTER_MAX = 2**63 - 1


def uses_batch_stats(training: bool, has_running_stats: bool) -> bool:
    """Whether a call normalises with the batch statistics: in training, or in eval
    without running statistics."""
    return training or not has_running_stats


def running_factor(momentum: float | None, batches: float) -> float:
    """The weight of a batch's statistics in the running update.

    Parameters
    ----------
    momentum : float or None
        The module's momentum; None for the cumulative average.
    batches : float
        The number of training batches seen, this one included.

    Returns
    -------
    float
        ``momentum``, or ``1 / batches`` where it is None.

    Examples
    --------
    >>> running_factor(0.1, 5), running_factor(None, 4)
    (0.1, 0.25)
    """
    return 1.0 / batches if momentum is None else momentum
