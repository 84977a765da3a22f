"""One rank of a distributed test: run by tests/test_distributed.py, never collected.

Usage: ``python _dist_worker.py ENGINE SCENARIO WORKDIR`` where ENGINE is ``gloo``
(torch.distributed; RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT in the environment)
or ``mpi`` (started by ``mpiexec``; mpi4py's COMM_WORLD). The test writes
``WORKDIR/inputs.npz``; each rank writes ``WORKDIR/rank{r}.npz`` (arrays) and
``WORKDIR/rank{r}.json`` (what it raised, and ``"done": true`` as its last act).

Scenarios
---------
``exact``   every variant of :data:`VARIANTS` on this rank's shard of the batch.
``faults``  the recoverable fault cases, one after another on the same group.
``dead``    the last rank exits before the collective; the others must raise.
``late``    a live rank that comes after the deadline (``timeout=``): every rank raises
            CollectiveTimeout in time, and the group stays usable.
``ddp``     20 DistributedDataParallel steps of :func:`make_cnn` with SyncBatchNorm.
``single``  a group of one rank: everything behaves as local batch norm.
``masked``  every variant of :data:`MASKED_VARIANTS`: ``mask=`` (one rank's mask all
            False), several channel axes, the biased estimator; the layer and the module.
"""

from __future__ import annotations

import datetime
import faulthandler
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np

#: Seconds any collective may wait before raising (the process group's timeout).
COLLECTIVE_TIMEOUT = float(os.environ.get("ANYBN_TEST_COLLECTIVE_TIMEOUT", "20"))

#: (name, library, dtype, input key): every variant the ``exact`` scenario runs. x3 and
#: x2 are offset (by 50 and -20) so that the mean matters: float32 holds the mean of x3
#: only to 4e-6, and the synchronized forward must still match the single-process one
#: to 1e-6 (it sends each rank's mean as a first-pass mean and its correction).
#: bfloat16 runs on x3c, near zero.
VARIANTS = [
    ("numpy-float64", "numpy", "float64", "x3"),
    ("numpy-float32", "numpy", "float32", "x3"),
    ("numpy-float64-2d", "numpy", "float64", "x2"),
    ("torch-float64", "torch", "float64", "x3"),
    ("torch-float32", "torch", "float32", "x3"),
    ("torch-bfloat16", "torch", "bfloat16", "x3c"),
]
#: (name, library, dtype, options) of the ``masked`` scenario, on x3 with the mask mask3.
MASKED_VARIANTS = [
    ("numpy-float64", "numpy", "float64", {}),
    ("numpy-float32", "numpy", "float32", {}),
    ("numpy-float64-axes", "numpy", "float64", {"axis": (1, 2)}),
    ("numpy-float64-biased", "numpy", "float64", {"var_estimator": "biased"}),
    ("numpy-float64-last-biased", "numpy", "float64", {"axis": -1, "var_estimator": "biased"}),
    ("torch-float64", "torch", "float64", {}),
    ("torch-float32-axes-biased", "torch", "float32", {"axis": (1, 2), "var_estimator": "biased"}),
]
MOMENTUM, EPS = 0.3, 1e-3
#: The batch every rank normalizes after a fault (mean 5 per channel, on every rank).
SAME_BATCH = 5.0 + np.array([[-1.0], [1.0]]) * np.ones((2, 3))
#: The fault cases that fail a local check of one rank only (see run_faults).
ONE_RANK_FAULTS = (
    "mask", "axes", "biased", "backward_mask", "backward_axes", "layer_mask", "layer_biased",
)  # fmt: skip
DDP_STEPS, DDP_BATCH, DDP_LR = 20, 8, 0.1
#: The deadline of the ``late`` scenario's calls; a late rank sleeps 1.5 times as long.
LATE_TIMEOUT = float(os.environ.get("ANYBN_TEST_LATE_TIMEOUT", "4"))
#: The late-scenario steps and the rank that comes late in each (-1: the last rank).
LATE_STEPS = (
    ("forward", -1), ("layer", -1), ("backward", -1), ("rank0_late", 0), ("module", -1),
)  # fmt: skip


def shard_bounds(splits: list[int], rank: int) -> tuple[int, int]:
    start = sum(splits[:rank])
    return start, start + splits[rank]


