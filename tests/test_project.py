"""What a newcomer meets before the code: install advice, packaging metadata, test output.

Each test guards one promise of issue 13 against its return:

* install advice lives in one place (the README section that ``docs/install.md`` includes),
  names PyTorch's CPU index and the CUDA builds, and no extra but ``torch``/``cupy`` pulls a
  GPU library (a bare ``torch`` on Linux is a CUDA build of several GB);
* the packaging metadata a packager checks (LICENSE, build floor for the SPDX string, URLs,
  Python classifiers); ``.ci/check_dist.sh`` builds and installs the real artefacts;
* the docs render math offline (the bundled MathJax; ``.ci/check_site.py`` looks in Chromium);
* wherever the asv dashboard is mentioned, so is its need for network;
* the test summary groups skips by reason and shows failures in full;
* public signatures carry the array protocol (``.ci/check_typing.py`` runs mypy on call sites).
"""

from __future__ import annotations

import ast
import inspect
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import anybn

if sys.version_info >= (3, 11):
    import tomllib
else:  # pytest depends on tomli below 3.11
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
PROJECT = PYPROJECT["project"]
README = (ROOT / "README.md").read_text(encoding="utf-8")
DOC_PAGES = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_build" not in p.parts)
START, END = "<!-- install:start -->", "<!-- install:end -->"
GPU_REQUIREMENT = re.compile(r"^(torch|cupy(-cuda\w+)?|nvidia-[\w-]+|jax\[cuda\w*\])\b", re.I)


def _install_section() -> str:
    assert README.count(START) == 1 and README.count(END) == 1
    return README[README.index(START) : README.index(END)]


def _extra(name: str, seen: frozenset[str] = frozenset()) -> list[str]:
    """The requirements of an extra, with ``anybn[...]`` self-references expanded."""
    out = []
    for req in PROJECT["optional-dependencies"][name]:
        m = re.fullmatch(r"anybn\[([\w,\s-]+)\]", req)
        if m:
            for sub in m.group(1).split(","):
                if sub.strip() not in seen:
                    out += _extra(sub.strip(), seen | {name})
        else:
            out.append(req)
    return out


# --- install advice -----------------------------------------------------------------------


@pytest.mark.parametrize("extra", sorted(set(PROJECT["optional-dependencies"]) - {"torch", "cupy"}))
def test_extras_pull_no_gpu_library(extra: str) -> None:
    gpu = [r for r in _extra(extra) if GPU_REQUIREMENT.match(r)]
    assert not gpu, f"extra {extra!r} pulls {gpu}: on Linux that means CUDA wheels by surprise"


def test_test_extra_has_what_torch_testing_imports() -> None:
    """tests/test_torch_upstream.py runs PyTorch's samples from ``torch.testing._internal``,
    which imports expecttest: without it in the ``test`` extra a plain install skips the file."""
    names = {re.split(r"[<>=!~\[;\s]", r, maxsplit=1)[0].lower() for r in _extra("test")}
    assert "expecttest" in names


def test_install_section_names_the_cpu_index_and_cuda_builds() -> None:
    section = _install_section()
    assert "--index-url https://download.pytorch.org/whl/cpu" in section
    assert "CUDA build" in section
    assert "cupy-cuda12x" in section and "cupy-cuda13x" in section
    for extra in ("test", "docs", "bench", "dev"):
        assert f'".[{extra}]"' in section, f"the install section does not show the {extra} extra"


def test_docs_include_the_readme_install_section() -> None:
    page = (ROOT / "docs" / "install.md").read_text(encoding="utf-8")
    assert "```{include} ../README.md" in page
    assert f":start-after: {START}" in page and f":end-before: {END}" in page
    index = (ROOT / "docs" / "index.md").read_text(encoding="utf-8")
    assert re.search(r"^install$", index, re.M), "docs/install.md is not in the toctree"


def _advice_outside_the_install_section() -> list[str]:
    """Lines, outside the README's install section, that give their own PyTorch advice."""
    torch_install = re.compile(
        r"pip install[^\n`]*(\btorch\b(?!\.)|\[[^\]]*\btorch\b[^\]]*\])|torch==|whl/(cpu|cu)"
    )
    section = _install_section()
    texts = {"README.md": README.replace(section, "")}
    texts |= {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in DOC_PAGES}
    return [
        f"{name}:{i}: {line.strip()}"
        for name, text in texts.items()
        for i, line in enumerate(text.splitlines(), 1)
        if torch_install.search(line)
    ]


