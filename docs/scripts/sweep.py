"""The layer-shape sweep in one process: anybn ÷ its peer, candidates in rotation.

Usage (from the repository root)::

    PYTHONPATH=. python docs/scripts/sweep.py [--dtype float32] [--threads 2] [--rounds 5]
        [--shapes "(256,512)" ...] [--json out.json] [--plot out.png] [--copy] [--passes]

The inputs are asv's ``LayerSweep`` ones (``asv_benchmarks/benchmarks/bench_sweep.py``): every
batch-norm layer shape of ResNet-18 and MobileNetV2 at batch 32 (NCHW and channels-last), and
(256,512), (8,256,14,14), (64,4096), (4096,1024). For each input and pair (A, B), each round
times A and B back to back (the order alternating), each as the best of 2 runs of ``number``
calls (about 2M values' worth, at least one call); the figure is the median over rounds of
A ÷ B (below 1: anybn faster). Columns:

* ``NumPy``: anybn on NumPy arrays ÷ ``F.batch_norm`` + autograd (torch native), forward +
  backward; with ``--passes`` also ``fwd`` and ``bwd``, each pass alone;
* ``tensors``: anybn's functions on torch CPU tensors ÷ torch native (the same);
* ``module``: ``anybn.torch.BatchNorm1d/2d`` ÷ ``nn.BatchNorm1d/2d``: forward + ``backward()``;
  with ``--passes`` the forward (building the graph) and ``backward()`` alone;
* ``NumPy 2T÷1T``: anybn on NumPy, forward + backward, on the ``--threads`` threads ÷ on one.

The last column is the machine's load average after the row (1-minute, ``os.getloadavg``):
above the thread count, other work shared the cores and the row's ratios carry its noise.

``--clock thread`` (with ``--threads 1``) times the calling thread's CPU time instead of the
wall clock: on a machine that other work keeps busy, a one-thread comparison that its load
does not skew.

``--copy`` adds the memory-traffic figure: anybn's NumPy forward + backward at (32,64,56,56)
÷ one ``np.copyto`` of x, on one thread and on ``--threads``. ``--plot`` draws the forward +
backward ratios per input and column (the figure on the benchmarks page).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "asv_benchmarks"))

from benchmarks.bench_sweep import SWEEP, build

from anybn import _kernels

#: (column, A, B, which callable)
PAIRS = (
    ("NumPy", "numpy", "torch", "forward_backward"),
    ("NumPy fwd", "numpy", "torch", "forward"),
    ("NumPy bwd", "numpy", "torch", "backward"),
    ("tensors", "tensors", "torch", "forward_backward"),
    ("tensors fwd", "tensors", "torch", "forward"),
    ("tensors bwd", "tensors", "torch", "backward"),
    ("module", "module", "nn", "forward_backward"),
    ("module fwd", "module", "nn", "forward"),
    ("module bwd", "module", "nn", "backward"),
)
THREADS_COLUMN = "NumPy 2T÷1T"


#: The clock: wall time, or with ``--clock thread`` (one thread only) the calling thread's
#: CPU time, which a busy machine does not inflate (time spent descheduled is not counted).
CLOCK = time.perf_counter


def best(fn: Callable[[], object], number: int, repeat: int = 2) -> float:
    """Seconds per call: the best of ``repeat`` runs of ``number`` calls."""
    out = float("inf")
    for _ in range(repeat):
        t = CLOCK()
        for _ in range(number):
            fn()
        out = min(out, (CLOCK() - t) / number)
    return out


def ratio(
    a: Callable[[], object],
    b: Callable[[], object],
    rounds: int,
    number: int,
    before_a: Callable[[], object] | None = None,
    before_b: Callable[[], object] | None = None,
) -> float:
    """Median over rounds of A ÷ B, timed back to back in alternating order."""
    ra = []
    for i in range(rounds):
        times = {}
        for which in ("ab" if i % 2 == 0 else "ba"):
            hook = before_a if which == "a" else before_b
            if hook is not None:
                hook()
            times[which] = best(a if which == "a" else b, number)
        ra.append(times["a"] / times["b"])
    return statistics.median(ra)


def number_for(size: int) -> int:
    """Calls per timing: about 2M values' worth, at least one."""
    return max(1, int(2e6 // size))


def row(
    shape: str, dtype: str, threads: int, rounds: int, passes: bool
) -> dict[str, float | None]:
    """The ratios of one input."""
    cases = {}
    for impl in ("numpy", "tensors", "torch", "module", "nn"):
        try:
            cases[impl] = build(impl, shape, dtype)
        except NotImplementedError:
            cases[impl] = None
    number = number_for(next(c for c in cases.values() if c is not None).size)
    out: dict[str, float | None] = {}
    for column, a, b, what in PAIRS:
        if what != "forward_backward" and not passes:
            continue
        ca, cb = cases[a], cases[b]
        if ca is None or cb is None:
            out[column] = None
            continue
        fa, fb = getattr(ca, what), getattr(cb, what)
        fa(), fb()
        out[column] = ratio(fa, fb, rounds, number)
    numpy_case = cases["numpy"]
    if numpy_case is None or threads == 1:
        out[THREADS_COLUMN] = None
    else:
        fn = numpy_case.forward_backward
        out[THREADS_COLUMN] = ratio(
            fn, fn, rounds, number,
            before_a=lambda: _kernels.set_num_threads(threads),
            before_b=lambda: _kernels.set_num_threads(1),
        )  # fmt: skip
        _kernels.set_num_threads(threads)
    return out


def copy_ratio(threads: int, rounds: int) -> dict[int, float]:
    """anybn's NumPy forward + backward at (32,64,56,56) ÷ one ``np.copyto`` of x."""
    case = build("numpy", "(32,64,56,56)", "float32")
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 64, 56, 56), dtype=np.float32)
    dst = np.empty_like(x)

    def copy() -> None:
        np.copyto(dst, x)

    out = {}
    for t in sorted({1, threads}):
        _kernels.set_num_threads(t)
        case.forward_backward()
        out[t] = ratio(case.forward_backward, copy, rounds, 3)
    _kernels.set_num_threads(threads)
    return out


