"""The documentation cannot drift from the code: every example in docs/ runs.

Rules for code blocks in ``docs/**/*.md`` (checked here):

* Python blocks (```` ```python ````, ```` ```pycon ````) are doctests: every
  one must have ``>>>`` prompts, and its output must match. The blocks of one
  page run in order in one namespace, like a notebook.
* A block preceded by a MyST comment ``% doctest: requires <backend-id> ...``
  (``cupy``, ``torch:cuda``, ``torch``, ... as in :mod:`anybn._testing.backends`) is a
  test of its own: it runs after the page's unmarked blocks that precede it (in
  their namespace, so it can use what they defined), and is skipped with the
  backend's reason where that backend is unavailable (the GPU examples on a
  CPU-only machine). Marked blocks never see each other's names.
* ``% doctest: skip <why>`` leaves a block out, saying why.
* Shell blocks (```` ```console ````, ```` ```bash ````) must be marked either
  ``% doctest: run`` (each ``$ command`` line is run from the repository root
  and must exit 0) or ``% doctest: skip <why>`` (installs, GPU-only commands).

Also checked: every public name has a docstring with an ``Examples`` section,
the hand-made intersphinx inventories match ``docs/scripts/make_inventories.py``,
and (when Sphinx is installed) the site builds with ``-W`` and loads no script or
stylesheet from the network (the MathJax is bundled).
"""

from __future__ import annotations

import doctest
import importlib
import inspect
import io
import os
import pkgutil
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import anybn
from anybn._testing.backends import get_backend

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p for p in DOCS.rglob("*.md") if "_build" not in p.parts)

PYTHON_LANGS = {"python", "py", "pycon", "python3"}
SHELL_LANGS = {"console", "bash", "sh", "shell", "shell-session"}
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
MARKER = re.compile(r"^%\s*doctest:\s*(?P<kind>run|skip|requires)\b\s*(?P<arg>.*)$")
OPTIONFLAGS = doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE


@dataclass
class Block:
    page: Path
    lineno: int  # 1-based line of the first line inside the fence
    lang: str
    text: str
    marker: str | None  # "run", "skip", "requires"
    arg: str

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.lineno}"


def _lang(info: str) -> str:
    info = info.strip()
    m = re.match(r"\{(?:code-block|code|sourcecode)\}\s*(\S*)", info)
    if m:
        return m.group(1).lower()
    return info.split()[0].lower() if info else ""


def parse_blocks(page: Path) -> list[Block]:
    """The fenced code blocks of a MyST page, with the doctest marker above each."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i].lstrip())
        if not m:
            i += 1
            continue
        fence, info = m.group("fence"), m.group("info")
        marker = arg = None
        j = i - 1
        while j >= 0 and not lines[j].strip():
            j -= 1
        if j >= 0:
            mm = MARKER.match(lines[j].strip())
            if mm:
                marker, arg = mm.group("kind"), mm.group("arg").strip()
        body: list[str] = []
        k = i + 1
        while k < len(lines) and not lines[k].lstrip().startswith(fence):
            body.append(lines[k])
            k += 1
        lang = _lang(info)
        if lang in PYTHON_LANGS | SHELL_LANGS:
            blocks.append(Block(page, i + 2, lang, "\n".join(body) + "\n", marker, arg or ""))
        i = k + 1
    return blocks


ALL_BLOCKS = [b for p in PAGES for b in parse_blocks(p)]


def _run_doctest(blocks: list[Block], name: str) -> None:
    """Run the blocks' ``>>>`` examples in order, in one namespace; fail with the report."""
    parser = doctest.DocTestParser()
    examples: list[doctest.Example] = []
    for b in blocks:
        for ex in parser.get_examples(b.text, name=b.where):
            ex.lineno += b.lineno - 1
            examples.append(ex)
    globs = {"__name__": f"docs_{name}"}
    test = doctest.DocTest(examples, globs, name, str(blocks[0].page), 0, None)
    out = io.StringIO()
    runner = doctest.DocTestRunner(optionflags=OPTIONFLAGS)
    result = runner.run(test, out=out.write)
    if result.failed:
        pytest.fail(f"{result.failed} of {result.attempted} examples failed:\n{out.getvalue()}")


