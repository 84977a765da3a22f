#!/usr/bin/env python
"""mypy at anybn's call sites: tests/typecheck/usage.py must pass, fail.py must fail as tagged.

    python .ci/check_typing.py

``usage.py`` calls the public API with NumPy arrays, torch tensors and array-api-strict arrays
(and checks with ``assert_type`` that ``BatchNorm`` returns the input's array type); mypy must
find no error. Every line of ``fail.py`` tagged ``# E: <code>`` must get a mypy error with
that code, and no other line any error: if a public signature loses its array type (back to
``Any``), the wrong calls pass and this check fails. mypy reads the checkout's anybn
(``MYPYPATH``), not an installed copy.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = ROOT / "tests" / "typecheck"


def mypy(path: Path) -> tuple[int, str]:
    env = {**os.environ, "MYPYPATH": str(ROOT)}
    cmd = [
        sys.executable,
        "-m",
        "mypy",
        "--no-incremental",
        "--config-file",
        str(ROOT / "pyproject.toml"),
        "--show-error-codes",
        # Errors inside anybn are `mypy anybn`'s to report; here only the call sites count.
        "--follow-imports=silent",
        str(path.relative_to(ROOT)),
    ]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def main() -> int:
    ok = True
    rc, out = mypy(CASES / "usage.py")
    print(f"check_typing: mypy tests/typecheck/usage.py -> exit {rc}")
    if rc != 0:
        print(out)
        ok = False

    fail = CASES / "fail.py"
    expected = {
        (i, m.group(1))
        for i, line in enumerate(fail.read_text().splitlines(), 1)
        if (m := re.search(r"# E: ([\w-]+)\s*$", line))
    }
    rc, out = mypy(fail)
    got = {
        (int(m.group(1)), m.group(2))
        for m in re.finditer(r"^tests/typecheck/fail\.py:(\d+): error: .*\[([\w-]+)\]$", out, re.M)
    }
    missing, unexpected = sorted(expected - got), sorted(got - expected)
    print(
        f"check_typing: mypy tests/typecheck/fail.py -> exit {rc}, {len(expected & got)} of"
        f" {len(expected)} expected errors"
    )
    for line, code in missing:
        print(f"  fail.py:{line}: expected a [{code}] error, mypy reported none")
    for line, code in unexpected:
        print(f"  fail.py:{line}: unexpected [{code}] error")
    if missing or unexpected or rc == 0:
        print(out)
        ok = False
    print("check_typing: ok" if ok else "check_typing: FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
