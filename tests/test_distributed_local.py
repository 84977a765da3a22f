"""Synchronized batch norm without processes: ranks as threads, argument checks, the torch module.

:class:`ThreadGroup` runs K "ranks" as threads of this process over an in-memory
:class:`anybn.distributed.Communicator`, which checks the merge and the header
logic on many splits cheaply (the real engines are in test_distributed.py).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anybn
from anybn.distributed import Communicator, as_communicator

ROOT = Path(__file__).resolve().parents[1]


class ThreadGroup:
    """K ranks as threads: ``run(fn)`` calls ``fn(comm)`` on each and returns results by rank."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.slots: list[Any] = [None] * size
        self.barrier = threading.Barrier(size, timeout=30)

    def exchange(self, rank: int, value: Any) -> list[Any]:
        self.slots[rank] = value
        self.barrier.wait()
        values = list(self.slots)
        self.barrier.wait()
        return values

    def run(self, fn: Callable[[Communicator], Any]) -> list[Any]:
        out: list[Any] = [None] * self.size

        def target(rank: int) -> None:
            try:
                out[rank] = ("ok", fn(ThreadComm(self, rank)))
            except Exception as exc:
                out[rank] = ("raised", exc)

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        return out


class ThreadComm(Communicator):
    engine = "threads"

    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self._rank = group, rank

    @property
    def rank(self) -> int:
        return self._rank

    @property
    def size(self) -> int:
        return self.group.size

    def all_gather(self, a: Any) -> Any:
        import array_api_compat as compat

        xp = compat.array_namespace(a)
        return xp.stack(self.group.exchange(self._rank, a))

    def all_reduce(self, a: Any) -> Any:
        values = self.group.exchange(self._rank, a)
        total = values[0]
        for v in values[1:]:
            total = total + v
        return total

    def all_gather_ints(self, values: list[int], like: Any = None) -> list[list[int]]:
        return self.group.exchange(self._rank, list(values))


def _values(results: list[Any]) -> list[Any]:
    for status, value in results:
        if status != "ok":
            raise value
    return [value for _, value in results]


@pytest.mark.parametrize("splits", [[2, 3], [0, 5], [1, 0, 4], [3, 3, 3, 3], [0, 0, 1, 1]], ids=str)
@pytest.mark.parametrize("axis", [1, -1])
def test_threads_equal_concatenated_batch(splits: list[int], axis: int) -> None:
    rng = np.random.default_rng(sum(splits))
    n = sum(splits)
    x = 1e3 + rng.normal(size=(n, 4, 3))
    dy = rng.normal(size=x.shape)
    w, b = rng.uniform(0.5, 2, 3 if axis == -1 else 4), rng.normal(size=3 if axis == -1 else 4)
    rm, rv = np.zeros_like(w), np.ones_like(w)
    bounds = np.cumsum([0, *splits])

    def rank_fn(comm: Communicator) -> Any:
        shard = slice(bounds[comm.rank], bounds[comm.rank + 1])
        out = anybn.batch_norm(x[shard], rm, rv, w, b, training=True, axis=axis, comm=comm)
        grads = anybn.batch_norm_backward(
            dy[shard], x[shard], w, out.mean, out.invstd, axis=axis, comm=comm
        )
        return out, grads

    got = _values(ThreadGroup(len(splits)).run(rank_fn))
    ref = anybn.batch_norm(x, rm, rv, w, b, training=True, axis=axis)
    gref = anybn.batch_norm_backward(dy, x, w, ref.mean, ref.invstd, axis=axis)
    close = {"rtol": 1e-12, "atol": 1e-12}
    np.testing.assert_allclose(np.concatenate([o.y for o, _ in got]), ref.y, **close)
    np.testing.assert_allclose(np.concatenate([g.dx for _, g in got]), gref.dx, **close)
    np.testing.assert_allclose(sum(g.dweight for _, g in got), gref.dweight, **close)
    np.testing.assert_allclose(sum(g.dbias for _, g in got), gref.dbias, **close)
    for out, _ in got:  # every rank: the same statistics, bit for bit
        np.testing.assert_array_equal(out.mean, got[0][0].mean)
        np.testing.assert_array_equal(out.new_running_var, got[0][0].new_running_var)
        for field in ("mean", "invstd", "new_running_mean", "new_running_var"):
            np.testing.assert_allclose(getattr(out, field), getattr(ref, field), **close)


