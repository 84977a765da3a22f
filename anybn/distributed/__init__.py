"""Synchronized batch norm across processes: the communicators.

Pass ``comm=`` to :func:`anybn.batch_norm`, :func:`anybn.batch_norm_backward`
or :class:`anybn.BatchNorm` to normalize with the statistics of the batch
concatenated over every rank of a group, exactly (an all-gather of each rank's
per-channel count, mean and M2, merged by the Chan formula), and to all-reduce
the two per-channel sums of the backward. ``comm`` may be

- a ``torch.distributed`` ProcessGroup, or ``"torch"`` for the default group
  (CPU tensors over gloo, CUDA tensors over NCCL);
- an mpi4py communicator, or ``"mpi"`` for ``MPI.COMM_WORLD`` (NumPy arrays
  directly; CuPy and other arrays staged through host memory);
- a :class:`Communicator` (subclass it to bring another engine).

Every synchronized call takes ``timeout=``: a rank that does not make the call in
time makes every rank raise :class:`CollectiveTimeout`, naming the collective and
the ranks that did not answer (``anybn.distributed.deadline``).

For PyTorch models use :class:`anybn.torch.SyncBatchNorm`. Neither torch nor
mpi4py is imported by ``import anybn``; this module imports them only when a
communicator of that engine is created. See the guide "Data-parallel training".

Examples
--------
>>> import numpy as np
>>> import anybn
>>> from anybn.distributed import MPIComm  # doctest: +SKIP
>>> out = anybn.batch_norm(x_shard, rm, rv, training=True, comm="mpi")  # doctest: +SKIP
"""

from __future__ import annotations

from .comm import Communicator, MPIComm, TorchComm, as_communicator
from .deadline import CollectiveTimeout

__all__ = [
    "CollectiveTimeout",
    "Communicator",
    "MPIComm",
    "TorchComm",
    "as_communicator",
]