def make_inputs(splits: list[int], channels: int = 3, length: int = 4, seed: int = 0) -> dict:
    """The full batch (float64, offset so that the mean matters), its gradient and parameters."""
    rng = np.random.default_rng(seed)
    n = sum(splits)
    data = {
        "splits": np.asarray(splits),
        "x3": 50.0 + rng.normal(size=(n, channels, length)) * rng.uniform(0.5, 2, (1, channels, 1)),
        "dy3": rng.normal(size=(n, channels, length)),
        "x3c": rng.normal(size=(n, channels, length)) + rng.uniform(-1, 1, (1, channels, 1)),
        "x2": -20.0 + rng.normal(size=(n, channels)),
        "dy2": rng.normal(size=(n, channels)),
        "weight": rng.uniform(0.5, 1.5, channels),
        "bias": rng.normal(size=channels),
        "running_mean": rng.normal(size=channels),
        "running_var": rng.uniform(0.5, 2.0, channels),
    }
    # a gradient close to 1 + xhat: dx is a small difference of large terms (half precision)
    x = data["x3c"]
    xhat = (x - x.mean((0, 2), keepdims=True)) / x.std((0, 2), keepdims=True)
    data["dy3c"] = 1.0 + xhat + 0.05 * rng.normal(size=x.shape)
    # the mask: the first rank's shard all False (it contributes nothing), padding NaN
    mask = rng.uniform(size=(n, channels, length)) < 0.7
    mask[: splits[0]] = False
    data["mask3"] = mask
    data["x3m"] = np.where(mask, data["x3"], np.nan)
    data["dy3m"] = np.where(mask, data["dy3"], 0.0)  # the loss ignores the padding
    return data


def make_cnn(torch: Any, sync: bool) -> Any:
    """A small CNN (float64) with two batch norms: anybn's SyncBatchNorm or BatchNorm2d/1d."""
    import anybn.torch as abt

    nn = torch.nn
    torch.manual_seed(0)
    bn2 = abt.SyncBatchNorm if sync else abt.BatchNorm2d
    bn1 = abt.SyncBatchNorm if sync else abt.BatchNorm1d
    return nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1),
        bn2(6),
        nn.ReLU(),
        nn.Conv2d(6, 8, 3, stride=2),
        bn2(8, momentum=None),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        bn1(8),
        nn.Linear(8, 2),
    ).double()


def ddp_batch(step: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1000 + step)
    return 3.0 + 2.0 * rng.normal(size=(DDP_BATCH, 3, 9, 9)), rng.normal(size=(DDP_BATCH, 2))


def train_cnn(torch: Any, model: Any, rank: int, world: int) -> None:
    """DDP_STEPS SGD steps on this rank's equal share of each batch (mean squared error)."""
    opt = torch.optim.SGD(model.parameters(), lr=DDP_LR, momentum=0.9)
    per_rank = DDP_BATCH // world
    for step in range(DDP_STEPS):
        x, t = ddp_batch(step)
        lo, hi = rank * per_rank, (rank + 1) * per_rank
        opt.zero_grad()
        out = model(torch.from_numpy(x[lo:hi]))
        loss = ((out - torch.from_numpy(t[lo:hi])) ** 2).mean()
        loss.backward()
        opt.step()


# --- running a scenario ---------------------------------------------------------------


class Rank:
    """This process: its rank, the group size, the communicator and what it records."""

    def __init__(self, engine: str, workdir: Path) -> None:
        self.engine, self.workdir = engine, workdir
        self.arrays: dict[str, np.ndarray] = {}
        self.report: dict[str, Any] = {"done": False}
        if engine == "gloo":
            import torch
            import torch.distributed as dist

            torch.set_num_threads(1)
            dist.init_process_group(
                "gloo",
                rank=int(os.environ["RANK"]),
                world_size=int(os.environ["WORLD_SIZE"]),
                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT),
            )
            self.rank, self.size = dist.get_rank(), dist.get_world_size()
            self.comm: Any = dist.group.WORLD
        else:
            from mpi4py import MPI

            self.comm = MPI.COMM_WORLD
            self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()

    def save(self) -> None:
        np.savez(self.workdir / f"rank{self.rank}.npz", **self.arrays)
        (self.workdir / f"rank{self.rank}.json").write_text(json.dumps(self.report))

    def attempt(self, name: str, fn: Any) -> None:
        """Run ``fn``; record the type and message of what it raises under ``name``."""
        try:
            fn()
        except Exception as exc:
            self.report[name] = [type(exc).__name__, str(exc)]
        else:
            self.report[name] = None


def to_numpy(a: Any) -> np.ndarray:
    if hasattr(a, "detach"):
        return a.detach().double().numpy()
    return np.asarray(a, dtype=np.float64)


