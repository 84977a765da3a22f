"""Deadlines: every synchronized call ends on time, on every rank, or names who did not come.

A collective cannot tell which ranks have joined it, and neither MPI nor gloo can
take back a collective once posted: a rank that stays alive but never makes the
call would leave the others waiting, and a rank that comes after the others gave
up would pair with their *next* call. So the first exchange of every synchronized
call (the header, :mod:`anybn.distributed.sync`) is not a collective but a small
coordinated protocol, which sees each rank arrive and can be abandoned cleanly:

1. every rank but rank 0 posts its header to rank 0 and waits for rank 0's
   *verdict*, at most ``timeout + GRACE`` seconds;
2. rank 0 waits for every header, at most ``timeout`` seconds, then publishes the
   verdict: every rank's header (all came), or the ranks that did not answer;
3. a rank that got no verdict in time (rank 0 did not come) publishes a verdict
   naming rank 0 instead.

The verdict of a call is published once, and every rank, the late ones
included, acts on that one verdict: all proceed, or all raise
:class:`CollectiveTimeout` naming the ranks that did not answer. A late rank
finds the verdict already there when it comes and raises at once. Calls are
numbered per group (every rank counts its calls alike, the abandoned ones
included), so a late header is recognised as stale and never pairs with a later
call: the group stays usable after a timeout.

The transports: over torch.distributed, the process group's key-value store
(the ``TCPStore`` that ``init_process_group`` made), whose atomic
``compare_set`` publishes the verdict exactly once; over MPI, point-to-point
messages on a duplicate of the communicator (``MPI_Comm_idup``, made at the
first call), received with ``MPI_Irecv`` and polled until the deadline, the
ones left cancelled. On MPI a non-coordinator's giving up is a message to rank
0, which rank 0 reads before it publishes: only a rank 0 that comes at the very
moment the others give up (``timeout + GRACE`` after them) could miss it.

The statistics and sums that follow a successful header are ordinary
collectives, also bounded by ``timeout``; since every rank was there a moment
before, a timeout there means a rank stalled or died inside the call. Such a
collective cannot be taken back, so the group is then marked broken for anybn:
every later synchronized call on it raises at once (recreate the group, or
abort the job).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

__all__ = ["DEFAULT_TIMEOUT", "GRACE", "CollectiveTimeout", "Deadlines", "poll"]

#: The MPI default of ``timeout=None``: 30 minutes, torch.distributed's own default.
DEFAULT_TIMEOUT = 1800.0

#: Seconds a rank other than 0 waits for rank 0's verdict beyond ``timeout``: rank 0
#: counts its ``timeout`` from its own arrival, and may come a little later.
GRACE = 2.0

_OK, _ABORT = 0, 1


class CollectiveTimeout(TimeoutError):
    """A synchronized call did not complete within its ``timeout`` (on every rank).

    Raised on every rank of the group: on those that waited, naming the ranks that
    did not answer, and on a late rank when it comes, naming itself among them.

    Attributes
    ----------
    collective : str
        The exchange that timed out (``"forward header"``, ``"statistics all-gather"``...).
    missing : list of int or None
        The ranks that did not answer in time; None where the engine cannot tell
        (a collective after the header).
    timeout : float
        The deadline, in seconds.
    rank : int
        The rank that raised.

    Examples
    --------
    >>> from anybn.distributed import CollectiveTimeout
    >>> issubclass(CollectiveTimeout, TimeoutError)
    True
    """

    def __init__(
        self, message: str, *, collective: str, missing: list[int] | None, timeout: float, rank: int
    ) -> None:
        super().__init__(message)
        self.collective, self.missing, self.timeout, self.rank = collective, missing, timeout, rank


def poll(test: Callable[[], bool], deadline: float) -> bool:
    """Call ``test`` until it returns True (True) or ``deadline`` (monotonic) passes (False).

    Busy at first, then sleeping up to 1 ms between tries: a collective whose ranks
    are all there completes in the first few tries.
    """
    delay = 0.0
    spins = 0
    while True:
        if test():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        spins += 1
        if spins > 50:
            time.sleep(min(delay, max(deadline - now, 0.0)))
            delay = min(max(2.0 * delay, 2e-5), 1e-3)


class Transport:
    """How the header protocol moves its messages over one engine (see the subclasses).

    Headers and verdicts are lists of ints; a verdict is ``[seq, 0, 0, *headers]``
    (every rank's header, by rank) or ``[seq, 1, decider, count, *missing]`` (the
    rank that decided, and the ranks that did not answer).
    """

    rank: int
    size: int

    def send_header(self, seq: int, values: list[int]) -> None:
        raise NotImplementedError

    def collect(self, seq: int, width: int, deadline: float) -> dict[int, list[int]]:
        raise NotImplementedError

    def publish(self, seq: int, verdict: list[int]) -> list[int]:
        raise NotImplementedError

    def await_verdict(self, seq: int, width: int, deadline: float) -> list[int] | None:
        raise NotImplementedError

    def give_up(self, seq: int, verdict: list[int]) -> list[int]:
        raise NotImplementedError

    def finish(self, seq: int, verdict: list[int]) -> None:
        """Tidy up after a call (what every rank has read may go)."""


class Deadlines:
    """The header protocol of one group: its call counter and its broken mark.

    One per process group (or MPI communicator), shared by every communicator
    object that wraps it (:func:`for_group`).
    """

    def __init__(self, transport: Transport, engine: str) -> None:
        self.transport = transport
        self.engine = engine
        self.seq = 0
        self.broken: str | None = None

    def where(self) -> str:
        return f"anybn synchronized batch norm ({self.engine}, {self.transport.size} ranks)"

    def check_usable(self) -> None:
        if self.broken is not None:
            raise RuntimeError(self.broken)

    def mark_broken(self, what: str) -> None:
        self.broken = (
            f"{self.where()}: an earlier {what} on this group did not complete in time and "
            "cannot be taken back, so anybn no longer uses this group; recreate it (or "
            "abort the job)"
        )

    def exchange(self, values: Sequence[int], timeout: float, what: str) -> list[list[int]]:
        """Every rank's ``values`` (all of one length), by rank; or CollectiveTimeout."""
        self.check_usable()
        t = self.transport
        self.seq += 1
        seq, width, size, rank = self.seq, len(values), t.size, t.rank
        start = time.monotonic()
        if rank == 0:
            got = t.collect(seq, width, start + timeout)
            got[0] = [int(v) for v in values]
            missing = [r for r in range(size) if r not in got]
            if missing:
                proposal = [seq, _ABORT, 0, len(missing), *missing]
            else:
                proposal = [seq, _OK, 0, *(v for r in range(size) for v in got[r])]
            verdict = t.publish(seq, proposal)
        else:
            t.send_header(seq, [int(v) for v in values])
            found = t.await_verdict(seq, width, start + timeout + GRACE)
            verdict = found if found is not None else t.give_up(seq, [seq, _ABORT, rank, 1, 0])
        t.finish(seq, verdict)
        if verdict[1] == _OK:
            flat = verdict[3 : 3 + size * width]
            return [list(flat[r * width : (r + 1) * width]) for r in range(size)]
        raise self._timeout_error(verdict, timeout, what)

    def _timeout_error(self, verdict: list[int], timeout: float, what: str) -> CollectiveTimeout:
        rank, decider = self.transport.rank, verdict[2]
        missing = list(verdict[4 : 4 + verdict[3]])
        waited = f"{timeout:g} s" if decider == 0 else f"{timeout:g} s (+{GRACE:g} s grace)"
        if rank in missing:
            late = [r for r in range(self.transport.size) if r not in missing]
            message = (
                f"{self.where()}: the {what} timed out: this rank ({rank}) came after "
                f"rank(s) {late} had stopped waiting for it (rank(s) {missing} did not answer "
                f"within {waited}); nothing was computed or updated"
            )
        else:
            message = (
                f"{self.where()}: the {what} timed out after {waited} on rank {rank}: "
                f"rank(s) {missing} did not answer; nothing was computed or updated"
            )
        return CollectiveTimeout(
            message, collective=what, missing=missing, timeout=timeout, rank=rank
        )

    def collective_timeout(self, what: str, timeout: float) -> CollectiveTimeout:
        """A data collective after the header timed out: the group is broken for anybn."""
        self.mark_broken(what)
        return CollectiveTimeout(
            f"{self.where()}: the {what} did not complete within {timeout:g} s on rank "
            f"{self.transport.rank}; every rank had answered the header a moment before, so "
            "one stalled or died inside the call (which one the collective cannot tell); "
            "anybn no longer uses this group",
            collective=what, missing=None, timeout=timeout, rank=self.transport.rank,
        )  # fmt: skip