def _page_id(page: Path) -> str:
    return str(page.relative_to(DOCS).with_suffix(""))


def test_docs_have_pages() -> None:
    names = {_page_id(p) for p in PAGES}
    assert {"index", "getting-started", "math", "semantics", "contributing"} <= names


def _fence_problems() -> object:
    sys.path.insert(0, str(DOCS / "_ext"))
    try:
        from anybn_fences import fence_problems
    finally:
        sys.path.remove(str(DOCS / "_ext"))
    return fence_problems


@pytest.mark.parametrize("page", [*PAGES, ROOT / "README.md"], ids=lambda p: p.name)
def test_code_fences_are_well_formed(page: Path) -> None:
    """No code block that never closes, no closing fence with text after it (which does not
    close: the block swallows what follows), no heading inside a Markdown block."""
    problems = _fence_problems()(page.read_text(encoding="utf-8"))  # type: ignore[operator]
    assert not problems, "\n".join(f"{page.name}:{n}: {p}" for n, p in problems)


def test_the_fence_check_finds_what_markdown_forgives() -> None:
    check = _fence_problems()
    broken = "Run\n```console\n$ asv run\n``` then look\n\n## The dashboard\n\ntext\n"
    assert [n for n, _ in check(broken)] == [4, 2]  # type: ignore[operator]  # and unclosed
    assert [n for n, _ in check("```python\nx = 1\n")] == [1]  # type: ignore[operator]
    assert [n for n, _ in check("```\n## Swallowed\n```\n")] == [2]  # type: ignore[operator]
    fine = "```console\n$ ls  # a comment\n```\n\n````md\n```python\n```\n````\n"
    assert check(fine) == []  # type: ignore[operator]


def test_every_code_block_is_accounted_for() -> None:
    """No example silently escapes the tests: each block runs or says why not."""
    problems = []
    for b in ALL_BLOCKS:
        if b.lang in PYTHON_LANGS and b.marker != "skip" and ">>> " not in b.text:
            problems.append(f"{b.where}: Python block without >>> prompts (not executable)")
        if b.lang in SHELL_LANGS and b.marker not in {"run", "skip"}:
            problems.append(f"{b.where}: shell block needs '% doctest: run' or '% doctest: skip'")
        if b.marker == "skip" and not b.arg:
            problems.append(f"{b.where}: '% doctest: skip' needs a reason")
        if b.marker == "requires" and not b.arg:
            problems.append(f"{b.where}: '% doctest: requires' needs backend ids")
        if b.marker == "run" and b.lang not in SHELL_LANGS:
            problems.append(f"{b.where}: '% doctest: run' is for shell blocks")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_page_examples(page: Path) -> None:
    """The page's unmarked Python examples, in order, in one namespace."""
    blocks = [b for b in parse_blocks(page) if b.lang in PYTHON_LANGS and b.marker is None]
    if not blocks:
        pytest.skip("no unmarked Python examples on this page")
    _run_doctest(blocks, _page_id(page))


REQUIRES = [b for b in ALL_BLOCKS if b.lang in PYTHON_LANGS and b.marker == "requires"]


@pytest.mark.parametrize("block", REQUIRES, ids=[b.where for b in REQUIRES])
def test_backend_examples(block: Block) -> None:
    """A block that needs a backend (a GPU, ...): run after the page's unmarked blocks before it."""
    for backend_id in block.arg.split():
        reason = get_backend(backend_id).unavailable_reason()
        if reason is not None:
            pytest.skip(f"{backend_id}: {reason}")
    before = [
        b
        for b in parse_blocks(block.page)
        if b.lang in PYTHON_LANGS and b.marker is None and b.lineno < block.lineno
    ]
    _run_doctest([*before, block], block.where)


