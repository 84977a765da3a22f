"""Recalibration over real ranks on loopback: torch.distributed (gloo) and MPI.

Each test starts K ranks of ``tests/_recalibrate_worker.py`` (the launch and the skips of
test_distributed.py), each with its own batches (uneven numbers, a rank with none), and
compares every rank's statistics with one process that ran every rank's batches.
"""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from test_distributed import ENGINES, LAUNCH_TIMEOUT, _env, _free_port, _wait, results

import anybn

WORKER = Path(__file__).resolve().parent / "_recalibrate_worker.py"
sys.path.insert(0, str(WORKER.parent))
import _recalibrate_worker as worker  # noqa: E402

#: which batches each rank gets (by index), per group size: uneven, one rank with none
ASSIGNMENT = {2: [[0, 1], [2, 3, 4]], 3: [[0], [], [1, 2, 3, 4]]}
SIZES = [6, 2, 9, 4, 7]


def _inputs(size: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(size)
    data = {f"batch{i}": 20.0 + rng.normal(size=(n, 3, 5)) * 3 for i, n in enumerate(SIZES)}
    for r, indices in enumerate(ASSIGNMENT[size]):
        data[f"rank{r}"] = np.asarray(indices, dtype=np.int64)
    return data


def launch(engine: str, size: int, scenario: str, workdir: Path) -> list[int | None]:
    env = _env()
    cmd = [sys.executable, str(WORKER), engine, scenario, str(workdir)]
    if engine == "gloo":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(size))
        procs = [subprocess.Popen(cmd, env={**env, "RANK": str(r)}, start_new_session=True)
                 for r in range(size)]  # fmt: skip
    else:
        import shutil

        mpiexec = shutil.which("mpiexec")
        assert mpiexec is not None
        procs = [subprocess.Popen([mpiexec, "-n", str(size), *cmd], env=env,
                                  start_new_session=True)]  # fmt: skip
    return _wait(procs, LAUNCH_TIMEOUT)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("size", sorted(ASSIGNMENT))
def test_ranks_equal_one_process(engine: str, size: int, tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    import anybn.torch

    data = _inputs(size)
    np.savez(tmp_path / "inputs.npz", **data)
    codes = launch(engine, size, "recalibrate", tmp_path)
    assert codes == [0] * len(codes), f"exit codes {codes}"
    per_rank = results(tmp_path, size)
    assert all(report["done"] for report, _ in per_rank)
    every = [data[f"batch{i}"] for indices in ASSIGNMENT[size] for i in indices]
    template = worker.model(torch)
    for method in worker.METHODS:
        bn = worker.layer()
        anybn.recalibrate(bn, every, layers=bn, method=method)
        model = copy.deepcopy(template)
        anybn.torch.recalibrate(model, [torch.from_numpy(b) for b in every], method=method)
        expected = {f"layer-{method}:{k}": worker.to_numpy(v) for k, v in bn.state_dict().items()}
        expected |= {f"model-{method}:{k}": worker.to_numpy(v)
                     for k, v in model.state_dict().items()}  # fmt: skip
        for rank, (_, arrays) in enumerate(per_rank):
            for key, want in expected.items():
                np.testing.assert_allclose(arrays[key], want, rtol=1e-12, atol=1e-13,
                                           err_msg=f"rank {rank}: {key}")  # fmt: skip
        assert expected[f"layer-{method}:num_batches_tracked"] == len(SIZES)


@pytest.mark.parametrize("engine", ENGINES)
def test_a_failing_rank_fails_every_rank(engine: str, tmp_path: Path) -> None:
    size = 3
    data = _inputs(size)
    np.savez(tmp_path / "inputs.npz", **data)
    codes = launch(engine, size, "fault", tmp_path)
    assert codes == [0] * len(codes), f"exit codes {codes}"
    untouched = worker.layer().state_dict()
    every = [data[f"batch{i}"] for indices in ASSIGNMENT[size] for i in indices]
    good = worker.layer()
    anybn.recalibrate(good, every, layers=good)
    for rank, (report, arrays) in enumerate(results(tmp_path, size)):
        kind, message = report["fault"]
        if rank == size - 1:
            assert kind == "ValueError" and "more than 1 value per channel" in message
        else:
            assert kind == "RuntimeError" and f"rank(s) [{size - 1}] raised" in message
        for key, value in untouched.items():
            np.testing.assert_array_equal(arrays[f"fault:{key}"], value, err_msg=key)
        np.testing.assert_allclose(arrays["after:running_mean"], good.running_mean, rtol=1e-12)
