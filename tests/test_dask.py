"""Dask: lazy, chunked, out of core; NumPy vectors beside Dask x; unknown chunk sizes.

Also pydata-sparse x with NumPy vectors (the other wrapping library) and the
mixes that stay TypeErrors. Where ``dask.distributed`` is installed, the forward,
the backward, the layer and the out-of-core run also compute on a ``LocalCluster``
of two worker processes on 127.0.0.1: the graphs must pickle, and the data stays
on the workers (what comes back to the client is the per-channel results).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anybn

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")


def _data(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(50.0, 4.0, size=(9, 3, 10))


class _NoCompute:
    """A scheduler that fails the test if anything is computed."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError("anybn computed a Dask array during the call")


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("axis", [1, (1, 2)], ids=["axis1", "axes12"])
def test_lazy_and_equal_to_numpy(masked: bool, axis: Any) -> None:
    xn = _data()
    mask_n = xn > 48.0 if masked else None
    pshape = (3,) if axis == 1 else (3, 10)
    x = da.from_array(xn, chunks=(2, 3, 4))
    mask = None if mask_n is None else da.from_array(mask_n, chunks=(5, 1, 10))
    rm, rv, w, b = np.zeros(pshape), np.ones(pshape), np.full(pshape, 2.0), np.full(pshape, 0.5)
    with dask.config.set(scheduler=_NoCompute()):
        out = anybn.batch_norm(x, rm, rv, w, b, training=True, axis=axis, mask=mask)
        dy = x * 0.1
        grads = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, axis=axis, mask=mask)
    assert all(isinstance(a, da.Array) for a in (*out, *grads))
    want = anybn.batch_norm(xn, rm, rv, w, b, training=True, axis=axis, mask=mask_n)
    want_g = anybn.batch_norm_backward(
        xn * 0.1, xn, w, want.mean, want.invstd, axis=axis, mask=mask_n
    )
    for got, exp in zip((*out, *grads), (*want, *want_g), strict=True):
        np.testing.assert_allclose(np.asarray(got.compute()), exp, rtol=1e-10, atol=1e-10)


def test_statistics_merge_per_chunk() -> None:
    """The statistics are one blockwise pass (per-chunk moments) plus small merges."""
    x = da.from_array(_data(), chunks=(3, 3, 5))
    out = anybn.batch_norm(x, training=True)
    names = " ".join(str(k) for k in out.mean.__dask_graph__().keys())
    assert "lambda" in names or "blockwise" in names or "moments" in names


def test_unknown_chunk_sizes_raise() -> None:
    x = da.from_array(_data(), chunks=(3, 3, 10))
    xb = x[x[:, 0, 0] > 50.0]
    assert np.isnan(xb.shape[0])
    with pytest.raises(ValueError, match=r"x has a shape of unknown extents.*compute_chunk_sizes"):
        anybn.batch_norm(xb, training=True)
    xb.compute_chunk_sizes()
    assert anybn.batch_norm(xb, training=True).y.shape == xb.shape


def test_numpy_vectors_only_beside_wrapping_libraries() -> None:
    torch = pytest.importorskip("torch")
    x = da.from_array(_data(), chunks=(3, 3, 10))
    with pytest.raises(TypeError, match="weight must be an array of the same library"):
        anybn.batch_norm(x, None, None, torch.ones(3), training=True)
    with pytest.raises(TypeError, match="running_mean must be an array of the same library"):
        anybn.batch_norm(_data(), torch.zeros(3), torch.ones(3), training=True)


def test_sparse_with_numpy_vectors() -> None:
    sparse = pytest.importorskip("sparse")
    xn = _data()
    xn[xn < 50.0] = 0.0
    x = sparse.COO.from_numpy(xn)
    out = anybn.batch_norm(x, np.zeros(3), np.ones(3), np.full(3, 2.0), training=True)
    want = anybn.batch_norm(xn, np.zeros(3), np.ones(3), np.full(3, 2.0), training=True)
    np.testing.assert_allclose(np.asarray(out.y.todense()), want.y, rtol=1e-12, atol=1e-12)