COMMANDS = [
    (b, line[2:].strip())
    for b in ALL_BLOCKS
    if b.marker == "run"
    for line in b.text.splitlines()
    if line.startswith("$ ")
]


@pytest.mark.parametrize("block, command", COMMANDS, ids=[c for _, c in COMMANDS])
def test_shell_commands(block: Block, command: str) -> None:
    argv = shlex.split(command)
    if argv and argv[0] == "python":
        argv[0] = sys.executable
    # The checkout's anybn, whatever is installed (a script's own directory comes first).
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{block.where}: {command}\n{proc.stdout}\n{proc.stderr}"


def _public_objects() -> list[tuple[str, object]]:
    modules = [anybn]
    for info in pkgutil.iter_modules(anybn.__path__):
        if not info.name.startswith("_"):
            try:
                modules.append(importlib.import_module(f"anybn.{info.name}"))
            except ImportError:
                continue  # an optional dependency is missing; the docs build reports it
    return [
        (f"{m.__name__}.{name}", getattr(m, name))
        for m in modules
        for name in m.__all__
        if not (name.startswith("__") and name.endswith("__"))
    ]


PUBLIC = _public_objects()

# Public names whose docstrings (owned by the core, not the docs) still lack an Examples
# section. Strict: once an example is added the test XPASSes and fails, so remove the name.
MISSING_EXAMPLES: set[str] = set()


@pytest.mark.parametrize(
    "name, obj",
    [
        pytest.param(
            n, o, marks=pytest.mark.xfail(strict=True, reason="docstring has no Examples yet")
        )
        if n in MISSING_EXAMPLES
        else (n, o)
        for n, o in PUBLIC
    ],
    ids=[n for n, _ in PUBLIC],
)
def test_public_name_has_example(name: str, obj: object) -> None:
    doc = inspect.getdoc(obj) or ""
    if inspect.ismodule(obj):
        assert doc, f"{name} has no docstring"
        return
    assert re.search(r"^Examples\n-{8}", doc, flags=re.M) and ">>> " in doc, (
        f"{name}: its numpydoc docstring needs an 'Examples' section with a >>> example"
    )


def test_inventories_are_current() -> None:
    """The committed .inv files are what docs/scripts/make_inventories.py writes."""
    pytest.importorskip("sphinx")
    sys.path.insert(0, str(DOCS / "scripts"))
    try:
        make_inventories = importlib.import_module("make_inventories")
    finally:
        sys.path.pop(0)
    for key, (project, version, _base, objects) in make_inventories.OBJECTS.items():
        committed = (DOCS / "_inventories" / f"{key}.inv").read_bytes()
        assert committed == make_inventories.render(project, version, objects), (
            f"docs/_inventories/{key}.inv is stale: run python docs/scripts/make_inventories.py"
        )


@pytest.mark.slow
def test_sphinx_build_is_clean(tmp_path: Path) -> None:
    """``python -m sphinx -W -b html docs <out>``: warnings are errors."""
    for mod in ("sphinx", "furo", "myst_parser", "numpydoc"):
        pytest.importorskip(mod)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sphinx",
            "-W",
            "--keep-going",
            "-q",
            "-b",
            "html",
            "-d",
            str(tmp_path / "doctrees"),
            str(DOCS),
            str(tmp_path / "html"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # The site works offline: no page loads a script or a stylesheet from another host (a
    # CDN MathJax left the formulas as raw TeX offline). .ci/check_site.py checks the pages
    # in Chromium; this is the same promise where no browser is installed.
    remote = re.compile(
        r"<script[^>]*\ssrc=\"(?:https?:)?//|<link[^>]*rel=\"stylesheet\"[^>]*href=\"(?:https?:)?//"
    )
    pages = sorted((tmp_path / "html").rglob("*.html"))
    offenders = [str(p.relative_to(tmp_path)) for p in pages if remote.search(p.read_text())]
    assert not offenders, f"pages that load scripts or styles from the network: {offenders}"
    assert (tmp_path / "html" / "_static" / "mathjax" / "tex-svg.js").is_file()
