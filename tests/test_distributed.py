"""Synchronized batch norm across real processes on loopback: torch.distributed (gloo) and MPI.

Each test starts K ranks of ``tests/_dist_worker.py`` (as separate processes for
gloo, through ``mpiexec -n K`` for MPI), waits for all of them within a timeout,
then compares what every rank wrote with single-process ``anybn.batch_norm`` on
the concatenated batch. Ranks import anybn from this checkout (PYTHONPATH is set
to the repository root of this file). MPI tests are skipped when mpi4py or
``mpiexec`` is missing (``pip install "anybn[mpi]"`` provides both).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import anybn

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
WORKER = HERE / "_dist_worker.py"
sys.path.insert(0, str(HERE))
import _dist_worker as worker  # noqa: E402

#: Wall-clock bound for one launch (startup of K interpreters included).
LAUNCH_TIMEOUT = 90

#: Batch splits over ranks: uneven, with a rank holding one sample and one holding none.
SPLITS = {2: [1, 6], 3: [0, 6, 1], 4: [3, 1, 0, 5]}
TOL = {"float64": 1e-12, "float32": 1e-6}


def _has_gloo() -> bool:
    try:
        import torch.distributed as dist
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


def _has_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec") is not None


ENGINES = [
    pytest.param(
        "gloo", marks=pytest.mark.skipif(not _has_gloo(), reason="torch.distributed gloo missing")
    ),
    pytest.param(
        "mpi",
        marks=pytest.mark.skipif(
            not _has_mpi(), reason="mpi4py or mpiexec missing (pip install mpi4py mpich)"
        ),
    ),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", ANYBN_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    return env


def _wait(procs: list[subprocess.Popen[bytes]], timeout: float) -> list[int | None]:
    """Every process's exit code; those still running at the deadline are killed (None)."""
    codes: list[int | None] = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=timeout))
        except subprocess.TimeoutExpired:
            codes.append(None)
        timeout = 0.1 if codes[-1] is None else timeout
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
    return codes


def launch(engine: str, size: int, scenario: str, workdir: Path) -> list[int | None]:
    """Run ``scenario`` on ``size`` ranks; return the exit codes (one per rank for gloo,
    the launcher's for MPI), None for a process killed at the timeout."""
    env = _env()
    cmd = [sys.executable, str(WORKER), engine, scenario, str(workdir)]
    if engine == "gloo":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(size))
        procs = [
            subprocess.Popen(cmd, env={**env, "RANK": str(rank)}, start_new_session=True)
            for rank in range(size)
        ]
    else:
        mpiexec = shutil.which("mpiexec")
        assert mpiexec is not None
        procs = [
            subprocess.Popen([mpiexec, "-n", str(size), *cmd], env=env, start_new_session=True)
        ]
    return _wait(procs, LAUNCH_TIMEOUT)


def results(workdir: Path, size: int) -> list[tuple[dict[str, Any], dict[str, np.ndarray]]]:
    out = []
    for rank in range(size):
        report = json.loads((workdir / f"rank{rank}.json").read_text())
        with np.load(workdir / f"rank{rank}.npz") as arrays:
            out.append((report, dict(arrays)))
    return out


def assert_close(actual: Any, expected: Any, tol: float, what: str) -> None:
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64), np.asarray(expected, dtype=np.float64),
        rtol=tol, atol=tol, err_msg=what,
    )  # fmt: skip


def _reference(data: dict[str, np.ndarray], dtype: str, key: str, lib: str) -> dict[str, Any]:
    """Single-process anybn on the concatenated batch, in the variant's library and dtype."""
    conv = worker.as_lib
    pdt = "float32" if dtype == "bfloat16" else dtype
    x, dy = conv(data[key], lib, dtype), conv(data["dy" + key[1]], lib, dtype)
    keys = ("weight", "bias", "running_mean", "running_var")
    w, b, rm, rv = (conv(data[k], lib, pdt) for k in keys)
    out = anybn.batch_norm(x, rm, rv, w, b, training=True, momentum=worker.MOMENTUM, eps=worker.EPS)
    grads = anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd)
    return {
        k: worker.to_numpy(v)
        for k, v in zip(out._fields + grads._fields, (*out, *grads), strict=True)
    }


