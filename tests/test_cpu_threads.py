"""How the compiled CPU kernels share a pass among threads (:mod:`anybn._kernels.pool`).

Three ways run the same work items, each writing its own place of the partial-sum tables:
on the calling thread, split inside one compiled call on Numba's TBB threading layer, and
split among anybn's Python pool. The bits must not depend on which, nor on the thread
count. The TBB rows skip where Numba's TBB layer is not available (no ``tbb`` package);
the pool's rows always run. Which layer anybn starts is checked in fresh processes: never
OpenMP or workqueue, and never against the program's own choice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from anybn import _kernels
from anybn._kernels import numba_cpu as cpu
from anybn._kernels import pool

pytestmark = pytest.mark.skipif(not cpu.AVAILABLE, reason="Numba not installed or ANYBN_NUMBA=0")

LAYOUTS = {
    "(N,C)": ((96, 24), 1, False),
    "(N,C,H,W)": ((6, 5, 9, 7), 1, False),
    "channels-last": ((6, 9, 7, 5), 3, False),
    "long planes": ((2, 3, 40000), 1, False),  # several reduction items per plane
    "transposed (N,C)": ((24, 96), 0, True),  # channels-last as the kernels see it
}
#: (how, threads): "serial" on the calling thread, "tbb" and "pool" split.
WAYS = [("serial", 1), ("tbb", 2), ("tbb", 3), ("tbb", 7), ("pool", 2), ("pool", 3)]


def _tbb() -> bool:
    return cpu.AVAILABLE and pool.tbb_layer()


needs_tbb = pytest.mark.skipif(
    not _tbb(), reason="Numba's TBB threading layer not available (pip install tbb)"
)


def _data(shape, axis, transposed, dtype, seed=3):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape) * 2 + 1e3
    dy = rng.standard_normal(shape)
    if transposed:
        x, dy = x.T, dy.T
        axis = 1 - axis
    c = x.shape[axis]
    pdt = np.float32 if dtype == "float16" else dtype
    w = rng.uniform(0.5, 1.5, c).astype(pdt)
    b = rng.standard_normal(c).astype(pdt)
    return x.astype(dtype), dy.astype(dtype), w, b, axis


def _run(how, threads, x, dy, w, b, axis, training, monkeypatch):
    """Forward and backward with the passes split ``how``, on ``threads`` threads."""
    with monkeypatch.context() as m:
        m.setattr(pool, "_tbb", how == "tbb")
        m.setattr(cpu, "TBB_MIN", 1)  # small inputs split too: quick tests, many items
        m.setattr(cpu, "PARALLEL_MIN", 1)
        previous = _kernels.set_num_threads(threads)
        try:
            c = x.shape[axis]
            rm = np.full(c, 0.5, w.dtype)
            rv = np.full(c, 2.0, w.dtype)
            f = cpu.forward(
                x, rm, rv, w, b, training=training, momentum=0.1, eps=1e-5, axis=axis
            )
            g = cpu.backward(dy, x, w, f[1], f[2], training=training, axis=axis)
        finally:
            _kernels.set_num_threads(previous)
    return (*f, *g)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "float64"])
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_bits_do_not_depend_on_threads_or_their_kind(layout, dtype, training, monkeypatch):
    x, dy, w, b, axis = _data(*LAYOUTS[layout], dtype)
    expected = _run("serial", 1, x, dy, w, b, axis, training, monkeypatch)
    ways = [(how, n) for how, n in WAYS[1:] if how == "pool" or _tbb()]
    for how, threads in ways:
        got = _run(how, threads, x, dy, w, b, axis, training, monkeypatch)
        for name, a, e in zip(("y", "mean", "invstd", "rm", "rv", "dx", "dw", "db"), got,
                              expected, strict=True):  # fmt: skip
            np.testing.assert_array_equal(a, e, err_msg=f"{name}: {how}, {threads} threads")


@needs_tbb
def test_thread_count_reaches_the_compiled_split(monkeypatch):
    """``set_num_threads`` decides: 1 runs on the calling thread, n > 1 splits n ways
    (capped at the threads Numba's layer started with)."""
    import numba

    seen = []
    real = cpu._forward_parallel

    def spy(*args):
        seen.append(args[-1])
        return real(*args)

    monkeypatch.setattr(cpu, "_forward_parallel", spy)
    monkeypatch.setattr(cpu, "TBB_MIN", 1)
    x = np.random.default_rng(0).standard_normal((512, 16)).astype(np.float32)
    for threads in (1, 2, 64):
        previous = _kernels.set_num_threads(threads)
        try:
            cpu.forward(x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1)
        finally:
            _kernels.set_num_threads(previous)
    cap = int(numba.config.NUMBA_NUM_THREADS)
    assert seen == [n for n in (min(2, cap), min(64, cap)) if n > 1]


def test_small_inputs_run_on_the_calling_thread(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_forward_parallel", lambda *a: calls.append(a))
    monkeypatch.setattr(cpu, "_parallel", lambda *a: calls.append(a))
    previous = _kernels.set_num_threads(2)
    try:
        x = np.ones((8, 16), np.float32)
        cpu.forward(x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1)
    finally:
        _kernels.set_num_threads(previous)
    assert calls == []


@needs_tbb
def test_concurrent_callers_on_the_tbb_layer_get_their_own_results():
    """Several Python threads splitting their passes at once (TBB is thread-safe)."""
    rng = np.random.default_rng(5)
    xs = [rng.standard_normal((300, 8, 40)).astype(np.float32) + i for i in range(6)]
    previous = _kernels.set_num_threads(1)
    try:
        expected = [cpu.forward(x, None, None, None, None, training=True, momentum=0.1,
                                eps=1e-5, axis=1)[0] for x in xs]  # fmt: skip
    finally:
        _kernels.set_num_threads(previous)
    previous = _kernels.set_num_threads(2)
    barrier = threading.Barrier(len(xs))

    def one(i: int) -> np.ndarray:
        barrier.wait()
        out = None
        for _ in range(20):
            out = cpu.forward(xs[i], None, None, None, None, training=True, momentum=0.1,
                              eps=1e-5, axis=1)[0]  # fmt: skip
        return out

    try:
        with ThreadPoolExecutor(len(xs)) as ex:
            got = list(ex.map(one, range(len(xs))))
    finally:
        _kernels.set_num_threads(previous)
    for g, e in zip(got, expected, strict=True):
        np.testing.assert_array_equal(g, e)


# --- which threading layer, in fresh processes ---------------------------------------------

_PROBE = """
import numpy as np, numba
from numba.np.ufunc import parallel
from anybn import _kernels
from anybn._kernels import numba_cpu as cpu, pool
_kernels.set_num_threads(2)
x = np.random.default_rng(0).standard_normal((1024, 256)).astype(np.float32)
serial = None
{before}
out = cpu.forward(x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1)
_kernels.set_num_threads(1)
ref = cpu.forward(x, None, None, None, None, training=True, momentum=0.1, eps=1e-5, axis=1)
assert all(np.array_equal(a, b) for a, b in zip(out[:3], ref[:3]))
started = parallel._is_initialized and numba.threading_layer()
print(pool.tbb_layer(), started)
"""


def _probe(env: dict[str, str], before: str = "") -> list[str]:
    code = _PROBE.format(before=before)
    env = {**os.environ, **env}
    out = subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True,
                         text=True, cwd=os.getcwd())  # fmt: skip
    return out.stdout.split()


@pytest.mark.parametrize("layer", ["omp", "workqueue"])
def test_another_layer_chosen_by_the_program_is_left_alone(layer):
    """anybn does not start the program's layer for it, and falls back to its pool."""
    assert _probe({"NUMBA_THREADING_LAYER": layer}) == ["False", "False"]


def test_a_layer_the_program_started_is_used_only_if_it_is_tbb():
    before = (
        "@numba.njit(parallel=True)\n"
        "def own(a):\n"
        "    for i in numba.prange(a.shape[0]):\n"
        "        a[i] = i\n"
        "own(np.zeros(8))\n"
    )
    assert _probe({"NUMBA_THREADING_LAYER": "workqueue"}, before) == ["False", "workqueue"]


def test_anybn_threading_pool_keeps_numba_s_layer_unstarted():
    assert _probe({"ANYBN_THREADING": "pool"}) == ["False", "False"]


def test_without_tbb_the_pool_serves():
    """No loadable TBB (its Numba layer made unimportable): the pool, and never OpenMP."""
    before = (
        "import sys; sys.modules['numba.np.ufunc.tbbpool'] = None\n"
        "from importlib import metadata\n"
        "def _none(name): raise metadata.PackageNotFoundError(name)\n"
        "metadata.files = _none\n"
    )
    assert _probe({}, before) == ["False", "False"]


@needs_tbb
def test_tbb_is_started_when_nothing_else_was():
    assert _probe({}) == ["True", "tbb"]


@needs_tbb
@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_splits_its_passes_too():
    code = (
        "import multiprocessing as mp, numpy as np\n"
        "from anybn import _kernels\n"
        "from anybn._kernels import numba_cpu as cpu\n"
        "_kernels.set_num_threads(2)\n"
        "x = np.random.default_rng(0).standard_normal((1024, 256)).astype(np.float32)\n"
        "def f(_=None):\n"
        "    return cpu.forward(x, None, None, None, None, training=True, momentum=0.1,\n"
        "                       eps=1e-5, axis=1)[0]\n"
        "parent = f()\n"
        "with mp.get_context('fork').Pool(2) as p:\n"
        "    kids = p.map(f, range(2))\n"
        "assert all(np.array_equal(k, parent) for k in kids)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True,
                         timeout=120, cwd=os.getcwd())  # fmt: skip
    assert out.stdout.split() == ["ok"]