# --- torch.distributed: the process group's store ---------------------------------------


def _encode(values: Sequence[int]) -> str:
    return ",".join(str(int(v)) for v in values)


def _decode(raw: bytes | str) -> list[int]:
    text = raw.decode() if isinstance(raw, bytes) else raw
    return [int(v) for v in text.split(",") if v]


class StoreTransport(Transport):
    """The header protocol over a torch.distributed ``Store`` (keys under ``anybn/``)."""

    def __init__(self, store: Any, rank: int, size: int) -> None:
        from torch.distributed import PrefixStore

        self.store = PrefixStore("anybn", store)
        self.rank, self.size = rank, size

    @staticmethod
    def _span(deadline: float) -> datetime.timedelta:
        return datetime.timedelta(seconds=max(deadline - time.monotonic(), 0.001))

    def send_header(self, seq: int, values: list[int]) -> None:
        self.store.set(f"{seq}/h{self.rank}", _encode([seq, *values]))

    def collect(self, seq: int, width: int, deadline: float) -> dict[int, list[int]]:
        if self.store.check([f"{seq}/v"]):  # this rank is late: the others gave up already
            return {}
        keys = {r: f"{seq}/h{r}" for r in range(1, self.size)}
        try:
            self.store.wait(list(keys.values()), self._span(deadline))
        except Exception:  # some did not come (the store raises on its timeout)
            present = {r: k for r, k in keys.items() if self.store.check([k])}
        else:
            present = keys
        got = {}
        raws = self.store.multi_get(list(present.values())) if present else []
        for r, raw in zip(present, raws, strict=True):
            values = _decode(raw)
            if values and values[0] == seq:
                got[r] = values[1:]
        return got

    def publish(self, seq: int, verdict: list[int]) -> list[int]:
        # compare_set: the first verdict of this call stays (a rank's giving up, or this)
        return _decode(self.store.compare_set(f"{seq}/v", "", _encode(verdict)))

    def await_verdict(self, seq: int, width: int, deadline: float) -> list[int] | None:
        key = f"{seq}/v"
        try:
            self.store.wait([key], self._span(deadline))
        except Exception:
            return None
        return _decode(self.store.get(key))

    def give_up(self, seq: int, verdict: list[int]) -> list[int]:
        try:
            return self.publish(seq, verdict)
        except Exception:  # the store itself is gone with rank 0, which hosts it
            return verdict

    def finish(self, seq: int, verdict: list[int]) -> None:
        try:
            self.store.delete_key(f"{seq}/h{self.rank}")
            if self.rank == 0 and verdict[1] == _OK and seq > 1:
                # every rank has posted this call's header: all have read the last verdict
                self.store.delete_key(f"{seq - 1}/v")
        except Exception:  # tidying only
            pass