@pytest.mark.slow
def test_out_of_core() -> None:
    """2 GiB of float32 normalised under a 512 MiB address-space cap (one core, ~40 s).

    The script (tests/_out_of_core.py) sets RLIMIT_AS to what the imports took
    plus 512 MiB: materialising x, or anything its size, raises MemoryError.
    """
    script = Path(__file__).with_name("_out_of_core.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), *sys.path])}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), "2", "512"],
        capture_output=True, text=True, env=env, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["x_bytes"] == 2 * 2**30
    assert result["rss_peak"] - result["rss_before"] < 512 * 2**20
    np.testing.assert_allclose(result["y_mean"], 0.0, atol=1e-5)
    np.testing.assert_allclose(result["y_var"], 1.0, atol=1e-4)
    np.testing.assert_allclose(result["running_mean"], 10.0, atol=1e-3)  # 0.1 * 100
    np.testing.assert_allclose(result["running_var"], 0.9 + 0.1 * 9.0, atol=1e-3)


# --- on a cluster of two worker processes ----------------------------------------------

#: Seconds any one computation on the cluster may take (starting it included).
CLUSTER_TIMEOUT = 120


@pytest.fixture(scope="module")
def client() -> Any:
    """A LocalCluster of two single-threaded worker processes on loopback, and its client."""
    distributed = pytest.importorskip("dask.distributed")
    with (
        distributed.LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, silence_logs=40,
        ) as cluster,
        distributed.Client(cluster, timeout=f"{CLUSTER_TIMEOUT}s") as c,
    ):  # fmt: skip
        c.wait_for_workers(2, timeout=CLUSTER_TIMEOUT)
        yield c


def _on_cluster(client: Any, *arrays: Any) -> list[np.ndarray]:
    """Compute on the workers, bounded by CLUSTER_TIMEOUT, and bring back the results."""
    futures = client.compute(list(arrays))
    return [np.asarray(f.result(timeout=CLUSTER_TIMEOUT)) for f in futures]


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_forward_and_backward_on_a_cluster(client: Any, masked: bool) -> None:
    xn = _data(1)
    mask_n = xn > 49.0 if masked else None
    x = da.from_array(xn, chunks=(2, 3, 5))
    mask = None if mask_n is None else da.from_array(mask_n, chunks=(3, 3, 10))
    rm, rv, w, b = np.zeros(3), np.ones(3), np.full(3, 2.0), np.full(3, 0.5)
    with dask.config.set(scheduler=_NoCompute()):  # nothing computed during the calls
        out = anybn.batch_norm(x, rm, rv, w, b, training=True, mask=mask)
        dy = da.sin(x)
        grads = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd, mask=mask)
    got = _on_cluster(client, *out, *grads)
    want = anybn.batch_norm(xn, rm, rv, w, b, training=True, mask=mask_n)
    want_g = anybn.batch_norm_backward(np.sin(xn), xn, w, want.mean, want.invstd, mask=mask_n)
    for g, e in zip(got, (*want, *want_g), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-10)


def test_layer_on_a_cluster(client: Any) -> None:
    """The layer's training forward computes its running statistics with the client (the
    default scheduler inside ``client.as_current()``); y and backward stay lazy."""
    xn = _data(2)
    bn, ref = anybn.BatchNorm(3), anybn.BatchNorm(3)
    x = da.from_array(xn, chunks=(3, 3, 5))
    with client.as_current(), dask.config.set(scheduler=client.get):
        for step in range(2):
            y = bn(x + step)
            g = bn.backward(da.cos(x))
            got_y, got_dx = _on_cluster(client, y, g.dx)
            want_y = ref(xn + step)
            want_g = ref.backward(np.cos(xn))
            np.testing.assert_allclose(got_y, want_y, rtol=1e-10, atol=1e-10)
            np.testing.assert_allclose(got_dx, want_g.dx, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(np.asarray(bn.running_var), ref.running_var, rtol=1e-12)
    assert bn.num_batches_tracked == 2


@pytest.mark.slow
def test_out_of_core_on_a_cluster() -> None:
    """1 GiB of float32 normalised by two worker processes capped at 640 MiB each, their
    imports included (so the two could not hold x between them), spilling off: a worker
    past its cap is killed and the computation fails. The client's memory stays flat."""
    pytest.importorskip("dask.distributed")
    script = Path(__file__).with_name("_out_of_core.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), *sys.path])}
    env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", MKL_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, str(script), "1", "640", "--cluster"],
        capture_output=True, text=True, env=env, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["x_bytes"] == 2**30
    room = sum(result["cap"] - start for start in result["worker_starts"])
    assert room < result["x_bytes"], "the workers could have held x"
    assert max(result["worker_peaks"]) < result["cap"]
    assert result["rss_peak"] - result["rss_before"] < 128 * 2**20  # nothing came to the client
    np.testing.assert_allclose(result["y_mean"], 0.0, atol=1e-5)
    np.testing.assert_allclose(result["y_var"], 1.0, atol=1e-4)
    np.testing.assert_allclose(result["running_mean"], 10.0, atol=1e-3)
    np.testing.assert_allclose(result["running_var"], 0.9 + 0.1 * 9.0, atol=1e-3)


def test_out_of_core_cap_bites() -> None:
    """The cap is real: a cap smaller than one chunk's temporaries fails the script."""
    script = Path(__file__).with_name("_out_of_core.py")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(script.parents[1]), *sys.path])}
    proc = subprocess.run(
        [sys.executable, str(script), "0.0625", "8"],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert proc.returncode != 0 and "MemoryError" in proc.stderr
