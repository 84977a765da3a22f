"""Synchronised batch renormalization (``renorm=True`` with ``comm=``) over real processes.

K ranks of ``tests/_dist_renorm_worker.py`` on loopback (gloo: K processes; MPI:
``mpiexec -n K``), each bounded by the launch timeout of ``tests/test_distributed.py``,
whose launcher helpers this file uses. Each rank holds a shard of the batch (uneven, one
rank with none); after two synchronised renorm steps every rank's y (concatenated), dx,
the corrections r and d, the five moving statistics, and dweight/dbias (summed over
ranks) equal one process's renorm on the whole batch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import _dist_renorm_worker as rworker  # noqa: E402
import _dist_worker as worker  # noqa: E402
import test_distributed as td  # noqa: E402

WORKER = HERE / "_dist_renorm_worker.py"
SPLITS = {2: [1, 6], 3: [0, 6, 1]}


@pytest.mark.parametrize("engine", td.ENGINES)
@pytest.mark.parametrize("size", sorted(SPLITS))
def test_sync_renorm_equals_one_process(
    engine: str, size: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = worker.make_inputs(SPLITS[size])
    rng = np.random.default_rng(1)
    # moving statistics away from the batch's, so that r and d are clipped
    data["state"] = np.stack([
        rng.normal(50, 1, 3), rng.uniform(0.5, 2, 3), rng.uniform(0.7, 1.4, 3),
        rng.normal(50, 1, 3), rng.uniform(0.5, 2, 3),
    ])  # fmt: skip
    np.savez(tmp_path / "inputs.npz", **data)
    monkeypatch.setattr(td, "WORKER", WORKER)  # test_distributed's launcher, this worker
    codes = td.launch(engine, size, "renorm", tmp_path)
    assert codes == [0] * len(codes), f"exit codes {codes}"
    ranks = td.results(tmp_path, size)
    assert all(report["done"] for report, _ in ranks)
    per_rank = [a for _, a in ranks]
    ref = rworker.renorm_steps(data["x3"], data["dy3"], data, None, np.asarray)
    clipped = False
    for step in range(2):
        r = ref[f"{step}:r"]
        clipped |= bool(np.any((r == 0.8) | (r == 1.25)) | np.any(np.abs(ref[f"{step}:d"]) == 0.5))
        for field in ("y", "dx"):
            got = np.concatenate([a[f"numpy:{step}:{field}"] for a in per_rank])
            td.assert_close(got, ref[f"{step}:{field}"], 1e-11, f"step {step}: {field}")
        for field in ("dweight", "dbias"):
            got = sum(a[f"numpy:{step}:{field}"] for a in per_rank)
            td.assert_close(got, ref[f"{step}:{field}"], 1e-11, f"step {step}: {field}")
        for field in ("r", "d", "new_running_mean", "new_running_var", "new_running_std",
                      "new_renorm_mean", "new_renorm_std"):  # fmt: skip
            for rank, a in enumerate(per_rank):
                what = f"step {step}: {field}, rank {rank}"
                td.assert_close(a[f"numpy:{step}:{field}"], ref[f"{step}:{field}"], 1e-12, what)
    assert clipped
    for step in range(2):  # anybn.BatchNorm(renorm=True, comm=...)
        for f in ("y", "dx"):
            got = np.concatenate([a[f"layer:{step}:{f}"] for a in per_rank])
            td.assert_close(got, ref[f"{step}:{f}"], 1e-11, f"layer step {step}: {f}")
        got = sum(a[f"layer:{step}:dweight"] for a in per_rank)
        td.assert_close(got, ref[f"{step}:dweight"], 1e-11, f"layer step {step}: dweight")
        for k in rworker.STATE_KEYS:
            for a in per_rank:
                what = f"layer step {step}: {k}"
                td.assert_close(a[f"layer:{step}:{k}"], ref[f"{step}:new_{k}"], 1e-12, what)
    if engine == "gloo":
        got = {f: np.concatenate([a[f"autograd:{f}"] for a in per_rank]) for f in ("y", "dx")}
        for f in ("y", "dx"):
            td.assert_close(got[f], ref[f"0:{f}"], 1e-11, f"autograd: {f}")
        for f in ("dweight", "dbias"):
            got_sum = sum(a[f"autograd:{f}"] for a in per_rank)
            td.assert_close(got_sum, ref[f"0:{f}"], 1e-11, f"autograd: {f}")
        # anybn.torch.SyncBatchNorm(renorm=True) over the group
        for f in ("y", "dx"):
            got_m = np.concatenate([a[f"module:{f}"] for a in per_rank])
            td.assert_close(got_m, ref[f"0:{f}"], 1e-11, f"module: {f}")
        for f in ("dweight", "dbias"):
            got_sum = sum(a[f"module:{f}"] for a in per_rank)
            td.assert_close(got_sum, ref[f"0:{f}"], 1e-11, f"module: {f}")
        for k in rworker.STATE_KEYS:
            for a in per_rank:
                td.assert_close(a[f"module:{k}"], ref[f"0:new_{k}"], 1e-12, f"module: {k}")
