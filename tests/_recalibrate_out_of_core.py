"""Run by tests/test_recalibrate.py in a subprocess: recalibrate a layer on a Dask array larger
than a memory cap, in one pass.

Usage: ``python _recalibrate_out_of_core.py GIB CAP_MIB``. The data (``GIB`` GiB of
float32, mean 100 and standard deviation 3 per channel) is generated chunk by chunk, and
every chunk generated is counted; the process's address space may grow by at most
``CAP_MIB`` MiB beyond what the imports took (``RLIMIT_AS``), so materialising the array
fails. Prints one JSON line: the number of chunks and of chunk generations, the peak
resident set size, and the statistics with a float64 reference computed chunk by chunk
afterwards.
"""

from __future__ import annotations

import json
import resource
import sys
import threading
from typing import Any

import dask.array as da
import numpy as np
from _out_of_core import _vm_bytes  # (this directory is the script's: on sys.path)

import anybn

CHANNELS, INNER, ROWS = 8, 4096, 64
_made: list[Any] = []
_lock = threading.Lock()


def _chunk(i: int) -> np.ndarray:
    rng = np.random.default_rng(1000 + i)
    return (rng.standard_normal((ROWS, CHANNELS, INNER), dtype=np.float32) * np.float32(3.0)
            + np.float32(100.0))  # fmt: skip


def _generated(block_id: Any = None) -> np.ndarray:
    with _lock:
        _made.append(block_id)
    return _chunk(block_id[0])


def main() -> None:
    gib, cap_mib = float(sys.argv[1]), int(sys.argv[2])
    chunks = int(gib * 2**30 / 4) // (ROWS * CHANNELS * INNER)
    x = da.map_blocks(_generated, chunks=((ROWS,) * chunks, (CHANNELS,), (INNER,)),
                      dtype=np.float32, meta=np.empty((0, 0, 0), np.float32))  # fmt: skip
    assert x.nbytes >= gib * 2**30 * 0.99
    bn = anybn.BatchNorm(CHANNELS)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    limit = _vm_bytes() + cap_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    anybn.recalibrate(bn, [x], layers=bn)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    made = len(_made)
    n, mean, m2 = 0, np.zeros(CHANNELS), np.zeros(CHANNELS)  # the reference, chunk by chunk
    for i in range(chunks):
        c = _chunk(i).astype(np.float64)
        cn = c.shape[0] * c.shape[2]
        cmean = c.mean((0, 2))
        cm2 = ((c - cmean.reshape(1, -1, 1)) ** 2).sum((0, 2))
        delta = cmean - mean
        mean = mean + delta * cn / (n + cn)
        m2 = m2 + cm2 + delta**2 * n * cn / (n + cn)
        n += cn
    print(json.dumps({
        "x_bytes": int(x.nbytes), "chunks": chunks, "generated": made,
        "rss_before": before, "rss_peak": peak,
        "running_mean": np.asarray(bn.running_mean).tolist(),
        "running_var": np.asarray(bn.running_var).tolist(),
        "num_batches_tracked": bn.num_batches_tracked,
        "mean": mean.tolist(), "var": (m2 / (n - 1)).tolist(),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
