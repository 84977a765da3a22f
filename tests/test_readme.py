"""Every Python example in README.md runs (examples for a missing backend are skipped)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from anybn._backends import get_backend

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
# The block that shows the call signatures is a template, not a runnable example.
EXAMPLES = [b for b in BLOCKS if ", *," not in b]

NEEDS = {
    "import cupy": "cupy",
    "import torch": "torch",
    "import array_api_strict": "array_api_strict",
}


def test_readme_has_examples() -> None:
    assert len(EXAMPLES) >= 5


@pytest.mark.parametrize("code", EXAMPLES, ids=[f"block{i}" for i in range(len(EXAMPLES))])
def test_readme_example_runs(code: str) -> None:
    for marker, backend_id in NEEDS.items():
        if marker in code:
            reason = get_backend(backend_id).unavailable_reason()
            if reason is not None:
                pytest.skip(reason)
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})
