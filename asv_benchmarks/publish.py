"""``asv publish``, then make the dashboard work without network.

Usage (from ``asv_benchmarks/``, after ``asv run`` has stored results)::

    python publish.py                 # asv publish; the scripts vendored into html/vendor/
    python publish.py --no-publish    # only vendor an html/ that asv publish already wrote

asv 0.6's ``index.html`` loads jQuery, flot (and four of its plugins), flot-orderBars,
stupidtable, blueimp-md5 and Bootstrap from CDNs, so a browser without network shows "dependencies
failed to load". Every one of them is an npm package: this script fetches each at its pinned
version from the npm registry (``npm pack``, at publish time; nothing is committed), copies
the files the dashboard needs into ``html/vendor/<package>/`` with the package's license,
writes ``html/vendor/LICENSES.md``, and points the pages at the local copies. Then ``asv
preview`` (or any static server, or ``file://``) serves a dashboard that opens offline.

Needs ``npm`` (Node.js) on PATH and the npm registry reachable when it runs.
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Asset:
    """One CDN reference of asv's pages and where its npm package keeps the same file."""

    cdn: str  #: a distinctive part of the CDN URL
    package: str  #: npm package name
    version: str
    path: str  #: the file inside the package (under ``package/``)


#: The npm twins of asv 0.6's CDN files. stupidtable 1.0.1 was never published to npm; 1.1.3
#: is the npm release of the same plugin (same API: ``$(table).stupidtable()``).
ASSETS = (
    Asset("code.jquery.com/jquery-3.3.1.min.js", "jquery", "3.3.1", "dist/jquery.min.js"),
    Asset("flot/0.8.3/jquery.flot.min.js", "flot", "0.8.3", "jquery.flot.js"),
    Asset("flot/0.8.3/jquery.flot.time.min.js", "flot", "0.8.3", "jquery.flot.time.js"),
    Asset("flot/0.8.3/jquery.flot.selection.min.js", "flot", "0.8.3", "jquery.flot.selection.js"),
    Asset(
        "flot/0.8.3/jquery.flot.categories.min.js", "flot", "0.8.3", "jquery.flot.categories.js"
    ),
    Asset(
        "flot-orderbars@1.0.0/js/jquery.flot.orderBars.js",
        "flot-orderbars",
        "1.0.0",
        "js/jquery.flot.orderBars.js",
    ),
    Asset(
        "stupidtable/1.0.1/stupidtable.min.js",
        "stupid-table-plugin",
        "1.1.3",
        "stupidtable.min.js",
    ),
    Asset("blueimp-md5/2.19.0/js/md5.min.js", "blueimp-md5", "2.19.0", "js/md5.min.js"),
    Asset(
        "bootstrap@3.1.1/dist/js/bootstrap.min.js",
        "bootstrap",
        "3.1.1",
        "dist/js/bootstrap.min.js",
    ),
    Asset(
        "bootstrap@3.1.1/dist/css/bootstrap.min.css",
        "bootstrap",
        "3.1.1",
        "dist/css/bootstrap.min.css",
    ),
)

#: Files Bootstrap's CSS loads relative to itself (its icon font).
EXTRA = {"bootstrap": ["dist/fonts/*"]}

#: A ``<script src=...>`` or ``<link href=...>`` tag that loads from another host.
_REMOTE_TAG = re.compile(r"<(script|link)\b[^>]*\b(?:src|href)=\"https?://[^\"]+\"[^>]*>")
_URL = re.compile(r"\b(src|href)=\"(https?://[^\"]+)\"")
_SRI = re.compile(r"\s+(?:integrity|crossorigin|referrerpolicy)=\"[^\"]*\"")