def torch_deadlines(group: Any) -> Deadlines:
    """The :class:`Deadlines` of a torch.distributed process group (made at first use)."""
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    pg = group if group is not None else c10d._get_default_group()
    found = _GROUPS.get(id(pg))
    if found is not None and found[0] is pg:
        return found[1]
    store = None
    world = getattr(c10d, "_world", None)
    entry = getattr(world, "pg_map", {}).get(pg) if world is not None else None
    if entry is not None:
        store = entry[1]
    if store is None:
        from torch.distributed import PrefixStore

        name = c10d._get_process_group_name(pg) if hasattr(c10d, "_get_process_group_name") else ""
        store = PrefixStore(f"group{name}", c10d._get_default_store())
    transport = StoreTransport(store, dist.get_rank(pg), dist.get_world_size(pg))
    deadlines = Deadlines(transport, "torch.distributed")
    _GROUPS[id(pg)] = (pg, deadlines)
    return deadlines


def torch_default_timeout(group: Any) -> float:
    """The process group's own timeout, in seconds (torch's default where it cannot be read)."""
    import torch
    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    pg = group if group is not None else c10d._get_default_group()
    try:
        backend = str(dist.get_backend(pg)).lower()
        device = torch.device("cuda" if "nccl" in backend else "cpu")
        return float(pg._get_backend(device).options._timeout.total_seconds())
    except Exception:
        default = getattr(c10d, "default_pg_timeout", datetime.timedelta(minutes=30))
        return float(default.total_seconds())


# --- MPI: point-to-point messages on a duplicate communicator -------------------------------

_HEADER, _VERDICT, _GIVE_UP = 7101, 7102, 7103

#: How many empty probes rank 0 makes for notices of ranks that stopped waiting for it.
_NOTICE_PROBES = 20


