"""Repository-level pytest configuration.

``--doctest-modules`` imports every module: those that import an optional
dependency at the top (PyTorch, JAX, Numba, Dask) are not collected where it is
missing, so the README's test command also works with none of them installed.
``tests/typecheck/`` is for mypy (``.ci/check_typing.py``), not for pytest.

The summary lists failures and errors in full (``-rfE`` in pyproject.toml) and the
skipped and xfailed tests grouped by reason, one line per reason with a count, so
that a missing library (a backend, or a tool such as Keras, Sphinx or mpiexec) is a few
lines instead of hundreds; and it says what the deselected tests are (the thinned JAX and
Dask rows, ``tests/conftest.py``).
"""

from __future__ import annotations

import importlib.util
import os
from collections import Counter

import pytest

# JAX's CPU platform split into 4 devices, for jax.pmap / jax.shard_map over a named axis
# (tests/test_jax_sync.py). XLA reads the flag when JAX first starts its backend, which no
# test has done yet when pytest loads this file; one device's computations are unchanged.
_DEVICES_FLAG = "--xla_force_host_platform_device_count"
if _DEVICES_FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_DEVICES_FLAG}=4".strip()

# tests/typecheck holds call sites for mypy (.ci/check_typing.py), some deliberately wrong.
collect_ignore = ["tests/typecheck"]

#: Modules that import an optional dependency at the top, and that dependency.
_NEEDS = {
    "anybn/torch/__init__.py": "torch",
    "anybn/torch/ops.py": "torch",
    "anybn/torch/sync.py": "torch",
    "anybn/torch/function.py": "torch",
    "anybn/torch/fold.py": "torch",
    "anybn/torch/frozen.py": "torch",
    "anybn/torch/recalibrate.py": "torch",
    "anybn/torch/variants.py": "torch",
    "anybn/distributed/torch_autograd.py": "torch",
    "anybn/_kernels/jax.py": "jax",
    "anybn/_kernels/half.py": "numba",
    "tests/_out_of_core.py": "dask",
    "tests/_recalibrate_out_of_core.py": "dask",
}
collect_ignore += [path for path, need in _NEEDS.items() if importlib.util.find_spec(need) is None]


def _reason(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(getattr(report, "wasxfail", "") or report.longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Skips and xfails, grouped by reason: ``count  reason``, most frequent first; and what
    the deselected tests are."""
    thinned = getattr(terminalreporter.config, "anybn_thinned", 0)
    if thinned:
        terminalreporter.write_sep("=", f"{thinned} deselected on purpose")
        terminalreporter.write_line(
            f"{thinned:6d}  JAX and Dask rows of the layout x option matrices, thinned (each "
            "call compiles or builds a graph); tests/test_jax.py and tests/test_dask.py cover them"
        )
    for key, title in (("skipped", "skipped"), ("xfailed", "xfailed")):
        reports = terminalreporter.stats.get(key, [])
        if not reports:
            continue
        counts = Counter(_reason(r) for r in reports)
        terminalreporter.write_sep("=", f"{len(reports)} {title}, by reason")
        for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            terminalreporter.write_line(f"{n:6d}  {reason}")
