"""Fail the docs build on a malformed code fence.

Markdown forgives a broken fence silently: a closing fence with text after it (```` ``` Use
this ````) is not a closing fence, so the block runs on and swallows the headings and prose
below it, and the page still builds. This extension reads every Markdown source before MyST
parses it and warns (an error under ``sphinx -W``) on:

* a fence line with text after its backticks (or tildes) inside an open block: a closing
  fence takes no text, so the block does not end there;
* a block that is never closed;
* a Markdown heading inside a block whose language has no ``#`` comments (none named,
  ``markdown``, ``md``, ``myst``): a heading a broken fence swallowed.

:func:`fence_problems` is the check itself; ``tests/test_docs.py`` runs it on every page and
the README.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the check itself runs without Sphinx (the tests use it so)
    from sphinx.application import Sphinx


_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_HEADING = re.compile(r"^#{1,6}\s+\S")
#: Block languages in which a line starting with ``#`` is a heading, not a comment.
_MARKDOWN_LANGS = {"", "markdown", "md", "myst"}


def fence_problems(text: str) -> list[tuple[int, str]]:
    """``(line, problem)`` for every malformed fence of a Markdown text (1-based lines)."""
    problems: list[tuple[int, str]] = []
    open_fence: str | None = None
    open_line = 0
    lang = ""
    for number, line in enumerate(text.splitlines(), start=1):
        m = _FENCE.match(line)
        if open_fence is None:
            if m:
                open_fence, open_line = m.group("fence"), number
                info = m.group("info").strip()
                lang = info.split()[0].lower() if info else ""
            continue
        if m and m.group("fence")[0] == open_fence[0] and len(m.group("fence")) >= len(open_fence):
            if m.group("info").strip():
                problems.append(
                    (
                        number,
                        f"text after a closing fence ({line.strip()[:40]!r}): a closing fence "
                        f"takes no text, so the block opened at line {open_line} runs on; put "
                        "the text on a line of its own",
                    )
                )
                continue
            open_fence = None
            continue
        if lang in _MARKDOWN_LANGS and _HEADING.match(line):
            problems.append(
                (
                    number,
                    f"a heading inside the code block opened at line {open_line} "
                    f"({line.strip()[:40]!r}): is a fence above it broken?",
                )
            )
    if open_fence is not None:
        problems.append((open_line, "a code block that is never closed"))
    return problems


def _check(app: Sphinx, docname: str, source: list[str]) -> None:
    if not app.env.doc2path(docname).suffix == ".md":
        return
    from sphinx.util import logging

    logger = logging.getLogger(__name__)
    for line, problem in fence_problems(source[0]):
        logger.warning(problem, location=(docname, line))


def setup(app: Sphinx) -> dict[str, object]:
    app.connect("source-read", _check)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
