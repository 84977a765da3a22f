"""Communicators: the two collectives synchronized batch norm needs, over existing engines.

anybn writes no networking of its own. A :class:`Communicator` wraps what the
user already runs and offers exactly what :mod:`anybn.distributed.sync` needs:

``all_gather(a)``
    every rank's 1-D array ``a`` (same length everywhere), stacked ``(size, len)``;
``all_reduce(a)``
    the elementwise sum of every rank's ``a``;
``all_gather_ints(values)``
    every rank's short list of ints (the metadata header), on the host.

Each takes ``timeout=`` (seconds, or None for the engine's default): a rank that
does not answer in time makes every rank raise :class:`CollectiveTimeout`. The
header is where a rank that never calls is found, so over both engines it is not
a collective but the coordinated exchange of ``anybn.distributed.deadline``,
which names the ranks that did not answer, tells a late rank when it comes, and
leaves the group usable.

:class:`TorchComm` wraps a ``torch.distributed`` process group (the default group
when none is given): CPU tensors over gloo, CUDA tensors over NCCL. :class:`MPIComm`
wraps an mpi4py communicator: NumPy buffers directly, other arrays staged through
host memory. :func:`as_communicator` accepts either engine's own object. Neither
torch nor mpi4py is imported before a communicator of that engine is made.
"""

from __future__ import annotations

import datetime
import sys
import time
from typing import Any

import array_api_compat as compat
import numpy as np

from .._xp import Array
from .deadline import (
    DEFAULT_TIMEOUT,
    CollectiveTimeout,
    Deadlines,
    mpi_deadlines,
    poll,
    torch_deadlines,
    torch_default_timeout,
)

__all__ = [
    "CollectiveTimeout",
    "Communicator",
    "MPIComm",
    "TorchComm",
    "as_communicator",
]


class Communicator:
    """The collectives of one group of processes (the interface; see the subclasses).

    Subclass it to bring another engine: define ``rank``, ``size`` and the three
    collectives below. Every rank must call them in the same order. A ``timeout=``
    keyword is passed to them only when the caller gave one; an engine that honours
    it raises :class:`CollectiveTimeout` when a rank does not answer in time.

    Examples
    --------
    A group of one process, where every collective is the identity:

    >>> import numpy as np
    >>> import anybn
    >>> from anybn.distributed import Communicator
    >>> class Alone(Communicator):
    ...     rank, size = 0, 1
    ...     def all_gather(self, a):
    ...         return a[None, :]
    ...     def all_reduce(self, a):
    ...         return a
    ...     def all_gather_ints(self, values, like=None, timeout=None):
    ...         return [list(values)]
    >>> anybn.batch_norm(np.array([[1.0], [3.0]]), training=True, comm=Alone()).mean
    array([2.])
    """

    #: A short name of the engine, for error messages and the docs.
    engine = "abstract"

    @property
    def rank(self) -> int:
        """This process's rank in the group."""
        raise NotImplementedError

    @property
    def size(self) -> int:
        """The number of processes in the group."""
        raise NotImplementedError

    def all_gather(self, a: Array, timeout: float | None = None) -> Array:
        """Every rank's 1-D ``a``, stacked to shape ``(size, len(a))``, in a's library."""
        raise NotImplementedError

    def all_reduce(self, a: Array, timeout: float | None = None) -> Array:
        """The elementwise sum over ranks of the 1-D ``a``, in a's library."""
        raise NotImplementedError

    def all_gather_ints(
        self, values: list[int], like: Array | None = None, timeout: float | None = None
    ) -> list[list[int]]:
        """Every rank's list of ints (all of one length), on the host, by rank.

        ``like`` is the array the collective that follows will carry: an engine
        that needs a device buffer uses its device.
        """
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


def _to_numpy(a: Array) -> np.ndarray:
    """A NumPy copy (or view) of ``a`` on the host: host staging for non-NumPy arrays."""
    if compat.is_numpy_array(a):
        return np.ascontiguousarray(a)
    if compat.is_torch_array(a):
        return a.detach().cpu().contiguous().numpy()
    if compat.is_cupy_array(a):
        return a.get()
    return np.asarray(a)


def _from_numpy(a: np.ndarray, like: Array) -> Array:
    """``a`` moved into the library and onto the device of ``like``."""
    if compat.is_numpy_array(like):
        return a
    if compat.is_torch_array(like):
        import torch

        return torch.from_numpy(a).to(like.device)
    xp = compat.array_namespace(like)
    return xp.asarray(a, device=compat.device(like))