def test_float16_communicates_float32() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(6, 2, 3)).astype(np.float16)
    sent: list[Any] = []

    class Spy(ThreadComm):
        def all_gather(self, a: Any) -> Any:
            sent.append(a.dtype)
            return super().all_gather(a)

    def rank_fn(comm: Communicator) -> Any:
        spy = Spy(comm.group, comm.rank)  # type: ignore[attr-defined]
        return anybn.batch_norm(x[comm.rank * 3 : comm.rank * 3 + 3], training=True, comm=spy)

    got = _values(ThreadGroup(2).run(rank_fn))
    ref = anybn.batch_norm(x, training=True)
    assert sent == [np.float32, np.float32]
    assert got[0].mean.dtype == np.float32
    np.testing.assert_allclose(got[0].mean, ref.mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got[1].invstd, ref.invstd, rtol=1e-6)


def test_device_type_mismatch_raises_on_every_rank() -> None:
    """A rank with another device type (here: array-api-strict's vs NumPy's) fails on all."""
    xps = pytest.importorskip("array_api_strict")

    def rank_fn(comm: Communicator) -> Any:
        x = np.ones((3, 2)) if comm.rank == 0 else xps.ones((3, 2), dtype=xps.float64)
        return anybn.batch_norm(x, training=True, comm=comm)

    for status, exc in ThreadGroup(2).run(rank_fn):
        assert status == "raised"
        assert isinstance(exc, ValueError)
        assert "same device type, got rank 0: cpu, rank 1: other" in str(exc)


def test_global_count_of_one_raises_on_every_rank() -> None:
    def rank_fn(comm: Communicator) -> Any:
        return anybn.batch_norm(np.ones((1 - comm.rank, 3)), training=True, comm=comm)

    for status, exc in ThreadGroup(2).run(rank_fn):
        assert status == "raised" and isinstance(exc, ValueError)
        assert "Expected more than 1 value per channel when training, got 1 over 2" in str(exc)


def test_layer_with_comm_matches_full_batch() -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(7, 3, 2))

    def rank_fn(comm: Communicator) -> Any:
        bn = anybn.BatchNorm(3, comm=comm)
        shard = x[:2] if comm.rank == 0 else x[2:]
        y = bn(shard)
        grads = bn.backward(np.ones_like(shard))
        return y, grads, bn.running_mean, bn.running_var

    got = _values(ThreadGroup(2).run(rank_fn))
    bn = anybn.BatchNorm(3)
    y = bn(x)
    np.testing.assert_allclose(np.concatenate([g[0] for g in got]), y, rtol=1e-12, atol=1e-12)
    for _, grads, rm, rv in got:
        np.testing.assert_allclose(grads.dx, 0.0, atol=1e-12)
        np.testing.assert_allclose(rm, bn.running_mean, rtol=1e-12)
        np.testing.assert_allclose(rv, bn.running_var, rtol=1e-12)


class _Refuses(Communicator):
    """A communicator that fails the test if anything is communicated."""

    rank, size = 0, 2  # type: ignore[assignment]

    def all_gather(self, a: Any) -> Any:
        raise AssertionError("communicated in eval")

    all_reduce = all_gather

    def all_gather_ints(self, values: list[int], like: Any = None) -> list[list[int]]:
        raise AssertionError("communicated in eval")