def as_lib(a: np.ndarray, lib: str, dtype: str) -> Any:
    if lib == "numpy":
        return a.astype(dtype)
    import torch

    return torch.from_numpy(a).to(getattr(torch, dtype))


def run_exact(r: Rank, data: dict) -> None:
    import anybn

    lo, hi = shard_bounds(list(data["splits"]), r.rank)
    for name, lib, dtype, key in VARIANTS:
        x = as_lib(data[key][lo:hi], lib, dtype)
        dy = as_lib(data["dy" + key[1]][lo:hi], lib, dtype)
        pdt = "float32" if dtype == "bfloat16" else dtype
        w, b, rm, rv = (
            as_lib(data[k], lib, pdt) for k in ("weight", "bias", "running_mean", "running_var")
        )
        out = anybn.batch_norm(
            x, rm, rv, w, b, training=True, momentum=MOMENTUM, eps=EPS, comm=r.comm
        )
        grads = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, comm=r.comm)
        fields = zip(out._fields + grads._fields, tuple(out) + tuple(grads), strict=True)
        for field, value in fields:
            r.arrays[f"{name}:{field}"] = to_numpy(value)
        r.report[f"{name}:dtypes"] = [str(out.mean.dtype), str(out.y.dtype)]

    # The layer, twice, numpy float64: running stats and the counter on every rank.
    x = data["x3"][lo:hi]
    bn = anybn.BatchNorm(3, momentum=None, eps=EPS, comm=r.comm)
    for step in range(2):
        y = bn(x + step)
        g = bn.backward(data["dy3"][lo:hi])
    r.arrays["layer:y"], r.arrays["layer:dx"] = y, g.dx
    r.arrays["layer:dweight"], r.arrays["layer:dbias"] = g.dweight, g.dbias
    r.arrays["layer:running_mean"], r.arrays["layer:running_var"] = bn.running_mean, bn.running_var
    r.report["layer:num_batches_tracked"] = bn.num_batches_tracked

    if r.engine == "gloo":  # the torch module, float64, with autograd
        import torch

        import anybn.torch as abt

        m = abt.SyncBatchNorm(3, eps=EPS, momentum=MOMENTUM).double()
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(data["weight"]))
            m.bias.copy_(torch.from_numpy(data["bias"]))
            m.running_mean.copy_(torch.from_numpy(data["running_mean"]))
            m.running_var.copy_(torch.from_numpy(data["running_var"]))
        xt = torch.from_numpy(data["x3"][lo:hi]).requires_grad_()
        y = m(xt)
        y.backward(torch.from_numpy(data["dy3"][lo:hi]))
        r.arrays["module:y"], r.arrays["module:dx"] = to_numpy(y), to_numpy(xt.grad)
        r.arrays["module:dweight"] = to_numpy(m.weight.grad)
        r.arrays["module:dbias"] = to_numpy(m.bias.grad)
        r.arrays["module:new_running_mean"] = to_numpy(m.running_mean)
        r.arrays["module:new_running_var"] = to_numpy(m.running_var)
        r.report["module:num_batches_tracked"] = int(m.num_batches_tracked)

        # momentum outside [0, 1], accepted by nn.SyncBatchNorm: only the update uses it
        m = abt.SyncBatchNorm(3, eps=EPS, momentum=1.5).double()
        m(torch.from_numpy(data["x3"][lo:hi]))
        r.arrays["momentum:running_mean"] = to_numpy(m.running_mean)
        r.arrays["momentum:running_var"] = to_numpy(m.running_var)

        # half-precision input, float32 parameters (autocast's layout)
        for half in ("float16", "bfloat16"):
            m = abt.SyncBatchNorm(3, eps=EPS)
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(data["weight"]))
                m.bias.copy_(torch.from_numpy(data["bias"]))
            xh = torch.from_numpy(data["x3c"][lo:hi]).to(getattr(torch, half)).requires_grad_()
            y = m(xh)
            y.backward(torch.from_numpy(data["dy3c"][lo:hi]).to(xh.dtype))
            r.arrays[f"half-{half}:y"], r.arrays[f"half-{half}:dx"] = to_numpy(y), to_numpy(xh.grad)


def masked_shape(options: dict[str, Any]) -> tuple[int, ...]:
    """The per-channel shape of a masked variant on x3 ``(N, 3, 4)``."""
    return {(1, 2): (3, 4), -1: (4,)}.get(options.get("axis", 1), (3,))


