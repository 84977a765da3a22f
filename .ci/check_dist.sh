#!/usr/bin/env bash
# Build the sdist and the wheel as a packager would, check them, and install the wheel in a
# fresh venv (no system site-packages: only what the wheel declares) and run its report.
#
#   bash .ci/check_dist.sh [OUTDIR]      (default: dist/)
#
# Checks: `python -m build` (isolated: the build floor in pyproject.toml is what gets used),
# `twine check --strict`, the LICENSE and py.typed inside the wheel, the SPDX license in the
# metadata, and `python -m anybn` from the venv, run outside the checkout so the installed
# copy is the one imported. Needs PyPI (the build backend, numpy, array-api-compat).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-dist}"
rm -rf "$out"
work="$(mktemp -d /tmp/anybn-dist.XXXXXX)"
trap 'rm -rf "$work"' EXIT

python -m pip install -q build "twine>=6.1"
python -m build --outdir "$out" . > "$work/build.log" 2>&1 || { cat "$work/build.log"; exit 1; }
ls -l "$out"
python -m twine check --strict "$out"/*

wheel=("$out"/anybn-*.whl)
sdist=("$out"/anybn-*.tar.gz)
python - "${wheel[0]}" "${sdist[0]}" <<'EOF'
import sys
import tarfile
import zipfile

wheel, sdist = sys.argv[1:]
names = zipfile.ZipFile(wheel).namelist()
meta = next(n for n in names if n.endswith(".dist-info/METADATA"))
text = zipfile.ZipFile(wheel).read(meta).decode()
problems = []
for need in ("anybn/py.typed", "anybn/__main__.py"):
    if need not in names:
        problems.append(f"wheel lacks {need}")
if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
    problems.append("wheel lacks .dist-info/licenses/LICENSE")
# No Project-URL: the project has no public address yet (no link where nothing is).
for field in ("License-Expression: BSD-3-Clause", "License-File: LICENSE",
              "Classifier: Programming Language :: Python :: 3.10"):
    if field not in text:
        problems.append(f"wheel METADATA lacks {field!r}")
if any(n.startswith(("tests/", "docs/")) for n in names):
    problems.append("wheel ships tests/ or docs/")
members = tarfile.open(sdist).getnames()
if not any(m.endswith("/LICENSE") for m in members):
    problems.append("sdist lacks LICENSE")
for p in problems:
    print("check_dist:", p)
if problems:
    sys.exit(1)
print(f"check_dist: {wheel}: {len(names)} files, metadata and LICENSE ok; sdist has LICENSE")
EOF

python -m venv "$work/venv"
"$work/venv/bin/python" -m pip install -q --upgrade pip > /dev/null 2>&1 || true
"$work/venv/bin/python" -m pip install -q "${wheel[0]}"
# Outside the checkout, so that `import anybn` finds the installed wheel.
(
  cd "$work"
  "$work/venv/bin/python" -c 'import anybn, sys; print("check_dist: imported", anybn.__file__); sys.exit(not anybn.__file__.startswith(sys.prefix))'
  "$work/venv/bin/python" -m anybn
)
echo "check_dist: ok"