def _check_against(
    per_rank: list[dict[str, np.ndarray]], prefix: str, ref: dict[str, Any], tol: float
) -> None:
    for field in ("y", "dx"):  # shards: concatenated over ranks
        got = np.concatenate([a[f"{prefix}:{field}"] for a in per_rank])
        assert_close(got, ref[field], tol, f"{prefix}: {field}")
    for field in ("dweight", "dbias"):  # each rank's own sums: summed over ranks
        got = sum(a[f"{prefix}:{field}"] for a in per_rank)
        assert_close(got, ref[field], tol, f"{prefix}: {field} summed over ranks")
    for field in ("mean", "invstd", "new_running_mean", "new_running_var"):
        for rank, a in enumerate(per_rank):  # every rank holds the global statistics
            if f"{prefix}:{field}" in a:
                what = f"{prefix}: {field}, rank {rank}"
                assert_close(a[f"{prefix}:{field}"], ref[field], tol, what)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", sorted(SPLITS))
def test_exact(engine: str, size: int, tmp_path: Path) -> None:
    """y, dx, dweight, dbias and running stats equal single-process anybn on the whole batch."""
    data = worker.make_inputs(SPLITS[size])
    np.savez(tmp_path / "inputs.npz", **data)
    codes = launch(engine, size, "exact", tmp_path)
    assert codes == [0] * len(codes), f"exit codes {codes}"
    ranks = results(tmp_path, size)
    reports, per_rank = [r for r, _ in ranks], [a for _, a in ranks]
    assert all(r["done"] for r in reports)
    for name, lib, dtype, key in worker.VARIANTS:
        ref = _reference(data, dtype, key, lib)
        if dtype == "bfloat16":
            # Half input: statistics travel and merge in float32; they equal the
            # single-process float32 statistics of the same bfloat16 values.
            assert all(r[f"{name}:dtypes"][0] == "torch.float32" for r in reports)
            for field in ("mean", "invstd", "new_running_mean", "new_running_var"):
                for a in per_rank:
                    assert_close(a[f"{name}:{field}"], ref[field], 1e-6, f"{name}: {field}")
            got_y = np.concatenate([a[f"{name}:y"] for a in per_rank])
            assert_close(got_y, ref["y"], 1e-2, f"{name}: y")
            continue
        _check_against(per_rank, name, ref, TOL[dtype])

    # The layer: two synchronized steps (momentum=None) and backward, as one process would.
    bn = anybn.BatchNorm(3, momentum=None, eps=worker.EPS)
    for step in range(2):
        y = bn(data["x3"] + step)
        g = bn.backward(data["dy3"])
    ref = {"y": y, "dx": g.dx, "dweight": g.dweight, "dbias": g.dbias}
    ref.update(new_running_mean=bn.running_mean, new_running_var=bn.running_var)
    layer = [{k.replace("running", "new_running"): v for k, v in a.items()} for a in per_rank]
    _check_against(layer, "layer", ref, 1e-12)
    assert all(r["layer:num_batches_tracked"] == 2 for r in reports)

    if engine == "gloo":  # anybn.torch.SyncBatchNorm, with autograd
        ref = _reference(data, "float64", "x3", "numpy")
        _check_against(per_rank, "module", ref, 1e-12)
        assert all(r["module:num_batches_tracked"] == 1 for r in reports)
        _check_momentum_and_half(data, per_rank)


def _check_momentum_and_half(data: dict[str, np.ndarray], per_rank: list[dict]) -> None:
    """SyncBatchNorm: momentum 1.5 as torch.nn.BatchNorm1d on the whole batch; float16 and
    bfloat16 y and dx against the float64 formula, as close as the local module gets."""
    import torch

    import anybn.torch as abt

    bn = torch.nn.BatchNorm1d(3, eps=worker.EPS, momentum=1.5).double()
    bn(torch.from_numpy(data["x3"]))
    for rank, a in enumerate(per_rank):
        assert_close(a["momentum:running_mean"], bn.running_mean, 1e-12, f"rank {rank}")
        assert_close(a["momentum:running_var"], bn.running_var, 1e-12, f"rank {rank}")

    x, dy, w, b = (data[k] for k in ("x3c", "dy3c", "weight", "bias"))
    for half in ("float16", "bfloat16"):
        dtype = getattr(torch, half)
        xh, dyh = torch.from_numpy(x).to(dtype), torch.from_numpy(dy).to(dtype)
        # the float64 formula on the half-precision values
        x64, dy64 = xh.double().numpy(), dyh.double().numpy()
        out = anybn.batch_norm(x64, weight=w, bias=b, training=True, eps=worker.EPS)
        exact = {"y": out.y, "dx": anybn.batch_norm_backward(dy64, x64, w, out.mean, out.invstd).dx}
        # the local module on the whole batch, same dtypes: the error to be comparable with
        local = abt.BatchNorm1d(3, eps=worker.EPS)
        with torch.no_grad():
            local.weight.copy_(torch.from_numpy(w))
            local.bias.copy_(torch.from_numpy(b))
        xh.requires_grad_()
        y = local(xh)
        y.backward(dyh)
        local_values = {"y": worker.to_numpy(y), "dx": worker.to_numpy(xh.grad)}
        ulp = float(torch.finfo(dtype).eps)
        for field, ref in exact.items():
            got = np.concatenate([a[f"half-{half}:{field}"] for a in per_rank])
            scale = np.abs(ref).max()
            err_sync = np.abs(got - ref).max() / scale
            err_local = np.abs(local_values[field] - ref).max() / scale
            assert err_sync <= max(2 * err_local, ulp), (half, field, err_sync, err_local)