def plot(results: dict[str, dict[str, float | None]], title: str, path: str) -> None:
    """Forward + backward ratio per input, one bar series per column (log scale), with lines
    at 1 and at 1.1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    names = list(results)
    series = [("NumPy", "anybn on NumPy ÷ torch native"),
              ("tensors", "anybn on torch tensors ÷ torch native"),
              ("module", "anybn.torch module ÷ nn module")]  # fmt: skip
    fig, ax = plt.subplots(figsize=(11, 4.8))
    width = 0.8 / len(series)
    for i, (col, label) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(names))]
        ys = [results[n].get(col) for n in names]
        ax.bar(
            [x for x, y in zip(xs, ys, strict=True) if y is not None],
            [y for y in ys if y is not None], width, label=label,
        )  # fmt: skip
    ax.set_yscale("log")
    values = [v for r in results.values() for c, _ in series if (v := r.get(c)) is not None]
    ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50)
             if min(values) / 2 <= t <= max(values) * 2]  # fmt: skip
    ax.set_yticks(ticks)
    ax.yaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.1, color="grey", linewidth=0.8, linestyle="--", label="1.1")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels([n.replace("-channels-last", " CL") for n in names], rotation=60,
                       ha="right", fontsize=8)  # fmt: skip
    ax.set_ylabel("time ÷ peer (forward + backward)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _title(dtype: str, threads: int) -> str:
    return f"{dtype}, {threads} thread{'' if threads == 1 else 's'}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--shapes", nargs="*", default=list(SWEEP))
    ap.add_argument("--json", help="write the ratios here")
    ap.add_argument("--plot", help="write the forward + backward plot here (PNG)")
    ap.add_argument("--copy", action="store_true", help="add the memory-traffic figure")
    ap.add_argument("--passes", action="store_true", help="add each pass alone")
    ap.add_argument("--from-json", help="only draw --plot from a --json file of an earlier run")
    ap.add_argument("--clock", choices=("wall", "thread"), default="wall",
                    help="thread: the calling thread's CPU time (needs --threads 1)")  # fmt: skip
    args = ap.parse_args()
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        plot(saved["ratios"], _title(saved["dtype"], saved["threads"]), args.plot)
        return
    if args.clock == "thread":
        if args.threads != 1:
            ap.error("--clock thread measures the calling thread only: use --threads 1")
        global CLOCK
        CLOCK = time.thread_time
    torch.set_num_threads(args.threads)
    _kernels.set_num_threads(args.threads)
    print(f"{args.dtype}, {args.threads} threads, medians of {args.rounds} rounds in rotation, "
          f"{args.clock} clock")  # fmt: skip
    cols = [p[0] for p in PAIRS if args.passes or p[3] == "forward_backward"] + [THREADS_COLUMN]
    print("| input | " + " | ".join(cols) + " | load |")
    print("|---" * (len(cols) + 2) + "|", flush=True)
    results = {}
    for name in args.shapes:
        r = row(name, args.dtype, args.threads, args.rounds, args.passes)
        results[name] = r
        cells = ["n/a" if r[c] is None else f"{r[c]:.2f}" for c in cols]
        load = os.getloadavg()[0]  # the machine's load average: the noise the ratios carry
        r["load"] = load
        print(f"| {name.replace('-channels-last', ' CL')} | " + " | ".join(cells) +
              f" | {load:.1f} |", flush=True)  # fmt: skip
    extra = {}
    if args.copy:
        extra = copy_ratio(args.threads, args.rounds)
        for t, v in extra.items():
            print(f"NumPy forward + backward ÷ np.copyto of x, (32,64,56,56), {t} thread(s): "
                  f"{v:.2f}")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"dtype": args.dtype, "threads": args.threads, "rounds": args.rounds,
             "ratios": results, "copy": extra}, indent=1))  # fmt: skip
    if args.plot:
        plot(results, _title(args.dtype, args.threads), args.plot)


if __name__ == "__main__":
    main()