def run_masked(r: Rank, data: dict) -> None:
    """mask=, several channel axes, the biased estimator: functional, layer, module."""
    import anybn

    lo, hi = shard_bounds(list(data["splits"]), r.rank)
    mask = data["mask3"][lo:hi]
    for name, lib, dtype, options in MASKED_VARIANTS:
        x, dy = (as_lib(data[k][lo:hi], lib, dtype) for k in ("x3m", "dy3m"))
        m = as_lib(mask, lib, "bool") if lib == "torch" else mask
        shape = masked_shape(options)
        rm = as_lib(np.full(shape, 0.5), lib, dtype)
        rv = as_lib(np.full(shape, 2.0), lib, dtype)
        out = anybn.batch_norm(x, rm, rv, training=True, momentum=MOMENTUM, eps=EPS, mask=m,
                               comm=r.comm, **options)  # fmt: skip
        axis = options.get("axis", 1)
        grads = anybn.batch_norm_backward(dy, x, None, out.mean, out.invstd, mask=m, axis=axis,
                                          comm=r.comm)  # fmt: skip
        fields = zip(out._fields + grads._fields, tuple(out) + tuple(grads), strict=True)
        for field, value in fields:
            r.arrays[f"{name}:{field}"] = to_numpy(value)

    # The layer, twice, numpy float64, biased, two channel axes
    bn = anybn.BatchNorm((3, 4), axis=(1, 2), momentum=None, eps=EPS, comm=r.comm,
                         var_estimator="biased")  # fmt: skip
    for step in range(2):
        y = bn(data["x3m"][lo:hi] + step, mask=mask)
        g = bn.backward(data["dy3m"][lo:hi])
    r.arrays["layer:y"], r.arrays["layer:dx"] = y, g.dx
    r.arrays["layer:dweight"], r.arrays["layer:dbias"] = g.dweight, g.dbias
    r.arrays["layer:running_mean"], r.arrays["layer:running_var"] = bn.running_mean, bn.running_var
    r.report["layer:num_batches_tracked"] = bn.num_batches_tracked

    if r.engine == "gloo":  # the torch module, float64, autograd; a (N, L) mask
        import torch

        import anybn.torch as abt

        m = abt.SyncBatchNorm(3, eps=EPS, momentum=MOMENTUM).double()
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(data["weight"]))
            m.bias.copy_(torch.from_numpy(data["bias"]))
        xt = torch.from_numpy(data["x3"][lo:hi]).requires_grad_()
        y = m(xt, mask=torch.from_numpy(mask[:, 0, :]))
        y.backward(torch.from_numpy(data["dy3"][lo:hi]))
        r.arrays["module:y"], r.arrays["module:dx"] = to_numpy(y), to_numpy(xt.grad)
        r.arrays["module:dweight"] = to_numpy(m.weight.grad)
        r.arrays["module:dbias"] = to_numpy(m.bias.grad)
        r.arrays["module:new_running_mean"] = to_numpy(m.running_mean)
        r.arrays["module:new_running_var"] = to_numpy(m.running_var)
        r.report["module:num_batches_tracked"] = int(m.num_batches_tracked)


