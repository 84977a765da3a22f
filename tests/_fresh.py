"""Run a test in a fresh Python process, so its result cannot depend on what ran before.

``torch.compile``, ``torch.func``, ``torch.export`` and ``torch.jit`` cache
compiled code and module state per process: a test of them that passes after
other tests may fail alone (a lazily bound global, a graph compiled by an earlier
test). :func:`fresh_process` makes a test re-run itself, alone, in a new
interpreter (``python -m pytest <its node id>``, with a timeout) and report what
happened there: passed, skipped with the child's reason, or failed with the
child's output.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

__all__ = ["fresh_process"]

F = TypeVar("F", bound=Callable[..., Any])

#: Set in the child's environment: the node id that runs its body there.
_CHILD = "ANYBN_TEST_FRESH_PROCESS"
_ROOT = Path(__file__).resolve().parent.parent


def _node_id() -> str:
    """The running test's node id (``tests/test_x.py::test_y[param]``)."""
    return os.environ["PYTEST_CURRENT_TEST"].rsplit(" ", 1)[0]


def fresh_process(timeout: float = 300.0) -> Callable[[F], F]:
    """Decorate a test to run its body in a fresh process (at most ``timeout`` seconds)."""

    def decorate(test: F) -> F:
        @functools.wraps(test)
        def run(*args: Any, **kwargs: Any) -> Any:
            node = _node_id()
            if os.environ.get(_CHILD) == node:
                return test(*args, **kwargs)
            _run_child(node, timeout)
            return None

        return run  # type: ignore[return-value]

    return decorate


def _run_child(node: str, timeout: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        command = [
            sys.executable, "-m", "pytest", node, "-q", "-p", "no:randomly",
            "-p", "no:cacheprovider", "-p", "no:hypothesispytest", f"--junitxml={report}",
        ]  # fmt: skip
        try:
            done = subprocess.run(
                command,
                cwd=_ROOT,
                env={**os.environ, _CHILD: node},
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            pytest.fail(f"{node} did not finish in {timeout:.0f} s in a fresh process: {e}")
        output = done.stdout + done.stderr
        cases = list(ET.parse(report).getroot().iter("testcase")) if report.exists() else []
        skipped = [r for case in cases for r in case if r.tag == "skipped"]
        if done.returncode == 0 and skipped:
            pytest.skip(skipped[0].get("message", "skipped in the fresh process"))
        if done.returncode != 0 or len(cases) != 1:
            pytest.fail(
                f"{node} failed in a fresh process (exit code {done.returncode}):\n"
                + output[-6000:],
                pytrace=False,
            )
