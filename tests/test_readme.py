"""Every code block in README.md runs, or says why not.

* Python blocks (```` ```python ````) are run, each in a fresh namespace; a block that imports
  a backend (``torch``, ``cupy``, ``array_api_strict``) is skipped with the backend's reason
  where it is unavailable.
* Shell blocks (```` ```bash ````, ``console``, ``sh``, ``shell``) carry an HTML comment
  (invisible on GitHub and PyPI) on the line above:
  ``<!-- readme: ci ... -->``: every command of the block is run by ``.ci/run`` as written
  (``-q`` flags aside), which this test checks; or ``<!-- readme: skip <why> -->``.
* Blocks in any other language fail the test: add them to a rule here first. Untagged and
  ``text`` blocks are output, not code.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from anybn._testing.backends import get_backend

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_RUN = ROOT / ".ci" / "run"

PYTHON_LANGS = {"python", "py", "python3"}
SHELL_LANGS = {"bash", "console", "sh", "shell"}
OUTPUT_LANGS = {"", "text", "output"}
MARKER = re.compile(r"^<!--\s*readme:\s*(?P<kind>ci|skip)\b\s*(?P<arg>.*?)\s*-->$")

NEEDS = {
    "import cupy": "cupy",
    "import torch": "torch",
    "import array_api_strict": "array_api_strict",
}


@dataclass
class Block:
    lineno: int  # 1-based line of the opening fence
    lang: str
    text: str
    marker: str | None
    arg: str


def parse_blocks(text: str) -> list[Block]:
    lines = text.splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = re.match(r"^(`{3,}|~{3,})\s*(\S*)", lines[i])
        if not m:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        marker = arg = None
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0 and (mm := MARKER.match(lines[j].strip())):
            marker, arg = mm.group("kind"), mm.group("arg")
        k = i + 1
        while k < len(lines) and not lines[k].startswith(fence):
            k += 1
        blocks.append(Block(i + 1, lang, "\n".join(lines[i + 1 : k]) + "\n", marker, arg or ""))
        i = k + 1
    return blocks


BLOCKS = parse_blocks(README.read_text(encoding="utf-8"))
PYTHON = [b for b in BLOCKS if b.lang in PYTHON_LANGS]
SHELL = [b for b in BLOCKS if b.lang in SHELL_LANGS]


def _normalize(command: str) -> str:
    """A command line without pip's ``-q`` flags and with its quoting normalized."""
    try:
        words = shlex.split(command, comments=True)
    except ValueError:  # not one command line (a quote that spans lines in .ci/run)
        return command
    return shlex.join(w for w in words if w != "-q")


def _commands(block_text: str) -> list[str]:
    out = []
    for line in block_text.splitlines():
        line = line.split(" #", 1)[0].strip()  # a trailing comment
        if line.startswith("$ "):
            line = line[2:]
        if line:
            out.append(line)
    return out


def test_readme_has_examples() -> None:
    assert len(PYTHON) >= 5
    assert len(SHELL) >= 3


def test_every_block_is_accounted_for() -> None:
    problems = []
    for b in BLOCKS:
        known = PYTHON_LANGS | SHELL_LANGS | OUTPUT_LANGS
        if b.lang not in known:
            problems.append(f"README.md:{b.lineno}: block tagged {b.lang!r}: no rule runs it")
        if b.lang in SHELL_LANGS and b.marker is None:
            problems.append(
                f"README.md:{b.lineno}: shell block needs '<!-- readme: ci -->' or"
                " '<!-- readme: skip <why> -->' on the line above"
            )
        if b.marker == "skip" and not b.arg:
            problems.append(f"README.md:{b.lineno}: '<!-- readme: skip -->' needs a reason")
        if b.marker is not None and b.lang not in SHELL_LANGS:
            problems.append(f"README.md:{b.lineno}: readme markers are for shell blocks")
    assert not problems, "\n".join(problems)


CI_BLOCKS = [b for b in SHELL if b.marker == "ci"]


@pytest.mark.parametrize("block", CI_BLOCKS, ids=[f"line{b.lineno}" for b in CI_BLOCKS])
def test_ci_runs_the_readme_commands(block: Block) -> None:
    """A block marked ``readme: ci`` is run by ``.ci/run`` command for command."""
    ci = {_normalize(line.strip()) for line in CI_RUN.read_text().splitlines() if line.strip()}
    missing = [c for c in _commands(block.text) if _normalize(c) not in ci]
    assert not missing, f"README.md:{block.lineno}: .ci/run does not run {missing}"


@pytest.mark.parametrize("code", [b.text for b in PYTHON], ids=[f"line{b.lineno}" for b in PYTHON])
def test_readme_example_runs(code: str) -> None:
    for marker, backend_id in NEEDS.items():
        if marker in code:
            reason = get_backend(backend_id).unavailable_reason()
            if reason is not None:
                pytest.skip(f"{backend_id}: {reason}")
    exec(compile(code, str(README), "exec"), {"__name__": "readme_example"})


def test_the_signature_block_is_no_longer_exempt() -> None:
    """The block that shows both signatures runs too (it used to be a non-runnable sketch)."""
    assert any("batch_norm_backward(dy, x, None, mean, invstd" in b.text for b in PYTHON)