class MPITransport(Transport):
    """The header protocol over MPI messages on a duplicate of the communicator."""

    def __init__(self, comm: Any) -> None:
        self.parent = comm
        self.rank, self.size = int(comm.Get_rank()), int(comm.Get_size())
        self.dup: Any = None
        self._dup_request: Any = None
        self._sends: list[tuple[Any, np.ndarray]] = []  # kept alive until complete
        self._width = 1

    def ready(self, deadline: float) -> bool:
        """Duplicate the communicator (a collective, once): False if not done by ``deadline``."""
        if self.dup is not None:
            return True
        if self._dup_request is None:
            self._pending_dup, self._dup_request = self.parent.Idup()
        if not poll(self._dup_request.Test, deadline):
            return False
        self.dup, self._dup_request = self._pending_dup, None
        return True

    def _send(self, values: list[int], dest: int, tag: int) -> None:
        buf = np.asarray(values, dtype=np.int64)
        self._sends = [(r, b) for r, b in self._sends if not r.Test()]
        self._sends.append((self.dup.Isend(buf, dest=dest, tag=tag), buf))

    def _receive(self, source: int, tag: int, length: int, seq: int, deadline: float) -> Any:
        """A message of call ``seq`` from ``source`` (stale ones dropped), or None in time."""
        while True:
            buf = np.zeros(length, dtype=np.int64)
            request = self.dup.Irecv(buf, source=source, tag=tag)
            if not poll(request.Test, deadline):
                if not _cancelled_or_arrived(request):
                    return None
            if buf[0] == seq:
                return buf
            if buf[0] > seq:  # cannot happen: calls are numbered alike on every rank
                return None

    def send_header(self, seq: int, values: list[int]) -> None:
        self._send([seq, *values], 0, _HEADER)

    def collect(self, seq: int, width: int, deadline: float) -> dict[int, list[int]]:
        self._width = width
        pending: dict[int, tuple[Any, np.ndarray]] = {}

        def post(r: int) -> None:
            buf = np.zeros(width + 1, dtype=np.int64)
            pending[r] = (self.dup.Irecv(buf, source=r, tag=_HEADER), buf)

        for r in range(1, self.size):
            post(r)
        got: dict[int, list[int]] = {}

        def step() -> bool:
            for r, (request, buf) in list(pending.items()):
                if request.Test():
                    del pending[r]
                    if buf[0] == seq:
                        got[r] = buf[1:].tolist()
                    elif buf[0] < seq:  # a late header of an abandoned call
                        post(r)
            return not pending

        if not poll(step, deadline):
            for r, (request, buf) in pending.items():
                if _cancelled_or_arrived(request) and buf[0] == seq:
                    got[r] = buf[1:].tolist()
        return got

    def _verdict_length(self, width: int) -> int:
        """Every verdict travels padded to this length (a receive must fit the message)."""
        return 4 + self.size * max(width, 1)

    def publish(self, seq: int, verdict: list[int], width: int = 0) -> list[int]:
        from mpi4py import MPI

        status = MPI.Status()
        buf = np.zeros(2, dtype=np.int64)
        # A rank that stopped waiting for this one sent a notice: its verdict stands. Probe a
        # few times (MPI moves a message along only while it is called: the first probe may
        # not see one that came long ago).
        misses = 0
        while misses < _NOTICE_PROBES:
            if self.dup.Iprobe(source=MPI.ANY_SOURCE, tag=_GIVE_UP, status=status):
                self.dup.Recv(buf, source=status.Get_source(), tag=_GIVE_UP)
                if buf[0] == seq:
                    verdict = [seq, _ABORT, int(buf[1]), 1, 0]
            else:
                misses += 1
        length = max(self._verdict_length(self._width), len(verdict))
        padded = verdict + [0] * (length - len(verdict))
        for r in range(1, self.size):
            self._send(padded, r, _VERDICT)
        return verdict

    def await_verdict(self, seq: int, width: int, deadline: float) -> list[int] | None:
        buf = self._receive(0, _VERDICT, self._verdict_length(width), seq, deadline)
        return None if buf is None else buf.tolist()

    def give_up(self, seq: int, verdict: list[int]) -> list[int]:
        self._send([seq, self.rank], 0, _GIVE_UP)
        return verdict


def mpi_deadlines(comm: Any, deadline: float) -> Deadlines | None:
    """The :class:`Deadlines` of an mpi4py communicator, or None if its duplicate (made at
    the first call, a collective) was not ready by ``deadline``."""
    key = ("mpi", id(comm))
    found = _GROUPS.get(key)
    if found is None or found[0] is not comm:
        found = (comm, Deadlines(MPITransport(comm), "mpi"))
        _GROUPS[key] = found
    deadlines: Deadlines = found[1]
    transport = deadlines.transport
    assert isinstance(transport, MPITransport)
    return deadlines if transport.ready(deadline) else None


def _cancelled_or_arrived(request: Any) -> bool:
    """Cancel a pending receive; True if its message arrived before the cancel took."""
    from mpi4py import MPI

    status = MPI.Status()
    request.Cancel()
    request.Wait(status)
    return not status.Is_cancelled()


#: id(group) -> (the group object, kept alive so that its id is not reused; its Deadlines)
_GROUPS: dict[Any, tuple[Any, Deadlines]] = {}