def test_eval_does_not_communicate() -> None:
    x = np.arange(12.0).reshape(4, 3)
    rm, rv = np.ones(3), np.full(3, 2.0)
    out = anybn.batch_norm(x, rm, rv, comm=_Refuses())
    ref = anybn.batch_norm(x, rm, rv)
    np.testing.assert_array_equal(out.y, ref.y)
    g = anybn.batch_norm_backward(x, x, None, out.mean, out.invstd, training=False, comm=_Refuses())
    np.testing.assert_array_equal(g.dx, anybn.batch_norm_backward(
        x, x, None, out.mean, out.invstd, training=False).dx)  # fmt: skip


@pytest.mark.parametrize(
    ("comm", "error", "match"),
    [
        (object(), TypeError, "comm must be a torch.distributed ProcessGroup"),
        ("nccl", ValueError, "comm must be 'torch' or 'mpi'"),
    ],
)
def test_bad_comm(comm: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        anybn.batch_norm(np.ones((4, 3)), training=True, comm=comm)
    with pytest.raises(error, match=match):
        as_communicator(comm)


def test_import_anybn_imports_no_engine() -> None:
    code = (
        "import sys, anybn, anybn.distributed; "
        "print(sorted(m for m in ('torch', 'mpi4py') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": ""}, check=True,
    )  # fmt: skip
    assert out.stdout.strip() == "[]"


# --- anybn.torch.SyncBatchNorm in one process -------------------------------------------


def test_sync_module_without_group_is_batch_norm() -> None:
    torch = pytest.importorskip("torch")
    import anybn.torch as abt

    x = torch.randn(5, 3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sync, local = abt.SyncBatchNorm(3).double(), torch.nn.BatchNorm1d(3).double()
    for mode in (True, False):
        sync.train(mode)
        local.train(mode)
        torch.testing.assert_close(sync(x), local(x), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sync.state_dict(), local.state_dict())
    ref = torch.nn.SyncBatchNorm(3, process_group=None)
    assert list(sync.state_dict()) == list(ref.state_dict())
    assert isinstance(sync, torch.nn.modules.batchnorm._BatchNorm)
    with pytest.raises(ValueError, match="expected at least 2D input"):
        sync(torch.randn(3))


def test_convert_sync_batchnorm_and_convert() -> None:
    torch = pytest.importorskip("torch")
    import anybn.torch as abt

    nn = torch.nn
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.BatchNorm1d(4, affine=False))
    weight = model[1].weight
    converted = abt.SyncBatchNorm.convert_sync_batchnorm(model, process_group="pg")
    assert type(converted[1]) is abt.SyncBatchNorm and converted[1].weight is weight
    assert converted[1].process_group == "pg" and converted[2].weight is None
    torch_sync = nn.Sequential(nn.SyncBatchNorm(4, momentum=None).eval())
    torch_sync[0].process_group = "pg"
    ours = abt.convert(torch_sync)
    assert type(ours[0]) is abt.SyncBatchNorm
    assert ours[0].process_group == "pg" and ours[0].momentum is None and not ours[0].training


@pytest.mark.parametrize("offset", [1e2, 1e4, 1e5])
def test_float32_large_mean_stays_at_rounding(offset: float) -> None:
    """float32 shards with a large mean: y within 1e-6 of the float64 result (PyTorch's own
    CPU kernel is off by ~1e-3 at 1e4 on one process), as the single-process core is."""
    rng = np.random.default_rng(7)
    x = (offset + rng.normal(size=(16, 4, 8, 8))).astype(np.float32)
    exact = anybn.batch_norm(x.astype(np.float64), training=True).y

    def rank_fn(comm: Communicator) -> Any:
        shard = x[:5] if comm.rank == 0 else x[5:]
        return anybn.batch_norm(shard, training=True, comm=comm).y

    y = np.concatenate(_values(ThreadGroup(2).run(rank_fn)))
    np.testing.assert_allclose(y, exact, rtol=0, atol=1e-6)


