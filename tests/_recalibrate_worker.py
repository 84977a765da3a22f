"""One rank of a distributed recalibration test: run by tests/test_recalibrate_distributed.py.

Usage: ``python _recalibrate_worker.py ENGINE SCENARIO WORKDIR``, ENGINE ``gloo`` or
``mpi`` as in ``_dist_worker.py`` (whose :class:`Rank` sets up the group). The test
writes ``WORKDIR/inputs.npz``: the batches (``batch0``, ``batch1``, ...) and which of them
each rank gets (``rank{r}``, an index array, possibly empty).

Scenarios
---------
``recalibrate``  both methods, on an ``anybn.BatchNorm`` (NumPy) and a torch model.
``fault``        the last rank's batches include a bad one: every rank must raise, and
                 no rank change its layer.
"""

from __future__ import annotations

import faulthandler
import sys
from pathlib import Path
from typing import Any

import numpy as np
from _dist_worker import Rank, shutdown, to_numpy

METHODS = ("exact", "cumulative")


def layer() -> Any:
    import anybn

    bn = anybn.BatchNorm(3, xp=np, dtype="float64")
    bn.load_state_dict({"weight": np.array([1.5, 0.5, 2.0]), "bias": np.array([0.1, -1.0, 3.0]),
                        "running_mean": np.zeros(3), "running_var": np.ones(3),
                        "num_batches_tracked": 99})  # fmt: skip
    return bn


def model(torch: Any) -> Any:
    """A conv, a batch norm, an activation, a second batch norm: its inputs depend on the
    first one's batch statistics."""
    nn = torch.nn
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv1d(3, 4, 1), nn.BatchNorm1d(4), nn.ReLU(), nn.Conv1d(4, 2, 1), nn.BatchNorm1d(2)
    ).double().eval()


def my_batches(r: Rank, data: dict) -> list[np.ndarray]:
    return [data[f"batch{i}"] for i in data[f"rank{r.rank}"]]


def run_recalibrate(r: Rank, data: dict) -> None:
    import torch

    import anybn
    import anybn.torch

    torch.set_num_threads(1)
    batches = my_batches(r, data)
    for method in METHODS:
        bn = layer()
        anybn.recalibrate(bn, batches, layers=bn, method=method, comm=r.comm)
        for key, value in bn.state_dict().items():
            r.arrays[f"layer-{method}:{key}"] = to_numpy(value)
        m = model(torch)
        anybn.torch.recalibrate(m, [torch.from_numpy(b) for b in batches], method=method,
                                comm=r.comm)  # fmt: skip
        for key, value in m.state_dict().items():
            r.arrays[f"model-{method}:{key}"] = to_numpy(value)


def run_fault(r: Rank, data: dict) -> None:
    import anybn

    batches = my_batches(r, data)
    if r.rank == r.size - 1:
        batches = [*batches, np.ones((1, 3))]  # one value per channel: this rank raises
    bn = layer()
    r.attempt("fault", lambda: anybn.recalibrate(bn, batches, layers=bn, comm=r.comm))
    for key, value in bn.state_dict().items():
        r.arrays[f"fault:{key}"] = to_numpy(value)
    # the group is still usable: a good recalibration afterwards pairs on every rank
    bn = layer()
    anybn.recalibrate(bn, my_batches(r, data), layers=bn, comm=r.comm)
    r.arrays["after:running_mean"] = to_numpy(bn.running_mean)


def main() -> None:
    faulthandler.enable()
    engine, scenario, workdir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
    r = Rank(engine, workdir)
    data = dict(np.load(workdir / "inputs.npz"))
    try:
        {"recalibrate": run_recalibrate, "fault": run_fault}[scenario](r, data)
        r.report["done"] = True
        r.save()
    finally:
        if engine == "gloo":
            shutdown(r, scenario)


if __name__ == "__main__":
    main()
