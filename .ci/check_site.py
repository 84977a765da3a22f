#!/usr/bin/env python
"""Open every page of the built docs in headless Chromium and fail on what a reader would see.

    python .ci/check_site.py docs/_build/html [--screenshots docs/_build/screenshots]
    python .ci/check_site.py --self-test

The site is served from 127.0.0.1 (a throwaway ``http.server`` thread) and Chromium resolves
no other host (``--host-resolver-rules``), so a page that needs the network (a CDN script, a
remote font, MathJax from a CDN) fails here exactly as it would for a reader offline. Chromium
is driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``): no extra Python
package, no port. Per page it fails on

* a broken image (not loaded, or zero width), or any request that failed or got HTTP >= 400;
* a broken link: a same-site ``href`` whose file is missing, or whose ``#fragment`` is not an
  ``id`` on the target page (links to other sites cannot be checked offline and are counted);
* unrendered math: a Sphinx ``.math`` element without MathJax output, a MathJax error, or a
  ``\\(`` / ``\\[`` / ``$$`` delimiter left in the visible text;
* a display formula wider than its column that cannot scroll sideways (it would be cut off);
* a console error or an uncaught exception.

It saves screenshots of the math page and the benchmark page (``--screenshots``; CI keeps them
in ``docs/_build/screenshots/``). ``--self-test`` builds a small site with one fault per page
and checks that each fault is reported, and that a clean page passes.

Chromium: ``$CHROMIUM``, else ``chromium`` / ``chromium-browser`` / ``google-chrome`` on PATH
(Debian: ``apt-get install chromium``). Every wait is bounded (``--page-timeout``).
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import functools
import html
import json
import os
import queue
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urldefrag, urlsplit

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-dev-shm-usage",
    "--disable-extensions",
    "--mute-audio",
    "--window-size=1280,1000",
    # Nothing but the loopback server resolves: a page that needs the network fails here.
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
    "--remote-debugging-pipe",
]

# Runs in the page once it has loaded (and MathJax, if any, has typeset).
PAGE_REPORT_JS = r"""
(() => {
  const broken_images = [...document.images]
    .filter(i => !i.complete || i.naturalWidth === 0)
    .map(i => i.getAttribute('src'));
  const maths = [...document.querySelectorAll('.math')];
  const unrendered = maths
    .filter(m => !m.querySelector('mjx-container'))
    .map(m => m.textContent.trim().slice(0, 80));
  const math_errors = [...document.querySelectorAll('mjx-merror, [data-mjx-error]')]
    .map(e => (e.getAttribute('data-mjx-error') || e.textContent).slice(0, 80));
  // Visible text only: code blocks may show TeX on purpose.
  const clone = document.body.cloneNode(true);
  clone.querySelectorAll('pre, code, script, style, mjx-container, .math').forEach(e => e.remove());
  const text = clone.textContent;
  const raw_tex = [];
  for (const pat of [/\\\(.{0,40}/, /\\\[.{0,40}/, /\$\$.{0,40}/]) {
    const m = text.match(pat);
    if (m) raw_tex.push(m[0]);
  }
  // A display formula wider than its column must scroll, not be cut off: some ancestor up
  // to the column must let it scroll sideways.
  const clipped_math = [...document.querySelectorAll('mjx-container[display="true"]')]
    .filter(c => {
      const content = c.firstElementChild;
      if (!content) return false;
      const wide = content.getBoundingClientRect().width;
      for (let e = c; e && e !== document.body; e = e.parentElement) {
        const overflow = getComputedStyle(e).overflowX;
        if (overflow === 'auto' || overflow === 'scroll') return false;
        if (e.getBoundingClientRect().width + 1 < wide) return true;
      }
      return false;
    })
    .map(c => (c.getAttribute('aria-label') || c.textContent || '').slice(0, 60));
  const links = [...document.querySelectorAll('a[href]')].map(a => a.href);
  return JSON.stringify({
    broken_images, unrendered, math_errors, raw_tex, links, clipped_math,
    n_math: maths.length, title: document.title,
  });
})()
"""

# Resolves once MathJax (if the page loads it) has finished typesetting.
MATHJAX_READY_JS = r"""
new Promise(resolve => {
  const t0 = Date.now();
  const poll = () => {
    const mj = window.MathJax;
    if (mj && mj.startup && mj.startup.promise) {
      mj.startup.promise.then(() => resolve('typeset'), e => resolve('error: ' + e));
    } else if (!document.querySelector('script[src*="mathjax" i]') || Date.now() - t0 > 8000) {
      resolve(mj ? 'no startup' : 'no mathjax');
    } else {
      setTimeout(poll, 50);
    }
  };
  poll();
})
"""


class CDPError(RuntimeError):
    pass


class Chromium:
    """A headless Chromium driven over the DevTools protocol on a pipe (fds 3 and 4)."""

    def __init__(self, executable: str, profile: Path, timeout: float) -> None:
        self.timeout = timeout
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()
        # Move the child's ends above 10 so that dup2 onto 3 and 4 cannot clobber them.
        child_r = fcntl.fcntl(to_chrome_r, fcntl.F_DUPFD, 10)
        child_w = fcntl.fcntl(from_chrome_w, fcntl.F_DUPFD, 10)
        os.close(to_chrome_r)
        os.close(from_chrome_w)

        def _fds() -> None:  # in the child, before exec
            os.dup2(child_r, 3)
            os.dup2(child_w, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "about:blank"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_fds,
            close_fds=False,
        )
        os.close(child_r)
        os.close(child_w)
        self._id = 0
        self._replies: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._lock = threading.Lock()
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self._stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._drain_stderr, daemon=True).start()

    def _drain_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line.decode(errors="replace"))
            del self._stderr[:-50]

    def _read(self) -> None:
        buf = b""
        while True:
            chunk = os.read(self._from_chrome, 1 << 16)
            if not chunk:
                return
            buf += chunk
            *messages, buf = buf.split(b"\0")
            for raw in messages:
                msg = json.loads(raw)
                if "id" in msg:
                    with self._lock:
                        q = self._replies.get(msg["id"])
                    if q is not None:
                        q.put(msg)
                else:
                    self.events.put(msg)

    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        session: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            self._id += 1
            msg_id = self._id
            q: queue.Queue[dict[str, Any]] = queue.Queue()
            self._replies[msg_id] = q
        msg: dict[str, Any] = {"id": msg_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._to_chrome, json.dumps(msg).encode() + b"\0")
        try:
            reply = q.get(timeout=timeout or self.timeout)
        except queue.Empty:
            raise CDPError(f"{method}: no reply in {timeout or self.timeout:.0f} s") from None
        finally:
            with self._lock:
                self._replies.pop(msg_id, None)
        if "error" in reply:
            raise CDPError(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (CDPError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def stderr_tail(self) -> str:
        return "".join(self._stderr[-20:])


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve(root: Path) -> tuple[ThreadingHTTPServer, str]:
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}/"


def find_chromium() -> str:
    for candidate in (os.environ.get("CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if candidate and shutil.which(candidate):
            return shutil.which(candidate)  # type: ignore[return-value]
    sys.exit("check_site: no Chromium found (apt-get install chromium, or set CHROMIUM=...)")


@functools.cache
def _ids(path: Path) -> frozenset[str]:
    text = path.read_text(encoding="utf-8", errors="replace")
    return frozenset(html.unescape(m) for m in re.findall(r'\b(?:id|name)="([^"]*)"', text))


def check_link(root: Path, base: str, href: str) -> str | None:
    """Why a same-site link is broken, or None (links to other sites are not checked)."""
    if not href.startswith(base):
        return None
    url, fragment = urldefrag(href)
    rel = unquote(urlsplit(url).path)[len(urlsplit(base).path) :]
    target = root / rel
    if target.is_dir():
        target = target / "index.html"
    if not target.is_file():
        return f"{href}: no such file {target.relative_to(root)}"
    if fragment and target.suffix == ".html" and unquote(fragment) not in _ids(target):
        return f"{href}: no id {fragment!r} in {target.relative_to(root)}"
    return None


def event_problems(events: list[dict[str, Any]]) -> list[str]:
    """What a reader would see go wrong, from a page's DevTools events: console errors,
    uncaught exceptions, failed requests and HTTP errors."""
    problems: list[str] = []
    for ev in events:
        method, p = ev["method"], ev.get("params", {})
        if "/favicon.ico" in json.dumps(p):
            continue  # the browser asks for it by itself; no page links one
        if method == "Runtime.consoleAPICalled" and p.get("type") in {"error", "assert"}:
            args = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            problems.append(f"console.{p['type']}: {args[:200]}")
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            text = d.get("exception", {}).get("description") or d.get("text", "")
            problems.append(f"uncaught exception: {text[:200]}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            e = p["entry"]
            where = e.get("url", "")
            problems.append(f"console error ({e['source']}): {e['text'][:160]} {where}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            problems.append(f"request failed: {p.get('errorText')} ({p.get('type')})")
        elif method == "Network.responseReceived" and p["response"]["status"] >= 400:
            r = p["response"]
            problems.append(f"HTTP {r['status']}: {r['url']}")
    return problems


def check_page(
    chrome: Chromium, root: Path, base: str, page: Path, shot: Path | None, timeout: float
) -> tuple[list[str], dict[str, Any]]:
    """Open one page; the problems found, and the page's report."""
    problems: list[str] = []
    target = chrome.send("Target.createTarget", {"url": "about:blank"})["targetId"]
    session = chrome.send("Target.attachToTarget", {"targetId": target, "flatten": True})[
        "sessionId"
    ]
    try:
        for domain in ("Page", "Runtime", "Log", "Network"):
            chrome.send(f"{domain}.enable", session=session)
        url = base + page.relative_to(root).as_posix()
        chrome.send("Page.navigate", {"url": url}, session=session)
        loaded = False
        deadline = time.monotonic() + timeout
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            try:
                ev = chrome.events.get(timeout=0.2)
            except queue.Empty:
                continue
            if ev.get("sessionId") != session:
                continue
            events.append(ev)
            if ev["method"] == "Page.loadEventFired":
                loaded = True
                break
        if not loaded:
            problems.append(f"did not finish loading in {timeout:.0f} s")
        mathjax = chrome.send(
            "Runtime.evaluate",
            {"expression": MATHJAX_READY_JS, "awaitPromise": True, "returnByValue": True},
            session=session,
        )["result"].get("value")
        if isinstance(mathjax, str) and mathjax.startswith("error"):
            problems.append(f"MathJax: {mathjax}")
        report = json.loads(
            chrome.send(
                "Runtime.evaluate",
                {"expression": PAGE_REPORT_JS, "returnByValue": True},
                session=session,
            )["result"]["value"]
        )
        time.sleep(0.1)  # let late console/network events arrive
        while True:
            try:
                ev = chrome.events.get_nowait()
            except queue.Empty:
                break
            if ev.get("sessionId") == session:
                events.append(ev)
        problems += event_problems(events)
        problems += [f"broken image: {src}" for src in report["broken_images"]]
        problems += [f"unrendered math: {t!r}" for t in report["unrendered"]]
        problems += [f"MathJax error: {t!r}" for t in report["math_errors"]]
        problems += [f"raw TeX in the text: {t!r}" for t in report["raw_tex"]]
        problems += [f"clipped wide formula: {t!r}" for t in report["clipped_math"]]
        for href in sorted(set(report["links"])):
            why = check_link(root, base, href)
            if why:
                problems.append(f"broken link: {why}")
        if shot is not None:
            metrics = chrome.send("Page.getLayoutMetrics", session=session)
            height = min(int(metrics["cssContentSize"]["height"]), 12000)
            data = chrome.send(
                "Page.captureScreenshot",
                {
                    "format": "png",
                    "captureBeyondViewport": True,
                    "clip": {"x": 0, "y": 0, "width": 1280, "height": height, "scale": 1},
                },
                session=session,
                timeout=timeout,
            )["data"]
            shot.parent.mkdir(parents=True, exist_ok=True)
            shot.write_bytes(base64.b64decode(data))
    finally:
        chrome.send("Target.closeTarget", {"targetId": target})
    # One line per distinct problem (a page may repeat one many times).
    return list(dict.fromkeys(problems)), report


def pages_of(root: Path) -> list[Path]:
    skip = {"_static", "_sources", "_images", ".doctrees"}
    return sorted(p for p in root.rglob("*.html") if not skip & set(p.relative_to(root).parts[:-1]))


def check_site(
    root: Path, screenshots: Path | None, shots: list[str], timeout: float, verbose: bool = True
) -> dict[str, list[str]]:
    """Every page's problems (an empty list for a clean page)."""
    root = root.resolve()
    pages = pages_of(root)
    if not pages:
        sys.exit(f"check_site: no HTML pages under {root}")
    server, base = serve(root)
    results: dict[str, list[str]] = {}
    external: set[str] = set()
    n_math = 0
    with tempfile.TemporaryDirectory(prefix="anybn-chromium-") as profile:
        chrome = Chromium(find_chromium(), Path(profile), timeout)
        try:
            version = chrome.send("Browser.getVersion", timeout=60)["product"]
            if verbose:
                print(f"check_site: {version}, {len(pages)} pages from {base}")
            for page in pages:
                name = page.relative_to(root).as_posix()
                shot = None
                if screenshots is not None and page.stem in shots and page.parent == root:
                    shot = screenshots / f"{page.stem}.png"
                try:
                    problems, report = check_page(chrome, root, base, page, shot, timeout)
                except CDPError as exc:
                    problems, report = [f"DevTools: {exc}"], {"links": [], "n_math": 0}
                external |= {h for h in report["links"] if not h.startswith(base)}
                n_math += report["n_math"]
                results[name] = problems
                if verbose:
                    status = "ok" if not problems else f"{len(problems)} problem(s)"
                    print(f"  {name:<40} {status}")
                    for p in problems:
                        print(f"      {p}")
        except CDPError as exc:
            sys.exit(f"check_site: {exc}\nChromium's stderr:\n{chrome.stderr_tail()}")
        finally:
            chrome.close()
            server.shutdown()
    if verbose:
        print(
            f"check_site: {n_math} formulas, {len(external)} links to other sites (not"
            " checked offline)"
        )
        if screenshots is not None:
            for s in shots:
                print(f"check_site: screenshot {screenshots / (s + '.png')}")
    return results


SELF_TEST_PAGES = {
    # page: (body, the problem it must produce, or None for a clean page)
    "clean.html": (
        '<h1 id="top">Clean</h1><a href="#top">here</a> <a href="other.html#x">there</a>'
        ' <img src="pixel.png" alt="">',
        None,
    ),
    "other.html": ('<p id="x">x</p>', None),
    "broken-image.html": ('<img src="missing.png" alt="">', "broken image"),
    "broken-link.html": ('<a href="nowhere.html">x</a>', "broken link"),
    "broken-anchor.html": ('<a href="other.html#nope">x</a>', "broken link"),
    "raw-math.html": ('<p><span class="math">\\(x^2\\)</span></p>', "unrendered math"),
    "raw-tex-text.html": ("<p>the mean \\(\\mu\\) of x</p>", "raw TeX"),
    "console-error.html": ("<script>console.error('boom')</script>", "console.error"),
    "exception.html": ("<script>undefined_function()</script>", "uncaught exception"),
    "cdn.html": (
        '<script src="https://cdn.example.org/mathjax/tex-svg.js"></script>',
        "request failed",
    ),
    "clipped-math.html": (
        '<div style="width:200px;overflow:hidden"><mjx-container display="true">'
        '<span style="display:inline-block;width:900px">x</span></mjx-container></div>',
        "clipped wide formula",
    ),
    "scrolling-math.html": (
        '<div style="width:200px;overflow:hidden"><mjx-container display="true"'
        ' style="display:block;overflow-x:auto">'
        '<span style="display:inline-block;width:900px">x</span></mjx-container></div>',
        None,
    ),
}

# A 1x1 PNG.
PIXEL = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg=="
)


def self_test(timeout: float) -> int:
    with tempfile.TemporaryDirectory(prefix="anybn-site-selftest-") as tmp:
        root = Path(tmp)
        (root / "pixel.png").write_bytes(PIXEL)
        for name, (body, _) in SELF_TEST_PAGES.items():
            (root / name).write_text(
                f"<!doctype html><html><head><meta charset='utf-8'><title>{name}</title>"
                f"<link rel='icon' href='data:,'></head><body>{body}</body></html>",
                encoding="utf-8",
            )
        results = check_site(root, None, [], timeout, verbose=False)
    failures = []
    for name, (_, expected) in SELF_TEST_PAGES.items():
        problems = results[name]
        if expected is None and problems:
            failures.append(f"{name}: clean page reported {problems}")
        elif expected is not None and not any(expected in p for p in problems):
            failures.append(f"{name}: expected a {expected!r} problem, got {problems}")
    for f in failures:
        print(f"check_site self-test: {f}")
    print(
        f"check_site self-test: {len(SELF_TEST_PAGES) - len(failures)} passed,"
        f" {len(failures)} failed"
    )
    return 1 if failures else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("site", nargs="?", type=Path, help="the built HTML (docs/_build/html)")
    parser.add_argument("--screenshots", type=Path, help="where to save the screenshots")
    parser.add_argument(
        "--shot",
        action="append",
        default=None,
        help="page stems to screenshot (default: math, benchmarks)",
    )
    parser.add_argument("--page-timeout", type=float, default=30.0, help="seconds per page")
    parser.add_argument("--self-test", action="store_true", help="check the checker")
    args = parser.parse_args()
    if args.self_test:
        return self_test(args.page_timeout)
    if args.site is None:
        parser.error("give the built site's directory, or --self-test")
    shots = args.shot or ["math", "benchmarks"]
    results = check_site(args.site, args.screenshots, shots, args.page_timeout)
    bad = {page: probs for page, probs in results.items() if probs}
    if args.screenshots is not None:
        missing = [s for s in shots if not (args.screenshots / f"{s}.png").is_file()]
        if missing:
            bad["(screenshots)"] = [f"no screenshot of {m}" for m in missing]
    print(f"check_site: {len(results) - len(bad)} pages clean, {len(bad)} with problems")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