def test_every_shard_empty_is_the_core_empty_batch() -> None:
    """No values anywhere: NaN statistics and running statistics kept, as the core (and
    PyTorch) do for an empty batch; the backward gives zeros."""
    rm, rv = np.zeros(3), np.ones(3)

    def rank_fn(comm: Communicator) -> Any:
        x = np.ones((0, 3, 2))
        out = anybn.batch_norm(x, rm, rv, training=True, comm=comm)
        grads = anybn.batch_norm_backward(x, x, None, out.mean, out.invstd, comm=comm)
        return out, grads

    ref = anybn.batch_norm(np.ones((0, 3, 2)), rm, rv, training=True)
    for out, grads in _values(ThreadGroup(2).run(rank_fn)):
        assert out.y.shape == (0, 3, 2) and np.isnan(out.mean).all()
        np.testing.assert_array_equal(out.new_running_mean, ref.new_running_mean)
        np.testing.assert_array_equal(out.new_running_var, ref.new_running_var)
        np.testing.assert_array_equal(grads.dweight, np.zeros(3))


# --- a check failing on one rank fails every rank, and the next call pairs -------------------

_MEAN_FIVE = 5.0 + np.array([[-1.0], [1.0]]) * np.ones((2, 3))


def _sum_of_y(x: Any, comm: Communicator) -> Any:
    return anybn.batch_norm(x, training=True, comm=comm).y.sum()


def _one_rank_fault(name: str, comm: Communicator, last: bool) -> Any:
    """The call of fault ``name``: its bad option on the last rank only."""
    x = np.random.default_rng(comm.rank).normal(size=(4, 3, 2))
    if name == "mask":
        return anybn.batch_norm(x, training=True, comm=comm, mask=x > 0 if last else None)
    if name == "axes":
        return anybn.batch_norm(x, training=True, comm=comm, axis=(1, 2) if last else 1)
    if name == "biased":
        estimator = "biased" if last else "unbiased"
        return anybn.batch_norm(x, training=True, comm=comm, var_estimator=estimator)
    if name == "backward_mask":
        mask = x > 0 if last else None
        return anybn.batch_norm_backward(x, x, None, np.zeros(3), np.ones(3), comm=comm, mask=mask)
    if name == "layer_mask":
        return anybn.BatchNorm(3, comm=comm)(x, mask=x > 0 if last else None)
    if name == "torch_forward_ad":
        import torch
        import torch.autograd.forward_ad as fwAD

        xt = torch.from_numpy(x)
        if not last:  # (a dual level is global to the process: one thread enters it)
            return anybn.batch_norm(xt, training=True, comm=comm)
        with fwAD.dual_level():
            return anybn.batch_norm(fwAD.make_dual(xt, torch.ones_like(xt)), training=True,
                                    comm=comm)  # fmt: skip
    if name == "torch_func":
        import torch

        xt = torch.from_numpy(x)
        if last:
            return torch.func.grad(_sum_of_y, argnums=0)(xt, comm)
        return _sum_of_y(xt.requires_grad_(), comm)
    if name == "torch_backward_requires_grad":
        import torch

        xt = torch.from_numpy(x).requires_grad_(last)
        ones, zeros = torch.ones(3, dtype=xt.dtype), torch.zeros(3, dtype=xt.dtype)
        return anybn.batch_norm_backward(xt, xt, None, zeros, ones, comm=comm)
    if name == "jax_grad":
        import jax

        xj = jax.numpy.asarray(x.astype(np.float32))
        return jax.grad(_sum_of_y)(xj, comm) if last else _sum_of_y(xj, comm)
    raise AssertionError(name)


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("torch_forward_ad", TypeError, "forward-mode AD"),
        ("torch_func", TypeError, "torch.func transforms"),
        ("torch_backward_requires_grad", TypeError, "not differentiable"),
        ("jax_grad", TypeError, "needs concrete JAX arrays"),
    ],
)
def test_one_rank_fault_fails_every_rank_and_the_next_call_pairs(
    name: str, error: type[Exception], match: str
) -> None:
    if name.startswith("torch"):
        pytest.importorskip("torch")
    if name.startswith("jax"):
        pytest.importorskip("jax")  # here: a skip raised in a rank's thread is a failure

    def rank_fn(comm: Communicator) -> Any:
        last = comm.rank == comm.size - 1
        try:
            _one_rank_fault(name, comm, last)
        except Exception as exc:
            raised: Exception | None = exc
        else:
            raised = None
        # then every rank normalizes the same batch: the statistics are those of that batch
        return raised, anybn.batch_norm(_MEAN_FIVE, training=True, comm=comm).mean

    got = _values(ThreadGroup(2).run(rank_fn))
    (raised0, mean0), (raised1, mean1) = got
    assert isinstance(raised1, error), raised1
    assert match in str(raised1)
    assert isinstance(raised0, RuntimeError), raised0
    assert "rank(s) [1] rejected their arguments" in str(raised0)
    np.testing.assert_array_equal(mean0, np.full(3, 5.0))
    np.testing.assert_array_equal(mean1, np.full(3, 5.0))


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("mask", "mask=given"),
        ("axes", "same number of channels"),
        ("biased", "var_estimator=biased"),
        ("backward_mask", "mask=given"),
        ("layer_mask", "mask=given"),
    ],
)
def test_ranks_with_different_options_raise_on_every_rank_and_the_next_call_pairs(
    name: str, match: str
) -> None:
    """A mask on some ranks only, another var_estimator or other channel axes on one rank:
    the ranks would exchange statistics of different sizes or meanings, so every rank
    raises the same ValueError from the header, and nothing is computed."""

    def rank_fn(comm: Communicator) -> Any:
        with pytest.raises(ValueError, match=match) as info:
            _one_rank_fault(name, comm, comm.rank == comm.size - 1)
        return str(info.value), anybn.batch_norm(_MEAN_FIVE, training=True, comm=comm).mean

    got = _values(ThreadGroup(2).run(rank_fn))
    assert got[0][0] == got[1][0]
    for _, mean in got:
        np.testing.assert_array_equal(mean, np.full(3, 5.0))