def test_pytorch_install_advice_lives_in_one_place() -> None:
    stray = _advice_outside_the_install_section()
    assert not stray, (
        "PyTorch install advice outside the README's install section (link to it instead):\n"
        + "\n".join(stray)
    )


# --- packaging ----------------------------------------------------------------------------


def test_license_file_matches_the_spdx_expression() -> None:
    assert PROJECT["license"] == "BSD-3-Clause"
    assert PROJECT.get("license-files") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text(encoding="utf-8")
    assert text.startswith("BSD 3-Clause License")
    assert "Neither the name of the copyright holder" in text


def test_build_floor_reads_the_spdx_license_string() -> None:
    """``license = "<SPDX>"`` and ``license-files`` need setuptools >= 77 (PEP 639)."""
    (req,) = [r for r in PYPROJECT["build-system"]["requires"] if r.startswith("setuptools")]
    m = re.fullmatch(r"setuptools>=(\d+)(\.\d+)*", req)
    assert m and int(m.group(1)) >= 77, req


def test_no_link_points_where_the_project_is_not() -> None:
    """The project has no public repository yet: no metadata, docs or benchmark config may
    name one (a placeholder address that serves nothing of the project)."""
    assert "urls" not in PROJECT
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    placeholder = "github.com/" + "anybn/anybn"
    named = [
        f for f in tracked
        if (ROOT / f).is_file() and placeholder in (ROOT / f).read_text(errors="ignore")
    ]  # fmt: skip
    assert not named, f"{placeholder} appears in {named}"


def test_python_classifiers() -> None:
    lowest = int(re.fullmatch(r">=3\.(\d+)", PROJECT["requires-python"]).group(1))
    minors = {
        int(m.group(1))
        for c in PROJECT["classifiers"]
        if (m := re.fullmatch(r"Programming Language :: Python :: 3\.(\d+)", c))
    }
    assert lowest in minors, "no classifier for the lowest supported Python"
    assert minors == set(range(lowest, max(minors) + 1)), f"a gap in {sorted(minors)}"
    assert not any(c.startswith("License ::") for c in PROJECT["classifiers"]), (
        "License classifiers are rejected beside an SPDX license expression"
    )


# --- docs: offline math, the dashboard ----------------------------------------------------


def test_docs_math_is_bundled_not_from_a_cdn() -> None:
    conf = runpy.run_path(str(ROOT / "docs" / "conf.py"))
    assert "sphinx-mathjax-offline" in conf["extensions"]
    app = SimpleNamespace(config=SimpleNamespace(mathjax_path=None))
    conf["setup"](app)
    assert app.config.mathjax_path == "mathjax/tex-svg.js"
    assert "sphinx-mathjax-offline" in " ".join(PROJECT["optional-dependencies"]["docs"])


def test_the_asv_dashboard_is_never_recommended_without_its_network_caveat() -> None:
    texts = {"README.md": README} | {
        str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in DOC_PAGES
    }
    for name, text in texts.items():
        for section in re.split(r"^#{1,4} ", text, flags=re.M):
            if re.search(r"^(\$ )?asv publish", section, re.M):  # the command, shown to run
                assert "CDN" in section and "offline" in section, (
                    f"{name}: a section that sends people to `asv publish` must say the"
                    " dashboard loads its scripts from CDNs and is blank offline"
                )


# --- test output --------------------------------------------------------------------------


