"""``python -m anybn``: the backend report."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from anybn._testing import report as _report
from anybn._testing.backends import BACKENDS, get_backend


def test_report_passes_and_lists_every_backend(capsys: pytest.CaptureFixture[str]) -> None:
    status = _report.main(["--shape", "4,3,5", "--repeat", "1"])
    out = capsys.readouterr().out
    assert status == 0
    for b in BACKENDS:
        assert b.id in out
    assert "0 failed" in out


def test_skipped_backend_gives_its_reason(capsys: pytest.CaptureFixture[str]) -> None:
    results = _report.run_report(BACKENDS, shape=(4, 3), repeat=1, out=lambda s: None)
    for r in results:
        reason = get_backend(r.backend).unavailable_reason()
        if reason is None:
            assert r.status == "ok", r
            assert r.forward_error < _report.TOLERANCE and r.backward_error < _report.TOLERANCE
            assert np.isfinite(r.forward_ms) and np.isfinite(r.backward_ms)
        else:
            assert r.status == "skipped" and r.detail == reason


def test_disagreeing_backend_makes_the_exit_status_nonzero(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    real = _report.batch_norm

    def off_by_a_bit(*args, **kwargs):  # type: ignore[no-untyped-def]
        out = real(*args, **kwargs)
        return out._replace(y=out.y + 1e-2)

    monkeypatch.setattr(_report, "batch_norm", off_by_a_bit)
    assert _report.main(["--backend", "numpy", "--shape", "4,3", "--repeat", "1"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_raising_backend_is_reported_as_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(*args, **kwargs):  # type: ignore[no-untyped-def]
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(_report, "batch_norm_backward", broken)
    assert _report.main(["--backend", "numpy", "--shape", "4,3", "--repeat", "1"]) == 1
    assert (
        "ERROR" in capsys.readouterr().out
        and "kernel exploded"
        in _report.check_backend(get_backend("numpy"), shape=(4, 3), repeat=1).detail
    )


def test_bad_arguments_are_usage_errors() -> None:
    with pytest.raises(SystemExit) as info:
        _report.main(["--shape", "7"])
    assert info.value.code == 2


@pytest.mark.parametrize("bad", ["7", "8,x", "(8, 0)", ""])
def test_a_bad_shape_says_how_to_write_one(bad: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        _report.main(["--shape", bad])
    assert info.value.code == 2
    assert "--shape" in capsys.readouterr().err


@pytest.mark.parametrize("written", ["4,3", "(4, 3)", "[4,3]", "4x3", " 4, 3 "])
def test_shapes_as_help_shows_them_are_accepted(written: str) -> None:
    assert _report.parse_shape(written) == (4, 3)


def test_help_shows_the_default_shape_as_accepted_and_lists_gpu_check(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        _report.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    default = ",".join(map(str, _report.STANDARD_SHAPE))
    assert f"default: {default}" in text
    assert _report.parse_shape(default) == _report.STANDARD_SHAPE
    assert "gpu-check" in text


def test_module_entry_point_runs() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "anybn", "--backend", "numpy", "--shape", "4,3", "--repeat", "1"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert "numpy" in proc.stdout and "ok" in proc.stdout


def test_the_getting_started_sample_is_the_report_of_today() -> None:
    """The sample report on the getting-started page lists the backends the report checks,
    in its order, under the report's own header (engine column included)."""
    from pathlib import Path

    page = (Path(__file__).parents[1] / "docs" / "getting-started.md").read_text()
    sample = page.split("it printed:\n\n```text\n", 1)[1].split("```", 1)[0].splitlines()
    printed: list[str] = []
    _report.run_report(backends=[], out=printed.append)
    header = next(line for line in printed if line.startswith("backend "))
    assert header in sample
    rows = sample[sample.index(header) + 2 :]
    names = [line.split()[0] for line in rows if line.strip() and not line[0].isdigit()]
    assert names == [b.id for b in BACKENDS]
    for line in rows:
        if " ok " in line:
            engine = line.split(maxsplit=6)[-1]
            assert engine and not engine[0].isdigit(), line  # every row that ran names its engine