class MPIComm(Communicator):
    """An mpi4py communicator (``MPI.COMM_WORLD`` when ``comm`` is None).

    NumPy arrays are sent as they are. Other arrays (CuPy, torch, ...) are
    staged through host memory: a copy to NumPy before the collective and
    back after. For per-channel statistics (a few kilobytes) the copies cost
    far less than the collective's latency.

    Every exchange has a deadline (``timeout=``; 30 minutes,
    ``anybn.distributed.deadline.DEFAULT_TIMEOUT``, when None): the header travels
    as point-to-point messages on a duplicate of the communicator (made by
    ``MPI_Comm_idup`` at the first synchronized call, so
    anybn's messages never meet yours), and the statistics as non-blocking
    collectives on it, polled until the deadline.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        The communicator; ``mpi4py.MPI.COMM_WORLD`` by default.

    Examples
    --------
    In each process started by ``mpiexec -n 4 python train.py``:

    >>> from mpi4py import MPI  # doctest: +SKIP
    >>> comm = anybn.distributed.MPIComm(MPI.COMM_WORLD)  # doctest: +SKIP
    >>> out = anybn.batch_norm(x, rm, rv, training=True, comm=comm, timeout=60)  # doctest: +SKIP
    """

    engine = "mpi"

    def __init__(self, comm: Any = None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm

    @property
    def rank(self) -> int:
        return int(self.comm.Get_rank())

    @property
    def size(self) -> int:
        return int(self.comm.Get_size())

    def _deadlines(self, timeout: float | None) -> tuple[Deadlines, float]:
        """The group's protocol state (its duplicate ready) and the timeout in seconds."""
        seconds = DEFAULT_TIMEOUT if timeout is None else float(timeout)
        deadlines = mpi_deadlines(self.comm, time.monotonic() + seconds)
        if deadlines is None:
            raise CollectiveTimeout(
                f"anybn synchronized batch norm (mpi, {self.size} ranks): duplicating the "
                f"communicator (MPI_Comm_idup, a collective made at the first synchronized "
                f"call) did not complete within {seconds:g} s on rank {self.rank}: some rank "
                "has not made its first call (which one a collective cannot tell)",
                collective="communicator duplication", missing=None, timeout=seconds,
                rank=self.rank,
            )  # fmt: skip
        deadlines.check_usable()
        return deadlines, seconds

    def _collective(
        self, start: Any, send: np.ndarray, recv: np.ndarray, timeout: float | None, what: str
    ) -> None:
        deadlines, seconds = self._deadlines(timeout)
        request = start(deadlines.transport.dup)  # type: ignore[attr-defined]
        if not poll(request.Test, time.monotonic() + seconds):
            _ABANDONED.append((request, send, recv))  # MPI cannot cancel a collective
            raise deadlines.collective_timeout(what, seconds)

    def all_gather(
        self, a: Array, timeout: float | None = None, what: str = "statistics all-gather"
    ) -> Array:
        send = _to_numpy(a)
        recv = np.empty((self.size, send.shape[0]), dtype=send.dtype)
        self._collective(lambda c: c.Iallgather(send, recv), send, recv, timeout, what)
        return _from_numpy(recv, a)

    def all_reduce(
        self, a: Array, timeout: float | None = None, what: str = "sums all-reduce"
    ) -> Array:
        from mpi4py import MPI

        send = _to_numpy(a)
        recv = np.empty_like(send)
        self._collective(lambda c: c.Iallreduce(send, recv, op=MPI.SUM), send, recv, timeout, what)
        return _from_numpy(recv, a)

    def all_gather_ints(
        self,
        values: list[int],
        like: Array | None = None,
        timeout: float | None = None,
        what: str = "header exchange",
    ) -> list[list[int]]:
        deadlines, seconds = self._deadlines(timeout)
        return deadlines.exchange(values, seconds, what)


#: MPI requests given up at their deadline, and their buffers: kept alive, as MPI may
#: still complete them.
_ABANDONED: list[tuple[Any, np.ndarray, np.ndarray]] = []


class TorchComm(Communicator):
    """A ``torch.distributed`` process group (the default group when ``group`` is None).

    Tensors stay on their device: CPU tensors need a gloo group, CUDA tensors an
    NCCL (or gloo) group. NumPy arrays are wrapped as CPU tensors without a copy;
    other arrays are staged through host memory.

    Every exchange has a deadline (``timeout=``; the process group's own timeout
    when None): the header travels through the group's key-value store (the
    ``TCPStore`` of ``init_process_group``), which sees each rank arrive; the
    statistics over gloo are waited for with that deadline, over NCCL with the
    group's.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        The group; the default (world) group by default. ``torch.distributed``
        must be initialized before the first collective.

    Examples
    --------
    In each rank, after ``torch.distributed.init_process_group("gloo")``:

    >>> comm = anybn.distributed.TorchComm()  # doctest: +SKIP
    >>> out = anybn.batch_norm(x_shard, rm, rv, training=True, comm=comm)  # doctest: +SKIP
    """

    engine = "torch.distributed"

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = group

    def _check(self) -> None:
        if not self._dist.is_initialized():
            raise RuntimeError(
                "comm is a torch.distributed communicator but the default process group "
                "is not initialized; call torch.distributed.init_process_group first"
            )

    @property
    def rank(self) -> int:
        self._check()
        return int(self._dist.get_rank(self.group))

    @property
    def size(self) -> int:
        self._check()
        return int(self._dist.get_world_size(self.group))

    def _all_gather(self, out: Any, t: Any, async_op: bool = False) -> Any:
        # torch 2.13 renamed all_gather_into_tensor to all_gather_single (the old
        # name warns); older versions only have the old one.
        gather = getattr(self._dist, "all_gather_single", None)
        if gather is None:
            gather = self._dist.all_gather_into_tensor
        return gather(out, t, group=self.group, async_op=async_op)

    def _uses_nccl(self) -> bool:
        return "nccl" in str(self._dist.get_backend(self.group)).lower()

    def _to_tensor(self, a: Array) -> Any:
        import torch

        if compat.is_torch_array(a):
            t = a.detach()
        else:
            t = torch.from_numpy(_to_numpy(a))
        if self._uses_nccl() and t.device.type != "cuda":
            raise ValueError(
                f"an NCCL process group carries CUDA tensors only, got a {t.device.type} "
                "array; use a gloo group for CPU arrays"
            )
        return t.contiguous()

    def _back(self, t: Any, like: Array) -> Array:
        if compat.is_torch_array(like):
            return t
        return _from_numpy(t.cpu().numpy(), like)

    def _seconds(self, timeout: float | None) -> float:
        return torch_default_timeout(self.group) if timeout is None else float(timeout)

    def _wait(self, start: Any, timeout: float | None, what: str) -> None:
        """Run a collective; over gloo wait for it at most ``timeout`` seconds."""
        deadlines = torch_deadlines(self.group)
        deadlines.check_usable()
        if self._uses_nccl():  # NCCL's own watchdog and the group's timeout
            start(False)
            return
        seconds = self._seconds(timeout)
        work = start(True)
        try:
            work.wait(timeout=datetime.timedelta(seconds=seconds))
        except RuntimeError as exc:
            if "timed out" not in str(exc).lower():
                raise
            _ABANDONED_WORKS.append(work)  # it may still complete: its buffers stay alive
            raise deadlines.collective_timeout(what, seconds) from exc

    def all_gather(
        self, a: Array, timeout: float | None = None, what: str = "statistics all-gather"
    ) -> Array:
        import torch

        self._check()
        t = self._to_tensor(a)
        # A flat output: gloo rejects a (size, n) one (NCCL takes either).
        out = torch.empty(self.size * t.shape[0], dtype=t.dtype, device=t.device)
        self._wait(lambda async_op: self._all_gather(out, t, async_op), timeout, what)
        return self._back(out.view(self.size, t.shape[0]), a)

    def all_reduce(
        self, a: Array, timeout: float | None = None, what: str = "sums all-reduce"
    ) -> Array:
        self._check()
        t = self._to_tensor(a).clone()
        self._wait(
            lambda async_op: self._dist.all_reduce(t, group=self.group, async_op=async_op),
            timeout, what,
        )  # fmt: skip
        return self._back(t, a)

    def all_gather_ints(
        self,
        values: list[int],
        like: Array | None = None,
        timeout: float | None = None,
        what: str = "header exchange",
    ) -> list[list[int]]:
        self._check()
        deadlines = torch_deadlines(self.group)
        return deadlines.exchange(values, self._seconds(timeout), what)


#: torch.distributed works given up at their deadline: kept alive (their buffers with them).
_ABANDONED_WORKS: list[Any] = []


def _is_torch_group(comm: object) -> bool:
    dist = sys.modules.get("torch.distributed")
    if dist is None or not dist.is_available():
        return False
    return isinstance(comm, dist.ProcessGroup)


def _is_mpi_comm(comm: object) -> bool:
    if "mpi4py.MPI" not in sys.modules:
        return False
    return isinstance(comm, sys.modules["mpi4py.MPI"].Comm)


def as_communicator(comm: object) -> Communicator:
    """Wrap ``comm`` as a :class:`Communicator`.

    Parameters
    ----------
    comm : Communicator, torch.distributed.ProcessGroup, mpi4py.MPI.Comm or str
        A communicator, an engine's own group object, or ``"torch"`` (the
        default torch.distributed group) or ``"mpi"`` (``MPI.COMM_WORLD``).

    Returns
    -------
    Communicator

    Raises
    ------
    TypeError
        If ``comm`` is none of these.

    Examples
    --------
    >>> from anybn.distributed import as_communicator
    >>> as_communicator(42)
    Traceback (most recent call last):
        ...
    TypeError: comm must be a torch.distributed ProcessGroup, an mpi4py communicator, ...
    """
    if isinstance(comm, Communicator):
        return comm
    if isinstance(comm, str):
        if comm == "torch":
            return TorchComm()
        if comm == "mpi":
            return MPIComm()
        raise ValueError(f"comm must be 'torch' or 'mpi' when given as a string, got {comm!r}")
    if _is_torch_group(comm):
        return TorchComm(comm)
    if _is_mpi_comm(comm):
        return MPIComm(comm)
    raise TypeError(
        "comm must be a torch.distributed ProcessGroup, an mpi4py communicator, "
        f"'torch', 'mpi', an anybn.distributed.Communicator or None, got {type(comm).__name__}"
    )