def run_faults(r: Rank, data: dict) -> None:
    import anybn

    rng = np.random.default_rng(r.rank)
    rm, rv = np.zeros(3), np.ones(3)

    def fwd(x: Any, **kw: Any) -> None:
        anybn.batch_norm(x, rm, rv, training=True, comm=r.comm, **kw)

    last = r.rank == r.size - 1
    r.attempt("channels", lambda: fwd(rng.normal(size=(4, 4 if last else 3, 2))))
    other = "float32" if last else "float64"
    r.attempt("dtype", lambda: fwd(rng.normal(size=(4, 3, 2)).astype(other)))
    r.attempt(
        "local_check", lambda: fwd(rng.normal(size=(4, 3, 2)), weight=np.ones(2 if last else 3))
    )
    r.attempt("count", lambda: fwd(rng.normal(size=(1 if r.rank == 0 else 0, 3))))
    r.attempt(
        "backward_channels",
        lambda: anybn.batch_norm_backward(
            *(2 * [rng.normal(size=(4, 4 if last else 3))]),
            None, np.zeros(4 if last else 3), np.ones(4 if last else 3), comm=r.comm,
        ),
    )  # fmt: skip
    r.arrays["running_mean"], r.arrays["running_var"] = rm, rv

    # Options checked before the header, failing on one rank only; after each, every
    # rank normalizes the same batch (mean 5): the next call must pair correctly.
    x3 = rng.normal(size=(4, 3, 2))
    one_rank = {
        "mask": lambda: fwd(x3, mask=np.ones(x3.shape, bool) if last else None),
        "axes": lambda: fwd(x3, axis=(1, 2) if last else 1),
        "biased": lambda: fwd(x3, var_estimator="biased" if last else "unbiased"),
        "backward_mask": lambda: anybn.batch_norm_backward(
            x3,
            x3,
            None,
            np.zeros(3),
            np.ones(3),
            comm=r.comm,
            mask=np.ones(x3.shape, bool) if last else None,
        ),
        "backward_axes": lambda: anybn.batch_norm_backward(
            x3,
            x3,
            None,
            np.zeros(3),
            np.ones(3),
            comm=r.comm,
            axis=(1, 2) if last else (1,),
        ),
        "layer_mask": lambda: anybn.BatchNorm(3, comm=r.comm)(
            x3, mask=np.ones(x3.shape, bool) if last else None
        ),
        "layer_biased": lambda: anybn.BatchNorm(
            3, comm=r.comm, var_estimator="biased" if last else "unbiased"
        )(x3),
    }
    same = SAME_BATCH
    assert tuple(one_rank) == ONE_RANK_FAULTS
    for name, call in one_rank.items():
        r.attempt(f"one_rank_{name}", call)
        out = anybn.batch_norm(same, training=True, comm=r.comm)
        r.arrays[f"one_rank_{name}:mean"] = out.mean

    # The layer: a failed synchronized forward leaves its state as it was.
    bn = anybn.BatchNorm(3, comm=r.comm)
    bn(rng.normal(size=(4, 3)))
    before = (bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked)
    r.attempt("layer_dtype", lambda: bn(rng.normal(size=(4, 3)).astype(other)))
    # The layer's own check (channels vs num_features) fails on one rank: all raise.
    r.attempt("layer_channels", lambda: bn(rng.normal(size=(4, 4 if last else 3))))
    r.report["layer_unchanged"] = bool(
        np.array_equal(before[0], bn.running_mean)
        and np.array_equal(before[1], bn.running_var)
        and before[2] == bn.num_batches_tracked
    )

    if r.engine == "gloo":  # the torch module: a rank with another channel count
        import torch

        import anybn.torch as abt

        m = abt.SyncBatchNorm(3).double()
        m(torch.from_numpy(rng.normal(size=(4, 3, 2))))
        state = {k: v.clone() for k, v in m.state_dict().items()}
        x = torch.from_numpy(rng.normal(size=(4, 4 if last else 3, 2)))
        r.attempt("module_channels", lambda: m(x))
        # The module's own input check fails on one rank (1-D input): all raise.
        x1 = torch.from_numpy(rng.normal(size=(3,) if last else (4, 3, 2)))
        r.attempt("module_ndim", lambda: m(x1))
        # forward-mode AD on one rank only: refused on every rank, before any collective
        import torch.autograd.forward_ad as fwAD

        xf = torch.from_numpy(rng.normal(size=(4, 3, 2)))
        with fwAD.dual_level():
            dual = fwAD.make_dual(xf, torch.ones_like(xf)) if last else xf
            r.attempt("module_forward_ad", lambda: m(dual))
        r.report["module_unchanged"] = all(
            torch.equal(state[k], v) for k, v in m.state_dict().items()
        )
        r.arrays["module_after"] = to_numpy(m(torch.from_numpy(same[:, :, None])))
    # The group still works after all of the above.
    out = anybn.batch_norm(rng.normal(size=(4, 3)), training=True, comm=r.comm)
    r.arrays["after"] = out.mean


def run_dead(r: Rank, data: dict) -> None:
    import anybn

    if r.rank == r.size - 1:
        sys.stdout.flush()
        os._exit(17)
    rm, rv = np.zeros(3), np.ones(3)
    r.attempt(
        "forward",
        lambda: anybn.batch_norm(np.ones((4, 3)), rm, rv, training=True, comm=r.comm, timeout=5),
    )
    r.arrays["running_mean"], r.arrays["running_var"] = rm, rv


