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
    """One PNG of ratios for a backend (anybn's time ÷ each peer's), or None without results.

    One panel per peer, the shapes along x, a bar per pass (forward, backward, both) and
    dtype; a log scale centred on 1 with "below 1: anybn faster" on it, the ratio over the
    forward + backward bars, fonts readable at the docs' page width.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    shapes, dtypes = shapes_and_dtypes(res)
    ours = {m: res.table(f"{OURS}.{m}") for m in METHODS}
    rows = {
        (s, dt): [ours[m].get((backend, s, dt)) for m in METHODS] for s in shapes for dt in dtypes
    }
    if not any(v is not None for values in rows.values() for v in values):
        return None
    peers = [p for p in PEERS.get(backend, []) if res.table(f"{p[1]}.time_forward_backward")]
    if not peers:
        return None
    dtypes = [dt for dt in dtypes if any(rows[(s, dt)][2] is not None for s in shapes)]
    shapes = [s for s in shapes if any(rows[(s, dt)][2] is not None for dt in dtypes)]
    plt.rcParams.update({"font.size": 12})
    fig, axes = plt.subplots(len(peers), 1, figsize=(13, 4.4 * len(peers)), squeeze=False)
    bars = [(m, dt) for dt in dtypes for m in METHODS]
    colors = {"time_forward_train": "#9ecae1", "time_backward": "#4292c6",
              "time_forward_backward": "#08519c"}  # fmt: skip
    hatches = {dt: h for dt, h in zip(dtypes, ["", "//", "xx"], strict=False)}
    width = 0.85 / len(bars)
    for (label, cls, peer_backend), ax in zip(peers, axes[:, 0], strict=True):
        values: list[float] = []
        for i, (method, dtype) in enumerate(bars):
            peer = res.table(f"{cls}.{method}")
            xs, ys = [], []
            for j, shape in enumerate(shapes):
                mine = ours[method].get((backend, shape, dtype))
                theirs = peer.get((peer_backend, shape, dtype))
                if mine is None or theirs is None or theirs == 0:
                    continue
                xs.append(j + (i - (len(bars) - 1) / 2) * width)
                ys.append(mine / theirs)
            if not ys:
                continue
            values += ys
            drawn = ax.bar(xs, ys, width, color=colors[method], hatch=hatches[dtype],
                           edgecolor="white", label=f"{TITLES[method]}, {dtype}")  # fmt: skip
            if method == "time_forward_backward":
                for bar, y in zip(drawn, ys, strict=True):
                    ax.annotate(f"{y:.2f}", (bar.get_x() + bar.get_width() / 2, y),
                                ha="center", va="bottom", fontsize=9)  # fmt: skip
        if not values:
            ax.set_visible(False)
            continue
        ax.set_yscale("log")
        low, high = min(min(values), 0.5) / 1.3, max(max(values), 2.0) * 1.5
        ax.set_ylim(low, high)
        grid = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
        ticks = [t for t in grid if low <= t <= high]
        ax.set_yticks(ticks)
        ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}x"))
        ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.axhline(1.0, color="black", linewidth=1)
        ax.set_xticks(range(len(shapes)))
        ax.set_xticklabels([s.replace("-channels-last", "\nchannels-last") for s in shapes])
        ax.set_xlim(-0.5, len(shapes) - 0.5)
        ax.set_ylabel(f"anybn ÷ {label}")
        ax.set_title(f"anybn on {backend} ÷ {label} (below 1: anybn faster)", fontsize=12)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.suptitle(f"asv, commit {res.commit[:8]}, {res.date}", fontsize=11)
    fig.tight_layout()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{re.sub(r'[^A-Za-z0-9_]+', '_', backend)}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def ratio_table(res: Results) -> str:
    """Markdown: per backend, shape and dtype, anybn's forward + backward time and its ratios.

    One row per input: anybn's time, then for each peer the forward, backward and
    forward + backward ratios (anybn ÷ peer; below 1 anybn is faster).
    """
    shapes, dtypes = shapes_and_dtypes(res)
    backends = list(dict.fromkeys(k[0] for k in res.table(f"{OURS}.time_forward_backward")))
    lines = []
    for backend in backends:
        peers = [p for p in PEERS.get(backend, []) if res.table(f"{p[1]}.time_forward_backward")]
        head = "| shape | dtype | anybn fwd+bwd |"
        for label, _, _ in peers:
            head += f" ÷ {label}: fwd / bwd / both |"
        block = [f"**{backend}**", "", head, "|---" * (3 + len(peers)) + "|"]
        for shape, dtype in itertools.product(shapes, dtypes):
            mine = {m: res.table(f"{OURS}.{m}").get((backend, shape, dtype)) for m in METHODS}
            if mine["time_forward_backward"] is None:
                continue
            row = f"| {shape} | {dtype} | {fmt_time(mine['time_forward_backward'])} |"
            for _, cls, peer_backend in peers:
                cells = [
                    ratio(mine[m], res.table(f"{cls}.{m}").get((peer_backend, shape, dtype)))
                    for m in METHODS
                ]
                row += " " + " / ".join(c.rstrip("x") for c in cells) + " |"
            block.append(row)
        if len(block) > 4:
            lines += [*block, ""]
    memory = res.table(MEMORY)
    if memory:
        lines += [
            "NumPy peak temporary memory of forward+backward beyond x, dy, y and dx "
            "(tracemalloc), in units of x's size:",
            "",
            "| shape | dtype | temporary / x |",
            "| --- | --- | --- |",
        ]
        for (shape, dtype), value in memory.items():
            lines.append(f"| {shape} | {dtype} | {'n/a' if value is None else f'{value:.2f}'} |")
    return "\n".join(lines).rstrip()


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
    version = python_version(info.get("python", ""))
    python = f"Python {version}, " if re.fullmatch(r"\d+\.\d+(\.\d+)?", version) else ""
    compiled: Any = res.table("bench_batchnorm.Engine.track_compiled_kernels").get(())
    if isinstance(compiled, list):  # a benchmark without parameters stores one value in a list
        compiled = compiled[0] if compiled else None
    engine = {
        None: "engine not recorded",
        0.0: "NumPy kernels (Numba not installed)",
        1.0: "Numba's compiled kernels (`anybn[numba]`)",
    }.get(compiled, "?")
    body = [
        begin,
        "",
        f"Last run: commit `{res.commit[:12]}`, {res.date}, machine {machine}, "
        f"{python}{engine}; times are each "
        f"benchmark's {stat}; ratios are anybn's time ÷ the peer's in the same run "
        "(below 1: anybn faster). Each plot links to its full size.",
        "",
    ]
    for img in images:
        rel = img.resolve().relative_to(page.parent.resolve()).as_posix()
        body += [f"[![anybn on {img.stem}: time ÷ peer per shape]({rel})]({rel})", ""]
    body += [table, ""]
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