#: The one-rank faults that make the ranks disagree, and what every rank's error says.
_OPTION_MISMATCH = {
    "mask": "mask=given",
    "biased": "var_estimator=biased",
    "backward_mask": "mask=given",
    "layer_mask": "mask=given",
    "layer_biased": "var_estimator=biased",
}


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", [2, 3])
def test_masked(engine: str, size: int, tmp_path: Path) -> None:
    """mask= (the first rank's mask all False, padding NaN and its dy 0), several channel
    axes and the biased estimator, synchronized: y, dx, dweight, dbias and the running
    statistics equal single-process anybn on the whole batch; the layer (two steps) and
    torch's SyncBatchNorm with a mask of x's shape without the channel axis too."""
    data = worker.make_inputs(SPLITS[size])
    np.savez(tmp_path / "inputs.npz", **data)
    codes = launch(engine, size, "masked", tmp_path)
    assert codes == [0] * len(codes), f"exit codes {codes}"
    ranks = results(tmp_path, size)
    reports, per_rank = [r for r, _ in ranks], [a for _, a in ranks]
    assert all(r["done"] for r in reports)
    mask = data["mask3"]
    assert not mask[: SPLITS[size][0]].any()  # a rank that counts nothing
    for name, lib, dtype, options in worker.MASKED_VARIANTS:
        if lib == "torch" and "torch" not in sys.modules:
            pytest.importorskip("torch")
        conv = worker.as_lib
        x, dy = conv(data["x3m"], lib, dtype), conv(data["dy3m"], lib, dtype)
        m = conv(mask, lib, "bool") if lib == "torch" else mask
        shape = worker.masked_shape(options)
        rm, rv = conv(np.full(shape, 0.5), lib, dtype), conv(np.full(shape, 2.0), lib, dtype)
        out = anybn.batch_norm(x, rm, rv, training=True, momentum=worker.MOMENTUM,
                               eps=worker.EPS, mask=m, **options)  # fmt: skip
        grads = anybn.batch_norm_backward(dy, x, None, out.mean, out.invstd, mask=m,
                                          axis=options.get("axis", 1))  # fmt: skip
        fields = zip(out._fields + grads._fields, (*out, *grads), strict=True)
        ref = {k: worker.to_numpy(v) for k, v in fields}
        for a in per_rank:  # no NaN reaches the statistics or dx, on any rank
            for field in ("mean", "invstd", "new_running_mean", "new_running_var", "dx"):
                assert np.isfinite(a[f"{name}:{field}"]).all(), (name, field)
        assert not per_rank[0][f"{name}:dx"].any()  # the all-False rank: dy 0, dx 0
        _check_against(per_rank, name, ref, TOL[dtype])

    bn = anybn.BatchNorm((3, 4), axis=(1, 2), momentum=None, eps=worker.EPS,
                         var_estimator="biased")  # fmt: skip
    for step in range(2):
        y = bn(data["x3m"] + step, mask=mask)
        g = bn.backward(data["dy3m"])
    ref = {"y": y, "dx": g.dx, "dweight": g.dweight, "dbias": g.dbias}
    ref.update(new_running_mean=bn.running_mean, new_running_var=bn.running_var)
    layer = [{k.replace("running", "new_running"): v for k, v in a.items()} for a in per_rank]
    _check_against(layer, "layer", ref, 1e-12)
    assert all(r["layer:num_batches_tracked"] == 2 for r in reports)

    if engine == "gloo":  # SyncBatchNorm with a (N, L) mask: the whole batch's module
        import torch

        import anybn.torch as abt

        m = abt.BatchNorm1d(3, eps=worker.EPS, momentum=worker.MOMENTUM).double()
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(data["weight"]))
            m.bias.copy_(torch.from_numpy(data["bias"]))
        xt = torch.from_numpy(data["x3"]).requires_grad_()
        y = m(xt, mask=torch.from_numpy(mask[:, 0, :]))
        y.backward(torch.from_numpy(data["dy3"]))
        ref = {"y": y, "dx": xt.grad, "dweight": m.weight.grad, "dbias": m.bias.grad,
               "new_running_mean": m.running_mean, "new_running_var": m.running_var}  # fmt: skip
        ref = {k: worker.to_numpy(v) for k, v in ref.items()}
        _check_against(per_rank, "module", ref, 1e-12)
        assert all(r["module:num_batches_tracked"] == 1 for r in reports)