# --- options that change nothing in eval, and one channel axis as a sequence ---------------


@pytest.mark.parametrize(
    "options",
    [
        {"mask": np.array([True, False, True, True])[:, None, None]},
        {"axis": (1,)},
        {"axis": (1, 2)},
        {"var_estimator": "biased"},
    ],
    ids=["mask", "axis-1-tuple", "axes", "biased"],
)
def test_eval_with_comm_takes_the_local_options(options: dict[str, Any]) -> None:
    rng = np.random.default_rng(3)
    x = rng.normal(size=(4, 3, 2))
    shape = (3, 2) if options.get("axis") == (1, 2) else (3,)
    rm, rv = rng.normal(size=shape), rng.uniform(0.5, 2, shape)
    got = anybn.batch_norm(x, rm, rv, comm=_Refuses(), **options)
    ref = anybn.batch_norm(x, rm, rv, **options)
    np.testing.assert_array_equal(got.y, ref.y)
    grad_options = {k: v for k, v in options.items() if k != "var_estimator"}
    g = anybn.batch_norm_backward(
        x, x, None, rm, 1 / np.sqrt(rv), training=False, comm=_Refuses(), **grad_options
    )
    gref = anybn.batch_norm_backward(
        x, x, None, rm, 1 / np.sqrt(rv), training=False, **grad_options
    )
    np.testing.assert_array_equal(g.dx, gref.dx)