def test_skips_are_grouped_by_reason_and_failures_shown_in_full(tmp_path: Path) -> None:
    addopts = PYPROJECT["tool"]["pytest"]["ini_options"]["addopts"]
    assert "-ra" not in addopts and "-rfE" in addopts
    shutil.copy(ROOT / "conftest.py", tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -rfE\n")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(30))\n"
        "def test_missing(i):\n"
        "    pytest.skip('frob: frobnicator is not installed')\n"
        "@pytest.mark.parametrize('i', range(2))\n"
        "def test_gpu(i):\n"
        "    pytest.skip('widget: no GPU')\n"
        "def test_broken():\n"
        "    assert 1 + 1 == 3, 'arithmetic is broken'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    out = proc.stdout
    assert proc.returncode == 1, out
    assert "32 skipped, by reason" in out
    assert re.search(r"^\s+30  frob: frobnicator is not installed$", out, re.M), out
    assert re.search(r"^\s+2  widget: no GPU$", out, re.M), out
    assert "SKIPPED [" not in out, "skips are listed one per line again (-rs or -ra)"
    assert "FAILED test_sample.py::test_broken" in out
    assert "AssertionError: arithmetic is broken" in out  # the failure, in full


def test_the_summary_says_what_the_deselected_tests_are(tmp_path: Path) -> None:
    """The thinned JAX and Dask rows (tests/conftest.py) are explained, not a bare count."""
    (tmp_path / "conftest.py").write_text(
        (ROOT / "conftest.py").read_text()
        + "\n\ndef pytest_collection_modifyitems(config, items):\n"
        "    drop = [i for i in items if 'thin' in i.name]\n"
        "    config.hook.pytest_deselected(items=drop)\n"
        "    items[:] = [i for i in items if i not in drop]\n"
        "    config.anybn_thinned = len(drop)\n"
    )
    (tmp_path / "pytest.ini").write_text("[pytest]\naddopts = -rfE\n")
    (tmp_path / "test_sample.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('i', range(3))\n"
        "def test_thin(i):\n"
        "    pass\n"
        "def test_kept():\n"
        "    pass\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "3 deselected on purpose" in out, out
    assert re.search(r"^\s+3  JAX and Dask rows .* thinned", out, re.M), out


# --- types --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "func, params",
    [
        (anybn.batch_norm, ["x", "running_mean", "running_var", "weight", "bias"]),
        (anybn.batch_norm_backward, ["dy", "x", "weight", "mean", "invstd"]),
        (anybn.BatchNorm.backward, ["dy"]),
        (anybn.chan_merge, ["count_a", "mean_a", "m2_a", "count_b", "mean_b", "m2_b"]),
        (anybn.fold, ["weight", "bias", "running_mean", "running_var", "bn_weight", "bn_bias"]),
    ],
    ids=lambda v: getattr(v, "__qualname__", ""),
)
def test_public_signatures_use_the_array_protocol(func: object, params: list[str]) -> None:
    """The annotations mypy sees (``.ci/check_typing.py`` runs mypy on real call sites)."""
    sig = inspect.signature(func)  # type: ignore[arg-type]
    for name in params:
        assert "AnyArray" in str(sig.parameters[name].annotation), (name, sig)
    assert "ArrayT" in str(inspect.signature(anybn.BatchNorm.forward).parameters["x"].annotation)
    assert anybn.AnyArray.__module__ == "anybn._typing"


#: A top-level import of one of these needs the optional dependency on the right.
_OPTIONAL = {"torch": "torch", "jax": "jax", "numba": "numba", "llvmlite": "numba",
             "dask": "dask", "mpi4py": "mpi4py", "cupy": "cupy", "sparse": "sparse"}  # fmt: skip


def _top_level_imports(path: Path) -> set[str]:
    """The top-level packages a module imports when it is imported (not inside functions)."""
    names: set[str] = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_doctest_collection_skips_every_module_that_needs_an_optional_dependency() -> None:
    # --doctest-modules imports every module of anybn/ and tests/: one that imports an
    # optional dependency at the top must be in conftest's table, or the README's test
    # command fails to collect where that dependency is not installed.
    needs = runpy.run_path(str(ROOT / "conftest.py"))["_NEEDS"]
    files = [*(ROOT / "anybn").rglob("*.py"), *(ROOT / "tests").glob("_*.py")]
    missing = []
    for path in files:
        rel = path.relative_to(ROOT).as_posix()
        for name in _top_level_imports(path) & set(_OPTIONAL):
            if needs.get(rel) != _OPTIONAL[name]:
                missing.append(f"{rel} imports {name}")
    assert not missing, missing


def test_every_cdn_file_of_the_asv_dashboard_has_an_npm_twin() -> None:
    """asv_benchmarks/publish.py vendors what asv's page loads from CDNs; a newer asv that
    loads one more file would leave the dashboard broken offline."""
    asv = pytest.importorskip("asv")
    publish = runpy.run_path(str(ROOT / "asv_benchmarks" / "publish.py"), run_name="publish")
    page = (Path(asv.__file__).parent / "www" / "index.html").read_text(encoding="utf-8")
    remote = re.findall(r"<(?:script|link)\b[^>]*\b(?:src|href)=\"(https?://[^\"]+)\"", page)
    assert remote, "asv's page loads nothing from a CDN any more: publish.py may go"
    cdns = [a.cdn for a in publish["ASSETS"]]
    assert all(any(c in url for c in cdns) for url in remote), remote
