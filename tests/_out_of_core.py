"""Run by tests/test_dask.py in a subprocess: normalise a Dask array larger than a memory cap.

Usage: ``python _out_of_core.py GIB CAP_MIB [--cluster]``. The data (``GIB`` GiB of
float32) is generated chunk by chunk; the process's address space may grow by at
most ``CAP_MIB`` MiB beyond what the imports took (``RLIMIT_AS``), so materialising
``x`` (or anything of its size) fails with MemoryError. Prints one JSON line:
the peak resident set size during the computation, and the per-channel sums of
y and running statistics.

``--cluster``: the same graph computed by a ``dask.distributed.LocalCluster`` of two
worker processes on 127.0.0.1 (one thread each), each worker's memory capped at
``CAP_MIB`` MiB by its nanny with spilling off (a worker past its cap is killed and
the computation fails at once), this process being the client: its peak RSS and
each worker's are reported. Everything is bounded by a timeout.
"""

from __future__ import annotations

import json
import resource
import sys

import dask
import dask.array as da
import numpy as np

import anybn


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def _cluster(gib: float, cap_mib: int) -> None:
    from dask.distributed import Client, LocalCluster, wait

    dask.config.set({
        "distributed.worker.memory.target": False,  # no spilling: the cap is real
        "distributed.worker.memory.spill": False,
        "distributed.worker.memory.pause": False,
        "distributed.worker.memory.terminate": 0.95,
        "distributed.scheduler.allowed-failures": 0,  # a killed worker fails the graph
    })  # fmt: skip
    channels, inner = 8, 4096
    n = int(gib * 2**30 / 4) // (channels * inner)
    with (
        LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, memory_limit=f"{cap_mib}MiB",
        ) as cluster,
        Client(cluster, timeout="60s") as client,
    ):  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        started = client.run(lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        rng = da.random.default_rng(20261126)
        x = rng.standard_normal(
            (n, channels, inner), chunks=(64, channels, inner), dtype=np.float32
        )
        x = x * np.float32(3.0) + np.float32(100.0)
        out = anybn.batch_norm(
            x, np.zeros(channels, np.float32), np.ones(channels, np.float32), training=True
        )
        y_sum = da.sum(out.y.astype(np.float64), axis=(0, 2))
        y_sq = da.sum(out.y.astype(np.float64) ** 2, axis=(0, 2))
        futures = client.compute([y_sum, y_sq, out.new_running_mean, out.new_running_var])
        wait(futures, timeout=600)
        s, sq, rm, rv = client.gather(futures)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        workers = client.run(
            lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        )
    count = n * inner
    print(json.dumps({
        "x_bytes": int(x.nbytes), "rss_before": before, "rss_peak": peak,
        "worker_peaks": sorted(workers.values()), "worker_starts": sorted(started.values()),
        "cap": cap_mib * 2**20,
        "y_mean": (s / count).tolist(), "y_var": (sq / count).tolist(),
        "running_mean": rm.tolist(), "running_var": rv.tolist(),
    }))  # fmt: skip


def main() -> None:
    gib, cap_mib = float(sys.argv[1]), int(sys.argv[2])
    if "--cluster" in sys.argv[3:]:
        _cluster(gib, cap_mib)
        return
    channels, inner = 8, 4096
    n = int(gib * 2**30 / 4) // (channels * inner)
    rng = da.random.default_rng(20261126)
    x = rng.standard_normal((n, channels, inner), chunks=(64, channels, inner), dtype=np.float32)
    x = x * np.float32(3.0) + np.float32(100.0)
    assert x.nbytes >= gib * 2**30 * 0.99
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    limit = _vm_bytes() + cap_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    out = anybn.batch_norm(
        x, np.zeros(channels, np.float32), np.ones(channels, np.float32), training=True
    )
    y_sum = da.sum(out.y.astype(np.float64), axis=(0, 2))
    y_sq = da.sum(out.y.astype(np.float64) ** 2, axis=(0, 2))
    with dask.config.set(scheduler="synchronous"):
        s, sq, rm, rv = dask.compute(y_sum, y_sq, out.new_running_mean, out.new_running_var)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    count = n * inner
    print(json.dumps({
        "x_bytes": int(x.nbytes), "rss_before": before, "rss_peak": peak,
        "y_mean": (s / count).tolist(), "y_var": (sq / count).tolist(),
        "running_mean": rm.tolist(), "running_var": rv.tolist(),
    }))  # fmt: skip


if __name__ == "__main__":  # (the guard also keeps the cluster's worker processes out)
    main()
