"""``python -m anybn gpu-check``: degrades cleanly without a GPU; its harness runs on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from anybn._testing.gpucheck import find_gpu

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [sys.executable, "-m", "anybn", "gpu-check", *args],
        capture_output=True, text=True, env=env, cwd=cwd, timeout=300,
    )  # fmt: skip


def test_without_a_gpu_says_so_and_exits_0(tmp_path: Path) -> None:
    if find_gpu()[0]:
        pytest.skip("a GPU is present: the command runs for real there")
    proc = _run("--out", str(tmp_path / "out"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA GPU" in proc.stdout
    assert not (tmp_path / "out").exists()


def test_gpu_check_needs_out(tmp_path: Path) -> None:
    proc = _run(cwd=tmp_path)
    assert proc.returncode == 2 and "--out" in proc.stderr


def test_harness_dry_run_on_torch_cpu(tmp_path: Path) -> None:
    """The accuracy and benchmark code on tiny torch CPU tensors: both summaries written."""
    pytest.importorskip("torch")
    proc = _run("--out", str(tmp_path), "--cpu-dry-run", "--repeat", "1", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "gpu-check.json").read_text())
    assert not result["errors"], result["errors"]
    impls = {r["impl"] for r in result["bench"]["rows"]}
    assert impls == {"anybn-torch", "torch-native"}
    ops = {r["op"] for r in result["bench"]["rows"]}
    assert ops == {"fwd", "bwd", "fwd+bwd"}
    assert {a["offset"] for a in result["accuracy"]} == {1.0, 1e2, 1e3, 1e4, 1e5}
    anybn_err = max(a["y_abs_err"] for a in result["accuracy"] if a["impl"] == "anybn-torch")
    assert anybn_err <= 1e-6
    md = (tmp_path / "gpu-check.md").read_text()
    assert "## Benchmark" in md and "## float32 accuracy" in md