def test_one_channel_axis_as_a_tuple_trains() -> None:
    """axis=(1,) is one channel axis: the same as axis=1, forward and backward."""
    rng = np.random.default_rng(4)
    x, dy = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 3, 2))

    def rank_fn(comm: Communicator) -> Any:
        shard = slice(3 * comm.rank, 3 * comm.rank + 3)
        out = anybn.batch_norm(x[shard], training=True, axis=(1,), comm=comm)
        g = anybn.batch_norm_backward(dy[shard], x[shard], None, out.mean, out.invstd,
                                      axis=(1,), comm=comm)  # fmt: skip
        return out.y, g.dx

    got = _values(ThreadGroup(2).run(rank_fn))
    ref = anybn.batch_norm(x, training=True)
    gref = anybn.batch_norm_backward(dy, x, None, ref.mean, ref.invstd)
    np.testing.assert_allclose(np.concatenate([y for y, _ in got]), ref.y, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([d for _, d in got]), gref.dx, rtol=1e-12, atol=1e-12)


# --- autograd through the synchronized statistics ---------------------------------------------


@pytest.mark.parametrize("splits", [[7], [3, 4], [0, 5, 2]], ids=str)
@pytest.mark.parametrize("axis", [1, -1])
def test_torch_autograd_through_synchronized_statistics(splits: list[int], axis: int) -> None:
    """comm= on tensors that require grad: dx, dweight, dbias (summed over ranks) of a loss
    on y, mean and invstd equal torch autograd through the whole batch's own formula."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(len(splits))
    n, c, eps = sum(splits), 3, 1e-3
    x = 2.0 + rng.normal(size=(n, 4, c) if axis == -1 else (n, c, 4))
    dy = rng.normal(size=x.shape)
    g_mean, g_invstd = rng.normal(size=(len(splits), c)), rng.normal(size=(len(splits), c))
    w, b = rng.uniform(0.5, 2, c), rng.normal(size=c)
    bounds = np.cumsum([0, *splits])
    rm, rv = torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64)

    def rank_fn(comm: Communicator) -> Any:
        r = comm.rank
        xt = torch.from_numpy(x[bounds[r] : bounds[r + 1]]).requires_grad_()
        wt, bt = (torch.from_numpy(a).requires_grad_() for a in (w, b))
        out = anybn.batch_norm(xt, rm, rv, wt, bt, training=True, eps=eps, axis=axis, comm=comm)
        assert out.new_running_mean.grad_fn is None and not out.new_running_var.requires_grad
        loss = (
            (out.y * torch.from_numpy(dy[bounds[r] : bounds[r + 1]])).sum()
            + (out.mean * torch.from_numpy(g_mean[r])).sum()
            + (out.invstd * torch.from_numpy(g_invstd[r])).sum()
        )
        return [t.numpy() for t in torch.autograd.grad(loss, (xt, wt, bt))]

    got = _values(ThreadGroup(len(splits)).run(rank_fn))
    # the oracle: torch's own operations on the concatenated batch, one process
    xt = torch.from_numpy(x).requires_grad_()
    wt, bt = (torch.from_numpy(a).requires_grad_() for a in (w, b))
    dims = (0, 1) if axis == -1 else (0, 2)
    shape = (1, 1, c) if axis == -1 else (1, c, 1)
    mean = xt.mean(dims)
    invstd = torch.rsqrt(xt.var(dims, unbiased=False) + eps)
    y = (xt - mean.view(shape)) * (invstd * wt).view(shape) + bt.view(shape)
    loss = (y * torch.from_numpy(dy)).sum()
    loss = loss + (mean * torch.from_numpy(g_mean.sum(0))).sum()
    loss = loss + (invstd * torch.from_numpy(g_invstd.sum(0))).sum()
    dx, dw, db = (t.numpy() for t in torch.autograd.grad(loss, (xt, wt, bt)))
    close = {"rtol": 1e-10, "atol": 1e-10}
    np.testing.assert_allclose(np.concatenate([g[0] for g in got]), dx, **close)
    np.testing.assert_allclose(sum(g[1] for g in got), dw, **close)
    np.testing.assert_allclose(sum(g[2] for g in got), db, **close)


def test_torch_autograd_only_weight_requires_grad() -> None:
    """Only the parameters require grad: their gradients are this rank's own sums."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    x, dy = rng.normal(size=(6, 3, 2)), rng.normal(size=(6, 3, 2))

    def rank_fn(comm: Communicator) -> Any:
        shard = slice(3 * comm.rank, 3 * comm.rank + 3)
        wt = torch.ones(3, dtype=torch.float64, requires_grad=True)
        y = anybn.batch_norm(torch.from_numpy(x[shard]), weight=wt, training=True, comm=comm).y
        (dw,) = torch.autograd.grad((y * torch.from_numpy(dy[shard])).sum(), (wt,))
        return dw.numpy()

    got = _values(ThreadGroup(2).run(rank_fn))
    ref = anybn.batch_norm(x, training=True)
    gref = anybn.batch_norm_backward(dy, x, None, ref.mean, ref.invstd)
    np.testing.assert_allclose(sum(got), gref.dweight, rtol=1e-12, atol=1e-12)


