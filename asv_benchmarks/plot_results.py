"""Turn asv results into per-backend PNG plots and a ratio table for docs/benchmarks.md.

Reads one asv results file (the newest for the machine, unless ``--results-file``),
pairs each anybn benchmark with its peer measured in the same run, and writes

* ``<out>/<backend>.png``: time per shape for the forward (train), the backward
  and forward+backward, anybn beside its peer(s), float32 and float16 rows;
* a Markdown table of the ratios (anybn time / peer time), printed, and written
  into ``docs/benchmarks.md`` between the ``% ratios:begin`` and ``% ratios:end``
  lines when ``--update-docs`` is given.

Peers: NumPy arrays and array-api-strict against the hand-written NumPy batch
norm and torch's native CPU kernel; torch tensors against torch's native kernel
on the same device; CuPy against torch's native CUDA kernel.

Usage (from the repository root)::

    python asv_benchmarks/plot_results.py --update-docs docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

OURS = "bench_batchnorm.BatchNorm"
TORCH = "bench_peers.TorchNative"
TEXTBOOK = "bench_peers.TextbookNumPy"
MEMORY = "bench_batchnorm.NumPyTemporaryMemory.track_temporary_memory"
METHODS = ("time_forward_train", "time_backward", "time_forward_backward")
TITLES = {
    "time_forward_train": "forward (train)",
    "time_backward": "backward",
    "time_forward_backward": "forward + backward",
}

#: backend -> [(label, benchmark class, backend parameter of the peer)]
PEERS: dict[str, list[tuple[str, str, str]]] = {
    "numpy": [("torch native (CPU)", TORCH, "torch"), ("textbook NumPy", TEXTBOOK, "numpy")],
    "torch": [("torch native (CPU)", TORCH, "torch")],
    "array_api_strict": [("textbook NumPy", TEXTBOOK, "numpy")],
    "torch:cuda": [("torch native (CUDA)", TORCH, "torch:cuda")],
    "cupy": [("torch native (CUDA)", TORCH, "torch:cuda")],
}


@dataclass
class Results:
    """One asv results file: ``value(benchmark, params) -> float or None``.

    With ``best=True`` and samples stored (``asv run --record-samples``), a timing is
    the fastest sample rather than asv's median: on a shared machine other processes
    only ever add time, so the minimum is the figure least disturbed by them.
    """

    path: Path
    data: dict[str, Any]
    best: bool = True

    @property
    def commit(self) -> str:
        return str(self.data.get("commit_hash", "?"))

    @property
    def date(self) -> str:
        import datetime as dt

        stamp = self.data.get("date")
        if not stamp:
            return "?"
        return dt.datetime.fromtimestamp(stamp / 1000, tz=dt.timezone.utc).strftime("%Y-%m-%d")

    def table(self, name: str) -> dict[tuple[str, ...], float | None]:
        """``{params: value}`` for a benchmark (params as strings, as asv stores them)."""
        entry = self.data.get("results", {}).get(name)
        if entry is None:
            return {}
        columns = self.data.get("result_columns", ["result", "params"])
        values = entry[columns.index("result")]
        params = entry[columns.index("params")]
        if self.best and "samples" in columns and ".time_" in name:
            samples = (
                entry[columns.index("samples")] if len(entry) > columns.index("samples") else None
            )
            if samples:
                values = [min(s) if s else v for s, v in zip(samples, values or [], strict=False)]
        if not params:
            return {(): values}
        combos = itertools.product(*params)
        out: dict[tuple[str, ...], float | None] = {}
        for combo, value in zip(combos, values or [], strict=False):
            key = tuple(p.strip("'") for p in combo)
            if value is None or (isinstance(value, float) and math.isnan(value)):
                out[key] = None
            else:
                out[key] = float(value)
        return out


def find_results(results_dir: Path, machine: str | None) -> Path:
    """The newest results file of ``machine`` (or of the only machine)."""
    machines = [d for d in results_dir.iterdir() if d.is_dir()] if results_dir.exists() else []
    if machine is not None:
        machines = [d for d in machines if d.name == machine]
    files = [f for d in machines for f in d.glob("*.json") if f.name != "machine.json"]
    if not files:
        raise SystemExit(
            f"no asv results under {results_dir}: run the suite first "
            "(see docs/benchmarks.md), with --set-commit-hash when using --python=same"
        )
    return max(files, key=lambda f: json.loads(f.read_text()).get("date", 0))


def fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "n/a"
    for unit, scale in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-9:.3g} ns"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or b is None or b == 0 else f"{a / b:.2f}x"


def shapes_and_dtypes(res: Results) -> tuple[list[str], list[str]]:
    keys = list(res.table(f"{OURS}.time_forward_backward"))
    shapes = list(dict.fromkeys(k[1] for k in keys))
    dtypes = list(dict.fromkeys(k[2] for k in keys))
    return shapes, dtypes


def plot_backend(res: Results, backend: str, out: Path) -> Path | None:
    """One PNG for a backend, or None if it has no results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes, dtypes = shapes_and_dtypes(res)
    ours = {m: res.table(f"{OURS}.{m}") for m in METHODS}
    if not any(v is not None for k, v in ours["time_forward_backward"].items() if k[0] == backend):
        return None
    dtypes = [
        dt
        for dt in dtypes
        if any(ours["time_forward_backward"].get((backend, s, dt)) is not None for s in shapes)
    ]
    peers = PEERS.get(backend, [])
    fig, axes = plt.subplots(
        len(dtypes), len(METHODS), figsize=(5.2 * len(METHODS), 3.6 * len(dtypes)), squeeze=False
    )
    labels = [f"anybn ({backend})"] + [p[0] for p in peers]
    colors = ["#1f77b4", "#ff7f0e", "#7f7f7f"]
    width = 0.8 / len(labels)
    for row, dtype in enumerate(dtypes):
        for col, method in enumerate(METHODS):
            ax = axes[row][col]
            series = [[ours[method].get((backend, s, dtype)) for s in shapes]]
            for _, cls, peer_backend in peers:
                table = res.table(f"{cls}.{method}")
                series.append([table.get((peer_backend, s, dtype)) for s in shapes])
            for i, (label, values) in enumerate(zip(labels, series, strict=True)):
                xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(shapes))]
                heights = [v * 1e3 if v is not None else 0.0 for v in values]
                bars = ax.bar(xs, heights, width, label=label, color=colors[i % len(colors)])
                if i > 0:
                    continue
                for bar, v, peer in zip(bars, values, series[1] if len(series) > 1 else values,
                                        strict=True):  # fmt: skip
                    if v is not None and peer is not None and len(series) > 1:
                        ax.annotate(
                            f"{v / peer:.2f}x",
                            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center",
                            va="bottom",
                            fontsize=7,
                        )
            ax.set_yscale("log")
            ax.set_xticks(range(len(shapes)))
            ax.set_xticklabels([s.replace("-channels-last", "\nchannels-last") for s in shapes],
                               fontsize=7)  # fmt: skip
            ax.set_ylabel("time (ms, log)")
            ax.set_title(f"{TITLES[method]}, {dtype}", fontsize=9)
            if row == 0 and col == 0:
                ax.legend(fontsize=7)
    fig.suptitle(
        f"anybn on {backend}: asv, commit {res.commit[:8]}, {res.date} "
        f"(labels: anybn / {labels[1] if len(labels) > 1 else 'peer'})",
        fontsize=10,
    )
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{re.sub(r'[^A-Za-z0-9_]+', '_', backend)}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ratio_table(res: Results) -> str:
    """Markdown: anybn's time and each peer's, with the ratio, per backend, shape and dtype."""
    shapes, dtypes = shapes_and_dtypes(res)
    lines = [
        "| backend | shape | dtype | benchmark | anybn | peer | peer time | anybn / peer |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    backends = list(dict.fromkeys(k[0] for k in res.table(f"{OURS}.time_forward_backward")))
    for backend in backends:
        for shape, dtype, method in itertools.product(shapes, dtypes, METHODS):
            mine = res.table(f"{OURS}.{method}").get((backend, shape, dtype))
            if mine is None:
                continue
            for label, cls, peer_backend in PEERS.get(backend, []):
                peer = res.table(f"{cls}.{method}").get((peer_backend, shape, dtype))
                lines.append(
                    f"| {backend} | {shape} | {dtype} | {TITLES[method]} | {fmt_time(mine)} "
                    f"| {label} | {fmt_time(peer)} | {ratio(mine, peer)} |"
                )
    memory = res.table(MEMORY)
    if memory:
        lines += [
            "",
            "NumPy peak temporary memory of forward+backward beyond x, dy, y and dx "
            "(tracemalloc), in units of x's size:",
            "",
            "| shape | dtype | temporary / x |",
            "| --- | --- | --- |",
        ]
        for (shape, dtype), value in memory.items():
            lines.append(f"| {shape} | {dtype} | {'n/a' if value is None else f'{value:.2f}'} |")
    return "\n".join(lines)


def python_version(python: str) -> str:
    """``3.11.7`` from asv's python field (a version, or an interpreter path)."""
    found = re.findall(r"\d+\.\d+(?:\.\d+)?", python)
    return found[-1] if found else python


def update_docs(page: Path, table: str, res: Results, images: list[Path]) -> None:
    """Replace the text between ``% ratios:begin`` and ``% ratios:end`` in ``page``."""
    text = page.read_text(encoding="utf-8")
    begin, end = "% ratios:begin", "% ratios:end"
    if begin not in text or end not in text:
        raise SystemExit(f"{page} has no '{begin}' ... '{end}' region")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    info = res.data.get("params", {})
    machine = f"`{info.get('machine', '?')}` ({info.get('cpu', '?')}, "
    machine += f"{info.get('num_cpu', '?')} CPUs, {info.get('os', '?')})"
    stat = "fastest recorded sample" if res.best else "asv's median"
    body = [
        begin,
        "",
        f"Results of commit `{res.commit[:12]}`, {res.date}, machine {machine}, "
        f"Python {python_version(info.get('python', '?'))}; times are each benchmark's {stat}.",
        "",
        table,
        "",
    ]
    for img in images:
        rel = img.resolve().relative_to(page.parent.resolve())
        body += [f"![anybn on {img.stem}]({rel.as_posix()})", ""]
    page.write_text(head + "\n".join(body) + end + tail, encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results-dir", type=Path, default=HERE / "results")
    parser.add_argument("--results-file", type=Path, default=None)
    parser.add_argument("--machine", default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "_static" / "benchmarks")
    parser.add_argument("--update-docs", type=Path, default=None, metavar="PAGE")
    parser.add_argument(
        "--median",
        action="store_true",
        help="use asv's median even where samples were recorded (default: their minimum)",
    )
    args = parser.parse_args(argv)

    path = args.results_file or find_results(args.results_dir, args.machine)
    res = Results(path, json.loads(path.read_text()), best=not args.median)
    images = [
        p
        for backend in PEERS
        if (p := plot_backend(res, backend, args.out)) is not None
    ]  # fmt: skip
    table = ratio_table(res)
    print(f"results: {path}")
    for img in images:
        print(f"wrote {img}")
    print(table)
    if args.update_docs is not None:
        update_docs(args.update_docs, table, res, images)
        print(f"updated {args.update_docs}")


if __name__ == "__main__":
    main()