@pytest.mark.parametrize("engine", ENGINES)
def test_faults_raise_on_every_rank(engine: str, tmp_path: Path) -> None:
    """Another channel count or dtype on one rank, or a bad argument, or a global count
    of 1: every rank raises (no hang), state is unchanged, and the group stays usable."""
    size = 3
    codes = launch(engine, size, "faults", tmp_path)
    assert codes == [0] * len(codes), f"exit codes {codes}"
    reports = results(tmp_path, size)
    for rank, (report, arrays) in enumerate(reports):
        assert report["done"], rank
        assert report["channels"][0] == "ValueError"
        assert "same number of channels" in report["channels"][1]
        assert "rank 2: 4" in report["channels"][1]
        assert report["dtype"][0] == "TypeError"
        assert "rank 2: float32" in report["dtype"][1]
        if rank == size - 1:  # its own check failed: its own error
            assert report["local_check"][0] == "ValueError"
            assert "weight must have shape (3,)" in report["local_check"][1]
        else:
            assert report["local_check"][0] == "RuntimeError"
            assert "rank(s) [2] rejected their arguments" in report["local_check"][1]
        assert report["count"][0] == "ValueError"
        assert "more than 1 value per channel" in report["count"][1]
        assert report["backward_channels"][0] == "ValueError"
        assert report["layer_dtype"][0] == "TypeError"
        assert report["layer_channels"][0] == "ValueError"
        assert "same number of channels" in report["layer_channels"][1]
        assert report["layer_unchanged"]
        for name in worker.ONE_RANK_FAULTS:
            # options on one rank only: the ranks disagree (every rank raises the same
            # error), or a check fails on one rank (it raises its own, the others say so)
            kind, message = report[f"one_rank_{name}"]
            if name in _OPTION_MISMATCH:
                assert kind == "ValueError" and _OPTION_MISMATCH[name] in message, (name, message)
            elif rank == size - 1:
                assert kind == "ValueError" and "must have shape" in message, (name, message)
            else:
                assert kind == "RuntimeError", (name, kind, message)
                assert "rank(s) [2] rejected their arguments" in message, (name, message)
            # ... and the next call pairs with the next call of every rank: mean 5
            np.testing.assert_array_equal(arrays[f"one_rank_{name}:mean"], np.full(3, 5.0))
        np.testing.assert_array_equal(arrays["running_mean"], np.zeros(3))
        np.testing.assert_array_equal(arrays["running_var"], np.ones(3))
        assert arrays["after"].shape == (3,)
        if engine == "gloo":
            assert report["module_channels"][0] == "ValueError"
            assert "same number of channels" in report["module_channels"][1]
            if rank == size - 1:
                assert report["module_ndim"] == [
                    "ValueError",
                    "expected at least 2D input (got 1D input)",
                ]
            else:
                assert report["module_ndim"][0] == "RuntimeError"
            if rank == size - 1:
                assert report["module_forward_ad"][0] == "TypeError"
                assert "forward-mode AD" in report["module_forward_ad"][1]
            else:
                assert report["module_forward_ad"][0] == "RuntimeError"
            assert report["module_unchanged"]
            same = worker.SAME_BATCH[:, :, None]
            expected = anybn.batch_norm(same, training=True).y
            assert_close(arrays["module_after"], expected, 1e-12, "module after the faults")