# --- half precision: the synchronized backward rounds once --------------------------------------


@pytest.mark.parametrize(
    ("lib", "dtype"),
    [("numpy", "float16"), ("torch", "float16"), ("torch", "bfloat16"), ("torch", "float32")],
)
def test_half_precision_backward_rounds_once(lib: str, dtype: str) -> None:
    """dx of the synchronized backward is as close to the float64 formula as the local one."""
    rng = np.random.default_rng(6)
    x64 = 3.0 + rng.normal(size=(16, 4, 8)) * rng.uniform(0.5, 2, (1, 4, 1))
    # dy close to 1 + xhat: dx is a small difference of two large terms
    xhat = (x64 - x64.mean((0, 2), keepdims=True)) / x64.std((0, 2), keepdims=True)
    dy64 = 1.0 + xhat + 0.05 * rng.normal(size=x64.shape)
    w = rng.uniform(0.5, 2, 4)
    if lib == "torch":
        torch = pytest.importorskip("torch")
        conv = lambda a: torch.from_numpy(a).to(getattr(torch, dtype))  # noqa: E731
        back = lambda a: a.double().numpy()  # noqa: E731
        wc = torch.from_numpy(w).float()
        eps_dtype = float(torch.finfo(getattr(torch, dtype)).eps)
    else:
        conv, back, wc = (lambda a: a.astype(dtype)), (lambda a: a.astype(np.float64)), w
        wc = w.astype(np.float32)
        eps_dtype = float(np.finfo(dtype).eps)
    x, dy = conv(x64), conv(dy64)
    xr, dyr = back(x), back(dy)  # the values the half-precision arrays hold
    ref = anybn.batch_norm(xr, weight=w, training=True)
    exact = anybn.batch_norm_backward(dyr, xr, w, ref.mean, ref.invstd).dx

    def rank_fn(comm: Communicator) -> Any:
        shard = slice(8 * comm.rank, 8 * comm.rank + 8)
        out = anybn.batch_norm(x[shard], weight=wc, training=True, comm=comm)
        return back(anybn.batch_norm_backward(
            dy[shard], x[shard], wc, out.mean, out.invstd, comm=comm).dx)  # fmt: skip

    got = np.concatenate(_values(ThreadGroup(2).run(rank_fn)))
    out = anybn.batch_norm(x, weight=wc, training=True)
    local = back(anybn.batch_norm_backward(dy, x, wc, out.mean, out.invstd).dx)
    scale = np.abs(exact).max()
    err_sync, err_local = np.abs(got - exact).max() / scale, np.abs(local - exact).max() / scale
    assert err_sync <= max(2 * err_local, eps_dtype), (err_sync, err_local)


def test_no_process_group_raises_the_rank_own_error() -> None:
    """When the ranks cannot be told (no process group), a failed check is raised as such."""
    pytest.importorskip("torch")
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is initialized in this process")
    with pytest.raises(TypeError, match="mask must be a boolean array") as info:
        anybn.batch_norm(np.ones((4, 2, 3)), training=True, mask=np.ones(3), comm="torch")
    assert isinstance(info.value.__cause__, RuntimeError)
    assert "not initialized" in str(info.value.__cause__)