def _npm_pack(package: str, version: str, into: Path) -> Path:
    """The package's tarball from the npm registry (``npm pack``)."""
    npm = shutil.which("npm")
    if npm is None:
        sys.exit("publish.py: npm (Node.js) is needed to fetch the dashboard's scripts")
    out = subprocess.run(
        [npm, "pack", "--silent", f"{package}@{version}"],
        cwd=into,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if out.returncode != 0:
        sys.exit(f"publish.py: npm pack {package}@{version} failed:\n{out.stderr}")
    return into / out.stdout.strip().splitlines()[-1]


def _license(members: dict[str, tarfile.TarInfo], tar: tarfile.TarFile) -> tuple[str, bytes]:
    """The package's license file, or its package.json (which names the license) where the
    package ships none."""
    for name in members:
        if re.fullmatch(r"package/(LICEN[CS]E|COPYING)(\.[a-z]+)?", name, re.IGNORECASE):
            return Path(name).name, tar.extractfile(members[name]).read()  # type: ignore[union-attr]
    return "package.json", tar.extractfile(members["package/package.json"]).read()  # type: ignore[union-attr]


def vendor(html: Path, cache: Path) -> list[str]:
    """Fetch every asset into ``html/vendor`` and rewrite the pages; the packages vendored."""
    vendor_dir = html / "vendor"
    if vendor_dir.exists():
        shutil.rmtree(vendor_dir)
    local: dict[str, str] = {}
    notes: list[str] = []
    packages = sorted({(a.package, a.version) for a in ASSETS})
    for package, version in packages:
        tarball = _npm_pack(package, version, cache)
        target = vendor_dir / package
        with tarfile.open(tarball) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            wanted = [a.path for a in ASSETS if a.package == package]
            for pattern in EXTRA.get(package, []):
                wanted += [
                    n.removeprefix("package/")
                    for n in members
                    if Path(n).match(f"package/{pattern}")
                ]
            for path in wanted:
                out = target / path
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_bytes(tar.extractfile(members[f"package/{path}"]).read())  # type: ignore[union-attr]
            license_name, text = _license(members, tar)
            (target / license_name).write_bytes(text)
            meta = json.loads(tar.extractfile(members["package/package.json"]).read())  # type: ignore[union-attr]
        notes.append(
            f"- `{package}` {version} ({meta.get('license', 'see the file')}): "
            f"`vendor/{package}/{license_name}`"
        )
    for asset in ASSETS:
        local[asset.cdn] = f"vendor/{asset.package}/{asset.path}"
    (vendor_dir / "LICENSES.md").write_text(
        "# Third-party files of this dashboard\n\n"
        "Fetched from the npm registry by `asv_benchmarks/publish.py`, with their licenses:\n\n"
        + "\n".join(notes)
        + "\n",
        encoding="utf-8",
    )
    for page in sorted(html.glob("*.html")):
        text = page.read_text(encoding="utf-8")
        new = _REMOTE_TAG.sub(functools.partial(_localised, local=local, page=page), text)
        if new != text:
            page.write_text(new, encoding="utf-8")
    return [f"{p}@{v}" for p, v in packages]


def _localised(match: re.Match[str], *, local: dict[str, str], page: Path) -> str:
    """A remote ``<script>``/``<link>`` tag pointed at its vendored copy, without the
    integrity and cross-origin attributes that only a CDN's copy satisfies."""
    tag = match.group(0)
    url = _URL.search(tag).group(2)  # type: ignore[union-attr]
    for cdn, path in local.items():
        if cdn in url:
            return _SRI.sub("", _URL.sub(f'\\1="{path}"', tag))
    sys.exit(f"publish.py: {page.name} loads {url}, which has no npm twin here: add it to ASSETS")


def remote_loads(html: Path) -> list[str]:
    """Every ``<script>``/``<link>`` of the published pages that still loads from the network."""
    return [
        f"{page.name}: {m.group(0)[:120]}"
        for page in sorted(html.glob("*.html"))
        for m in _REMOTE_TAG.finditer(page.read_text(encoding="utf-8"))
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--html", type=Path, default=HERE / "html", help="asv's html_dir")
    parser.add_argument(
        "--no-publish", action="store_true", help="vendor an html/ already published"
    )
    args = parser.parse_args(argv)
    if not args.no_publish:
        subprocess.run(["asv", "publish"], cwd=HERE, check=True, timeout=1800)
    with tempfile.TemporaryDirectory(prefix="anybn-npm-") as cache:
        packages = vendor(args.html, Path(cache))
    left = remote_loads(args.html)
    if left:
        print("publish.py: pages still load from the network:\n" + "\n".join(left))
        return 1
    print(f"publish.py: {args.html} works offline; vendored {', '.join(packages)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
