#!/usr/bin/env python
"""Open the published asv dashboard in headless Chromium, with no network, and fail unless it works.

    python .ci/check_dashboard.py asv_benchmarks/html --commits 3 [--screenshot FILE]

The dashboard (``asv publish``, then ``asv_benchmarks/publish.py``, which vendors its scripts)
is served from 127.0.0.1 and Chromium resolves no other host (the flags of
``.ci/check_site.py``, whose browser driver this reuses). It fails on

* a console error, an uncaught exception, a failed request or an HTTP error (a script still
  loaded from a CDN fails here as it would for a reader offline);
* a summary page that draws no graph;
* a benchmark's graph that is not drawn, or whose history has fewer than ``--commits`` commits.

Every wait is bounded (``--timeout``).
"""

from __future__ import annotations

import argparse
import base64
import json
import queue
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import check_site as cs

#: The number of flot graphs drawn on the page, and the most points of one graph's series.
GRAPHS_JS = r"""
(() => {
  const $ = window.jQuery;
  const drawn = [...document.querySelectorAll('canvas.flot-base')]
    .filter(c => c.width > 0 && c.height > 0 && c.offsetParent !== null).length;
  let points = 0;
  if ($) {
    const plot = $('#main-graph').data('plot');
    if (plot) {
      for (const series of plot.getData()) {
        points = Math.max(points, series.data.filter(p => p && p[1] !== null).length);
      }
    }
  }
  return JSON.stringify({drawn, points, failed: !!document.querySelector('#error-message, .error')
    && getComputedStyle(document.querySelector('#error-message, .error')).display !== 'none'});
})()
"""


def _events_until(chrome: cs.Chromium, session: str, deadline: float, stop: str | None) -> list:
    events = []
    while time.monotonic() < deadline:
        try:
            ev = chrome.events.get(timeout=0.2)
        except queue.Empty:
            if stop is None:
                break
            continue
        if ev.get("sessionId") != session:
            continue
        events.append(ev)
        if stop is not None and ev["method"] == stop:
            break
    return events


def _poll(
    chrome: cs.Chromium, session: str, deadline: float, ready: Any
) -> tuple[dict[str, Any], list]:
    """Evaluate :data:`GRAPHS_JS` until ``ready(report)`` or the deadline; the last report and
    the events seen meanwhile."""
    events: list = []
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        report = json.loads(
            chrome.send(
                "Runtime.evaluate", {"expression": GRAPHS_JS, "returnByValue": True},
                session=session,
            )["result"]["value"]
        )  # fmt: skip
        if ready(report):
            break
        events += _events_until(chrome, session, time.monotonic() + 0.3, None)
    return report, events


def check(html: Path, commits: int, timeout: float, screenshot: Path | None) -> list[str]:
    """The problems of the dashboard under ``html`` (empty: it works)."""
    index = html / "index.html"
    if not index.is_file():
        return [f"no {index}: run asv publish (and asv_benchmarks/publish.py) first"]
    benchmarks = json.loads((html / "index.json").read_text())["benchmarks"]
    name = next(
        (n for n in sorted(benchmarks) if "time_forward_backward" in n), next(iter(benchmarks))
    )
    server, base = cs.serve(html.resolve())
    problems: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="anybn-chromium-") as profile:
            chrome = cs.Chromium(cs.find_chromium(), Path(profile), timeout)
            try:
                target = chrome.send("Target.createTarget", {"url": "about:blank"})["targetId"]
                session = chrome.send(
                    "Target.attachToTarget", {"targetId": target, "flatten": True}
                )["sessionId"]
                for domain in ("Page", "Runtime", "Log", "Network"):
                    chrome.send(f"{domain}.enable", session=session)
                deadline = time.monotonic() + timeout
                chrome.send("Page.navigate", {"url": base + "index.html"}, session=session)
                events = _events_until(chrome, session, deadline, "Page.loadEventFired")
                summary, more = _poll(chrome, session, deadline, lambda r: r["drawn"] > 0)
                events += more
                if summary.get("drawn", 0) == 0:
                    problems.append("the summary page draws no graph")
                deadline = time.monotonic() + timeout
                chrome.send(
                    "Runtime.evaluate",
                    {"expression": f"window.location.hash = {json.dumps('#' + name)}"},
                    session=session,
                )
                graph, more = _poll(
                    chrome, session, deadline, lambda r: r["points"] >= commits
                )
                events += more + _events_until(chrome, session, time.monotonic() + 0.5, None)
                if graph.get("points", 0) == 0:
                    problems.append(f"the graph of {name} is not drawn")
                elif graph["points"] < commits:
                    problems.append(
                        f"the graph of {name} shows {graph['points']} commit(s), "
                        f"expected at least {commits}"
                    )
                problems += cs.event_problems(events)
                if screenshot is not None:
                    data = chrome.send(
                        "Page.captureScreenshot", {"format": "png"}, session=session
                    )["data"]
                    screenshot.parent.mkdir(parents=True, exist_ok=True)
                    screenshot.write_bytes(base64.b64decode(data))
                print(
                    f"check_dashboard: summary graphs drawn: {summary.get('drawn', 0)}; "
                    f"{name}: {graph.get('points', 0)} commit(s)"
                )
            finally:
                chrome.close()
    finally:
        server.shutdown()
    return list(dict.fromkeys(problems))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("html", type=Path, help="asv's published html_dir")
    parser.add_argument("--commits", type=int, default=2, help="history a graph must show")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds per page")
    parser.add_argument("--screenshot", type=Path, help="save the benchmark's graph page")
    args = parser.parse_args()
    problems = check(args.html, args.commits, args.timeout, args.screenshot)
    for p in problems:
        print(f"check_dashboard: {p}")
    print(f"check_dashboard: {'ok' if not problems else f'{len(problems)} problem(s)'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