def run_late(r: Rank, data: dict) -> None:
    """A live rank sleeps past the deadline before each call: every rank raises
    CollectiveTimeout within the deadline (the late one as soon as it comes), nothing
    is updated, and the next calls pair as before (a call with a long timeout after each).
    """
    import time

    import anybn
    from anybn.distributed.deadline import GRACE

    t = LATE_TIMEOUT
    rng = np.random.default_rng(r.rank)
    x, dy = rng.normal(size=(4, 3)), rng.normal(size=(4, 3))
    rm, rv = np.zeros(3), np.ones(3)

    def aligned(name: str) -> None:
        # every rank normalizes SAME_BATCH (mean 5): the call after a fault must pair
        out = anybn.batch_norm(SAME_BATCH, training=True, comm=r.comm, timeout=120)
        r.arrays[f"{name}:after"] = out.mean

    aligned("start")  # (MPI: the first call also duplicates the communicator)
    bn = anybn.BatchNorm(3, comm=r.comm, timeout=t)
    grads_of = anybn.batch_norm(x, training=True, comm=r.comm, timeout=120)
    calls = {
        "forward": lambda: anybn.batch_norm(x, rm, rv, training=True, comm=r.comm, timeout=t),
        "layer": lambda: bn(x),
        "backward": lambda: anybn.batch_norm_backward(
            dy, x, None, grads_of.mean, grads_of.invstd, comm=r.comm, timeout=t
        ),
        "rank0_late": lambda: anybn.batch_norm(x, training=True, comm=r.comm, timeout=t),
    }
    if r.engine == "gloo":
        import torch

        import anybn.torch as abt

        module = abt.SyncBatchNorm(3, timeout=t).double()
        calls["module"] = lambda: module(torch.from_numpy(x))
    for name, late_rank in LATE_STEPS:
        if name not in calls:
            continue
        late = r.rank == (late_rank % r.size)
        if late:
            time.sleep(1.5 * t + (GRACE if late_rank == 0 else 0.0))
        start = time.monotonic()
        r.attempt(name, calls[name])
        r.report[f"{name}:seconds"] = time.monotonic() - start
        aligned(name)
    r.arrays["running_mean"], r.arrays["running_var"] = rm, rv
    r.report["layer_unchanged"] = bn.num_batches_tracked == 0 and bool(
        np.array_equal(bn.running_mean, np.zeros(3))
    )
    if r.engine == "gloo":
        r.report["module_unchanged"] = int(module.num_batches_tracked) == 0


def run_single(r: Rank, data: dict) -> None:
    """A group of one rank: the module is local batch norm; comm= the group equals None."""
    import torch

    import anybn
    import anybn.torch as abt

    x = data["x3"]
    sync, local = abt.SyncBatchNorm(3).double(), abt.BatchNorm1d(3).double()
    xt = torch.from_numpy(x)
    r.arrays["module:y"], r.arrays["local:y"] = to_numpy(sync(xt)), to_numpy(local(xt))
    r.arrays["module:running_var"] = to_numpy(sync.running_var)
    r.arrays["local:running_var"] = to_numpy(local.running_var)
    out = anybn.batch_norm(x, training=True, comm=r.comm)
    r.arrays["comm:y"], r.arrays["none:y"] = out.y, anybn.batch_norm(x, training=True).y


def run_ddp(r: Rank, data: dict) -> None:
    import torch

    model = torch.nn.parallel.DistributedDataParallel(make_cnn(torch, sync=True))
    train_cnn(torch, model, r.rank, r.size)
    for k, v in model.module.state_dict().items():
        r.arrays[k] = to_numpy(v)


def shutdown(r: Rank, scenario: str) -> None:
    """End the gloo group in order: every rank past its last collective, then destroyed.

    A rank that exits (or lets the interpreter tear the group down) while a peer's
    collective or gloo's worker threads still run can be killed by SIGABRT
    ("terminate called without an active exception"); the barrier makes every rank
    wait until all have finished, so no work is pending when the group goes.
    ``dead``: a peer is gone, so no barrier (it would only time out).
    """
    import torch.distributed as dist

    if not dist.is_initialized():
        return
    try:
        if scenario != "dead":
            dist.barrier()
    finally:
        dist.destroy_process_group()


def main() -> None:
    faulthandler.enable()  # a fatal signal prints every thread's Python stack
    engine, scenario, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    r = Rank(engine, workdir)
    data = dict(np.load(workdir / "inputs.npz")) if (workdir / "inputs.npz").exists() else {}
    try:
        {
            "exact": run_exact,
            "faults": run_faults,
            "dead": run_dead,
            "late": run_late,
            "ddp": run_ddp,
            "single": run_single,
            "masked": run_masked,
        }[scenario](r, data)
        r.report["done"] = True
        r.save()
    finally:
        if engine == "gloo":
            shutdown(r, scenario)


if __name__ == "__main__":
    main()
