"""Repository-level pytest configuration.

The doctests of ``anybn/torch.py`` need PyTorch; without it the module is not
collected, so the README's test command also works where torch is not installed.
``tests/typecheck/`` is for mypy (``.ci/check_typing.py``), not for pytest.

The summary lists failures and errors in full (``-rfE`` in pyproject.toml) and the
skipped and xfailed tests grouped by reason, one line per reason with a count, so
that a missing backend is one line instead of hundreds.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

# tests/typecheck holds call sites for mypy (.ci/check_typing.py), some deliberately wrong.
collect_ignore = ["tests/typecheck"]
if importlib.util.find_spec("torch") is None:
    collect_ignore.append("anybn/torch.py")


def _reason(report: pytest.TestReport) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    return str(getattr(report, "wasxfail", "") or report.longrepr)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Skips and xfails, grouped by reason: ``count  reason``, most frequent first."""
    for key, title in (("skipped", "skipped"), ("xfailed", "xfailed")):
        reports = terminalreporter.stats.get(key, [])
        if not reports:
            continue
        counts = Counter(_reason(r) for r in reports)
        terminalreporter.write_sep("=", f"{len(reports)} {title}, by reason")
        for reason, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])):
            terminalreporter.write_line(f"{n:6d}  {reason}")