@pytest.mark.parametrize("engine", ENGINES)
def test_dead_rank_fails_fast(engine: str, tmp_path: Path) -> None:
    """A rank that exits before the collective: no rank is left waiting past the timeout.

    gloo: the surviving rank raises CollectiveTimeout at the call's deadline (5 s), naming
    the dead rank, and reports it.
    MPI: the launcher aborts the whole job (mpich's default), with a failing exit code.
    """
    size = 2
    codes = launch(engine, size, "dead", tmp_path)
    assert None not in codes, f"a process hung until the timeout: {codes}"
    if engine == "gloo":
        assert codes[-1] == 17
        report = json.loads((tmp_path / "rank0.json").read_text())
        assert report["forward"] is not None, "rank 0 did not raise"
        assert report["forward"][0] == "CollectiveTimeout", report["forward"]
        assert "rank(s) [1] did not answer" in report["forward"][1]
        with np.load(tmp_path / "rank0.npz") as arrays:
            np.testing.assert_array_equal(arrays["running_mean"], np.zeros(3))
            np.testing.assert_array_equal(arrays["running_var"], np.ones(3))
    else:
        assert codes[0] != 0
        assert not (tmp_path / "rank0.json").exists()


@pytest.mark.parametrize("engine", ENGINES)
def test_late_rank_times_out_on_every_rank(engine: str, tmp_path: Path) -> None:
    """timeout=: a live rank that comes after the deadline. Each waiting rank raises
    CollectiveTimeout within the deadline (+ GRACE where rank 0 is the late one) naming
    it; the late rank raises as soon as it comes, naming itself; nothing is updated; and
    the next call pairs as before. Forward, layer, backward, a late rank 0, and (gloo)
    SyncBatchNorm; 3 ranks."""
    from anybn.distributed.deadline import GRACE

    size, t = 3, worker.LATE_TIMEOUT
    slack = 3.0  # process scheduling on a loaded machine
    codes = launch(engine, size, "late", tmp_path)
    assert codes == [0] * len(codes), f"exit codes {codes}"
    for rank, (report, arrays) in enumerate(results(tmp_path, size)):
        assert report["done"], rank
        for name, late_rank in worker.LATE_STEPS:
            if name == "module" and engine != "gloo":
                continue
            late = late_rank % size
            kind, message = report[name]
            assert kind == "CollectiveTimeout", (rank, name, message)
            assert "header exchange" in message, message
            seconds = report[f"{name}:seconds"]
            if rank == late:
                assert f"this rank ({rank}) came after" in message, message
                assert seconds < slack, (rank, name, seconds)
            else:
                assert f"rank(s) [{late}] did not answer" in message, message
                limit = t + (GRACE if late == 0 else 0.0)
                assert limit - 0.5 < seconds < limit + slack, (rank, name, seconds)
            # the call after the fault pairs with every rank's: the shared batch's mean
            np.testing.assert_array_equal(arrays[f"{name}:after"], np.full(3, 5.0))
        np.testing.assert_array_equal(arrays["running_mean"], np.zeros(3))
        assert report["layer_unchanged"], rank
        if engine == "gloo":
            assert report["module_unchanged"], rank


@pytest.mark.skipif(not _has_gloo(), reason="torch.distributed gloo missing")
def test_ddp_matches_single_process(tmp_path: Path) -> None:
    """20 DDP steps of a small CNN with anybn.torch.SyncBatchNorm on 2 gloo ranks give the
    parameters and running statistics of one process training on the full batch."""
    import torch

    codes = launch("gloo", 2, "ddp", tmp_path)
    assert codes == [0, 0], f"exit codes {codes}"
    model = worker.make_cnn(torch, sync=False)
    worker.train_cnn(torch, model, rank=0, world=1)
    expected = {k: worker.to_numpy(v) for k, v in model.state_dict().items()}
    for rank in range(2):
        with np.load(tmp_path / f"rank{rank}.npz") as got:
            assert sorted(got.files) == sorted(expected)
            for k, v in expected.items():
                assert_close(got[k], v, 1e-10, f"rank {rank}: {k}")


@pytest.mark.skipif(not _has_gloo(), reason="torch.distributed gloo missing")
def test_group_of_one_is_local(tmp_path: Path) -> None:
    """World size 1: SyncBatchNorm is BatchNorm, and comm= the group gives the local result."""
    np.savez(tmp_path / "inputs.npz", **worker.make_inputs([5]))
    codes = launch("gloo", 1, "single", tmp_path)
    assert codes == [0], f"exit codes {codes}"
    with np.load(tmp_path / "rank0.npz") as got:
        for a, b in (("module:y", "local:y"), ("module:running_var", "local:running_var")):
            np.testing.assert_array_equal(got[a], got[b])
        np.testing.assert_allclose(got["comm:y"], got["none:y"], rtol=1e-12, atol=1e-12)
