"""Run by tests/test_dask.py in a subprocess: normalise a Dask array larger than a memory cap.

Usage: ``python _out_of_core.py GIB CAP_MIB``. The data (``GIB`` GiB of float32)
is generated chunk by chunk; the process's address space may grow by at most
``CAP_MIB`` MiB beyond what the imports took (``RLIMIT_AS``), so materialising
``x`` (or anything of its size) fails with MemoryError. Prints one JSON line:
the peak resident set size during the computation, and the per-channel sums of
y and running statistics.
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


def main() -> None:
    gib, cap_mib = float(sys.argv[1]), int(sys.argv[2])
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


if __name__ == "__main__":
    main()
