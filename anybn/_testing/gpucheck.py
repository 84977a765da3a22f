"""``python -m anybn gpu-check --out DIR``: everything a GPU machine should check, in one run.

On one CUDA GPU, within about six minutes:

1. the ``cupy`` and ``torch:cuda`` rows of the test matrix (pytest in a subprocess,
   ``-k "cupy or cuda"``) and the kernel tests on the real device
   (``tests/test_gpu_kernels.py`` without the simulator);
2. float32 accuracy on offset data (1e0..1e5) of anybn on CuPy arrays, anybn on
   torch CUDA tensors and torch's native CUDA kernels, against the float64
   reference (the measurement that decides where torch's kernels meet anybn's rule);
3. a benchmark: forward (training), backward, forward+backward on (32, 64, 56, 56),
   (128, 64, 112, 112), (4096, 1024) and the channels-last 4-D shapes, float32 and
   float16, with the achieved bandwidth as a percentage of the device's copy
   bandwidth and the ratio to torch's native CUDA kernels;

and writes ``DIR/gpu-check.md`` and ``DIR/gpu-check.json``. The pytest steps need the
repository (``tests/``) in the current directory. On a machine without a CUDA GPU it
says so and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["find_gpu", "main"]

#: Bench shapes: (name, shape, channels-last). Channels-last 4-D shapes are given as
#: NCHW and laid out NHWC (torch.channels_last; a moveaxis view of NHWC for CuPy).
BENCH_SHAPES: list[tuple[str, tuple[int, ...], bool]] = [
    ("32x64x56x56", (32, 64, 56, 56), False),
    ("128x64x112x112", (128, 64, 112, 112), False),
    ("4096x1024", (4096, 1024), False),
    ("32x64x56x56-cl", (32, 64, 56, 56), True),
    ("128x64x112x112-cl", (128, 64, 112, 112), True),
]
#: Passes over x-sized memory each operation needs at least (DESIGN.md, Performance).
PASSES = {"fwd": 3, "bwd": 5, "fwd+bwd": 8}
OFFSETS = [1e0, 1e2, 1e3, 1e4, 1e5]
ROOT = Path.cwd()


def find_gpu() -> tuple[bool, str]:
    """``(found, description)``: whether CuPy, torch or numba sees a CUDA GPU, and which."""
    reasons = []
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            return True, f"{props['name'].decode()} (CuPy {cupy.__version__})"
        reasons.append("cupy: no device")
    except Exception as exc:
        reasons.append(f"cupy: {type(exc).__name__}")
    try:
        import torch

        if torch.cuda.is_available():
            return True, f"{torch.cuda.get_device_name(0)} (torch {torch.__version__})"
        reasons.append("torch: torch.cuda.is_available() is False")
    except Exception as exc:
        reasons.append(f"torch: {type(exc).__name__}")
    return False, "; ".join(reasons)


# --- step 1: tests ------------------------------------------------------------------------


def _pytest(args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rs", *args]
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT
        )
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        return {"cmd": " ".join(cmd), "rc": None, "status": f"timeout after {timeout:.0f}s",
                "tail": out[-3000:], "seconds": timeout}  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    summary = lines[-1] if lines else proc.stderr.strip()[-300:]
    return {
        "cmd": " ".join(cmd),
        "rc": proc.returncode,
        "status": "passed" if proc.returncode == 0 else "FAILED",
        "summary": summary,
        "tail": (proc.stdout + proc.stderr)[-4000:],
        "seconds": round(time.perf_counter() - start, 1),
    }


def run_tests(budget: float) -> dict[str, Any]:
    """The GPU rows of the matrix and the kernel tests on the device."""
    if not (ROOT / "tests").is_dir():
        return {"skipped": f"no tests/ under {ROOT}: run from the repository root"}
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM",)}
    env.pop("ANYBN_CUDA_SIMULATOR", None)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    kernels = _pytest(["tests/test_gpu_kernels.py"], timeout=0.45 * budget, env=env)
    matrix = _pytest(
        ["tests", "-k", "cupy or cuda", "--ignore=tests/test_gpu_kernels.py", "--maxfail=20"],
        timeout=0.55 * budget,
        env=env,
    )
    return {"kernel_tests": kernels, "matrix_gpu_rows": matrix}


# --- steps 2 and 3: accuracy and benchmark ----------------------------------------------


class _Lib:
    """CuPy or torch on the GPU: arrays, events, synchronisation."""

    def __init__(self, name: str, device: str = "cuda") -> None:
        self.name = name
        self.device = device  # torch only: "cpu" for the harness's own dry run
        if name == "cupy":
            import cupy

            self.m: Any = cupy
        else:
            import torch

            self.m = torch

    def asarray(self, a: np.ndarray, channels_last: bool = False) -> Any:
        if self.name == "cupy":
            if channels_last and a.ndim == 4:  # NHWC memory, NCHW view (axis 1)
                return self.m.moveaxis(
                    self.m.asarray(np.ascontiguousarray(a.transpose(0, 2, 3, 1))), 3, 1
                )
            return self.m.asarray(a)
        t = self.m.from_numpy(np.ascontiguousarray(a)).to(self.device)
        if channels_last and a.ndim == 4:
            t = t.contiguous(memory_format=self.m.channels_last)
        return t

    def host(self, a: Any) -> np.ndarray:
        if self.name == "cupy":
            return self.m.asnumpy(a)
        return (
            a.detach().float().cpu().numpy()
            if str(a.dtype) == "torch.bfloat16"
            else a.cpu().numpy()
        )

    def cast(self, a: Any, dtype: str) -> Any:
        return a.astype(dtype) if self.name == "cupy" else a.to(getattr(self.m, dtype))

    def sync(self) -> None:
        if self.name == "cupy":
            self.m.cuda.get_current_stream().synchronize()
        elif self.device != "cpu":
            self.m.cuda.synchronize()

    def time_ms(self, fn: Callable[[], Any], repeat: int) -> float:
        """Median milliseconds per call (CUDA events around each call)."""
        return self.time_both(fn, repeat)[0]

    def time_both(self, fn: Callable[[], Any], repeat: int) -> tuple[float, float]:
        """Medians of (device ms, host ms) per call over ``repeat`` calls.

        Device time: CUDA events recorded before and after the call, so gaps left by
        slow launches count. Host time: how long the Python call itself takes (the
        launches are asynchronous); when it exceeds the device time, launch overhead
        dominates.
        """
        fn()
        self.sync()
        times, host = [], []
        for _ in range(repeat):
            if self.device == "cpu":
                t0 = time.perf_counter()
                fn()
                times.append(1e3 * (time.perf_counter() - t0))
                host.append(times[-1])
                continue
            if self.name == "cupy":
                start, end = self.m.cuda.Event(), self.m.cuda.Event()
            else:
                start, end = (self.m.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            t0 = time.perf_counter()
            fn()
            host.append(1e3 * (time.perf_counter() - t0))
            end.record()
            end.synchronize()
            if self.name == "cupy":
                times.append(self.m.cuda.get_elapsed_time(start, end))
            else:
                times.append(start.elapsed_time(end))
        return float(np.median(times)), float(np.median(host))


def _available(name: str) -> bool:
    try:
        if name == "cupy":
            import cupy

            return bool(cupy.cuda.runtime.getDeviceCount() > 0)
        import torch

        return bool(torch.cuda.is_available())
    except Exception:
        return False


def _impls(libs: dict[str, _Lib]) -> dict[str, tuple[_Lib, str]]:
    out = {}
    if "cupy" in libs:
        out["anybn-cupy"] = (libs["cupy"], "anybn")
    if "torch" in libs:
        out["anybn-torch"] = (libs["torch"], "anybn")
        out["torch-native"] = (libs["torch"], "native")
    return out


def _ops(lib: _Lib, how: str, x: Any, dy: Any, w: Any, b: Any, rm: Any, rv: Any) -> dict:
    """``{"fwd": f, "bwd": f, "fwd+bwd": f}`` for one implementation on these arrays."""
    import anybn

    if how == "anybn":
        out = anybn.batch_norm(x, rm, rv, w, b, training=True)

        def fwd() -> Any:
            return anybn.batch_norm(x, rm, rv, w, b, training=True)

        def bwd() -> Any:
            return anybn.batch_norm_backward(dy, x, w, out.mean, out.invstd)

        def both() -> Any:
            o = anybn.batch_norm(x, rm, rv, w, b, training=True)
            return anybn.batch_norm_backward(dy, x, w, o.mean, o.invstd)

        return {"fwd": fwd, "bwd": bwd, "fwd+bwd": both}
    torch = lib.m
    aten = torch.ops.aten
    rm2, rv2 = rm.clone(), rv.clone()  # native updates them in place
    _, save_mean, save_invstd = aten.native_batch_norm(x, w, b, rm2, rv2, True, 0.1, 1e-5)
    mask = [True, True, True]

    def nfwd() -> Any:
        return aten.native_batch_norm(x, w, b, rm2, rv2, True, 0.1, 1e-5)

    def nbwd() -> Any:
        return aten.native_batch_norm_backward(
            dy, x, w, rm2, rv2, save_mean, save_invstd, True, 1e-5, mask
        )

    def nboth() -> Any:
        _, m, s = aten.native_batch_norm(x, w, b, rm2, rv2, True, 0.1, 1e-5)
        return aten.native_batch_norm_backward(dy, x, w, rm2, rv2, m, s, True, 1e-5, mask)

    return {"fwd": nfwd, "bwd": nbwd, "fwd+bwd": nboth}


def _data(shape: tuple[int, ...], offset: float, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    c = shape[1]
    return {
        "x": (rng.standard_normal(shape, dtype=np.float32) + np.float32(offset)),
        "dy": rng.standard_normal(shape, dtype=np.float32),
        "w": rng.uniform(0.5, 1.5, c).astype(np.float32),
        "b": rng.standard_normal(c).astype(np.float32),
    }


def _device_arrays(lib: _Lib, d: dict, channels_last: bool, dtype: str) -> tuple:
    x = lib.cast(lib.asarray(d["x"], channels_last), dtype)
    dy = lib.cast(lib.asarray(d["dy"], channels_last), dtype)
    w, b = lib.asarray(d["w"]), lib.asarray(d["b"])
    c = d["w"].shape[0]
    rm, rv = lib.asarray(np.zeros(c, np.float32)), lib.asarray(np.ones(c, np.float32))
    return x, dy, w, b, rm, rv


def run_accuracy(
    libs: dict[str, _Lib], shape: tuple[int, ...] = (16, 64, 28, 28)
) -> list[dict[str, Any]]:
    """float32 y and dweight errors against float64 on offset data, per implementation."""
    from .reference import reference_backward, reference_forward

    rows = []
    for channels_last in (False, True):
        for offset in OFFSETS:
            d = _data(shape, offset, seed=1)
            ref = reference_forward(d["x"], None, None, d["w"], d["b"], training=True)
            refb = reference_backward(d["dy"], d["x"], d["w"], training=True)
            for name, (lib, how) in _impls(libs).items():
                try:
                    x, dy, w, b, rm, rv = _device_arrays(lib, d, channels_last, "float32")
                    ops = _ops(lib, how, x, dy, w, b, rm, rv)
                    y = ops["fwd"]()[0]
                    dw = ops["bwd"]()[1]
                    lib.sync()
                except Exception as exc:  # one broken implementation must not hide the others
                    rows.append({"impl": name, "offset": offset, "error": _error(exc)})
                    continue
                y_err = float(np.max(np.abs(lib.host(y).astype(np.float64) - ref.y)))
                dw_err = float(
                    np.max(np.abs(lib.host(dw) - refb.dweight)) / np.max(np.abs(refb.dweight))
                )
                rows.append({
                    "impl": name, "layout": "channels-last" if channels_last else "NCHW",
                    "offset": offset, "y_abs_err": y_err, "dweight_rel_err": dw_err,
                    "meets_1e-6": y_err <= 1e-6,
                })  # fmt: skip
    return rows


def copy_bandwidth(lib: _Lib, nbytes: int = 1 << 30) -> float:
    """GB/s of a device-to-device copy (read + write) of ``nbytes``."""
    n = nbytes // 4
    if lib.name == "cupy":
        src = lib.m.ones(n, dtype="float32")
        dst = lib.m.empty_like(src)

        def copy() -> None:
            dst[...] = src
    else:
        src = lib.m.ones(n, dtype=lib.m.float32, device=lib.device)
        dst = lib.m.empty_like(src)

        def copy() -> None:
            dst.copy_(src)

    ms = lib.time_ms(copy, repeat=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def run_bench(
    libs: dict[str, _Lib],
    deadline: float,
    repeat: int,
    shapes: list[tuple[str, tuple[int, ...], bool]] = BENCH_SHAPES,
    copy_bytes: int = 1 << 30,
) -> dict[str, Any]:
    """Time every (shape, dtype, implementation, op); bandwidths against a device copy."""
    first = next(iter(libs.values()))
    bw = copy_bandwidth(first, copy_bytes)
    rows: list[dict[str, Any]] = []
    for label, shape, channels_last in shapes:
        for dtype in ("float32", "float16"):
            if time.perf_counter() > deadline:
                rows.append({"shape": label, "dtype": dtype, "skipped": "time budget"})
                continue
            d = _data(shape, 0.0)
            itemsize = np.dtype(dtype).itemsize
            nbytes = int(np.prod(shape)) * itemsize
            print(f"  bench {label} {dtype}", flush=True)
            for name, (lib, how) in _impls(libs).items():
                try:
                    _bench_one(rows, lib, how, name, d, label, dtype, channels_last, nbytes,
                               bw, repeat)  # fmt: skip
                except Exception as exc:  # one broken implementation must not hide the others
                    rows.append({"shape": label, "dtype": dtype, "impl": name,
                                 "error": _error(exc)})  # fmt: skip
    _ratios(rows)
    return {"copy_bandwidth_GBs": round(bw, 1), "rows": rows}


def _error(exc: BaseException) -> str:
    import traceback

    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)[-3:]
    return f"{type(exc).__name__}: {exc} | " + " ".join(t.strip() for t in tail)[-800:]


def _bench_one(
    rows: list[dict[str, Any]], lib: _Lib, how: str, name: str, d: dict, label: str,
    dtype: str, channels_last: bool, nbytes: int, bw: float, repeat: int,
) -> None:  # fmt: skip
    x, dy, w, b, rm, rv = _device_arrays(lib, d, channels_last, dtype)
    ctx = lib.m.no_grad() if lib.name == "torch" else _Null()
    with ctx:
        ops = _ops(lib, how, x, dy, w, b, rm, rv)
        for op, fn in ops.items():
            ms, host_ms = lib.time_both(fn, repeat)
            gbs = PASSES[op] * nbytes / (ms * 1e-3) / 1e9
            rows.append({
                "shape": label, "dtype": dtype, "impl": name, "op": op,
                "ms": round(ms, 4), "host_ms": round(host_ms, 4), "GB/s": round(gbs, 1),
                "pct_copy_bw": round(100 * gbs / bw, 1),
            })  # fmt: skip


def _ratios(rows: list[dict[str, Any]]) -> None:
    """Add each anybn row's time over torch native's for the same shape, dtype and op."""
    for r in rows:
        if "ms" not in r or r["impl"] == "torch-native":
            continue
        native = [
            n for n in rows if n.get("impl") == "torch-native"
            and (n["shape"], n["dtype"], n["op"]) == (r["shape"], r["dtype"], r["op"])
        ]  # fmt: skip
        if native:
            r["ratio_to_torch_native"] = round(r["ms"] / native[0]["ms"], 3)


class _Null:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def targets(bench: dict[str, Any], accuracy: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The GPU targets, each with its measured value and verdict."""
    out = []
    rows = bench.get("rows", [])

    def find(shape: str, impl: str, op: str = "fwd+bwd") -> dict | None:
        for r in rows:
            key = (r.get("shape"), r.get("dtype"), r.get("impl"), r.get("op"))
            if key == (shape, "float32", impl, op):
                return r
        return None

    for shape in ("32x64x56x56", "128x64x112x112"):
        r = find(shape, "anybn-cupy")
        if r:
            out.append({"target": f"cupy fwd+bwd {shape} >= 70% copy BW",
                        "value": r["pct_copy_bw"], "ok": r["pct_copy_bw"] >= 70})  # fmt: skip
            if "ratio_to_torch_native" in r:
                out.append({"target": f"cupy fwd+bwd {shape} <= 1.0x torch native",
                            "value": r["ratio_to_torch_native"],
                            "ok": r["ratio_to_torch_native"] <= 1.0})  # fmt: skip
        r = find(shape, "anybn-torch")
        if r and "ratio_to_torch_native" in r:
            out.append({"target": f"anybn on torch CUDA fwd+bwd {shape} <= 1.05x native",
                        "value": r["ratio_to_torch_native"],
                        "ok": r["ratio_to_torch_native"] <= 1.05})  # fmt: skip
    for impl in ("anybn-cupy", "anybn-torch"):
        errs = [a["y_abs_err"] for a in accuracy if a["impl"] == impl and "error" not in a]
        if errs:
            out.append({"target": f"{impl} float32 y <= 1e-6 abs at offsets up to 1e5",
                        "value": max(errs), "ok": max(errs) <= 1e-6})  # fmt: skip
    return out


# --- report -------------------------------------------------------------------------------


def _markdown(result: dict[str, Any]) -> str:
    lines = [
        "# anybn gpu-check",
        "",
        f"- date: {result['date']}",
        f"- device: {result['device']}",
        f"- python {result['python']}, {result['versions']}",
        f"- wall time: {result.get('seconds', '?')} s",
        "",
    ]
    tests = result.get("tests", {})
    if tests:
        lines += ["## Tests", ""]
        for name, t in tests.items():
            if isinstance(t, dict):
                lines.append(
                    f"- {name}: {t.get('status', t.get('skipped'))} {t.get('summary', '')}"
                )
            else:
                lines.append(f"- {name}: {t}")
        lines.append("")
    if result.get("targets"):
        lines += ["## Targets", "", "| target | value | ok |", "| --- | --- | --- |"]
        lines += [f"| {t['target']} | {t['value']:.3g} | {'yes' if t['ok'] else 'NO'} |"
                  for t in result["targets"]]  # fmt: skip
        lines.append("")
    if result.get("accuracy"):
        lines += ["## float32 accuracy on offset data (16, 64, 28, 28)", "",
                  "| impl | layout | offset | y abs err | dweight rel err |",
                  "| --- | --- | --- | --- | --- |"]  # fmt: skip
        lines += [f"| {a['impl']} | {a['layout']} | {a['offset']:g} | {a['y_abs_err']:.1e} "
                  f"| {a['dweight_rel_err']:.1e} |" if "error" not in a else
                  f"| {a['impl']} | | {a['offset']:g} | {a['error']} | |"
                  for a in result["accuracy"]]  # fmt: skip
        lines.append("")
    bench = result.get("bench")
    if bench:
        header = "| shape | dtype | impl | op | ms | host ms | GB/s | % copy BW | x torch native |"
        lines += [f"## Benchmark (copy bandwidth {bench['copy_bandwidth_GBs']} GB/s)", "",
                  header, "|" + " --- |" * 9]  # fmt: skip
        for r in bench["rows"]:
            if "ms" not in r:
                why = r.get("skipped") or r.get("error")
                lines.append(f"| {r['shape']} | {r['dtype']} | {r.get('impl', '')} | {why} |||||")
                continue
            lines.append(
                f"| {r['shape']} | {r['dtype']} | {r['impl']} | {r['op']} | {r['ms']:.3f} "
                f"| {r['host_ms']:.3f} | {r['GB/s']} | {r['pct_copy_bw']} "
                f"| {r.get('ratio_to_torch_native', '')} |"
            )
        lines.append("")
    if result.get("errors"):
        lines += ["## Errors", "", *[f"- {e}" for e in result["errors"]], ""]
    return "\n".join(lines)


def _versions() -> str:
    out = []
    for name in ("numpy", "cupy", "torch", "numba", "numba_cuda"):
        try:
            mod = __import__(name)
            out.append(f"{name} {getattr(mod, '__version__', '?')}")
        except Exception:
            pass
    return ", ".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m anybn gpu-check``; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m anybn gpu-check",
        description="On a CUDA GPU: GPU test rows, kernel tests, accuracy and benchmark.",
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the summaries")
    parser.add_argument("--budget", type=float, default=330.0, help="seconds (default 330)")
    parser.add_argument("--repeat", type=int, default=10, help="timed repeats (default 10)")
    parser.add_argument("--skip-tests", action="store_true", help="benchmark and accuracy only")
    # the harness on torch CPU tensors with tiny shapes, so that CI runs its code paths
    parser.add_argument("--cpu-dry-run", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    found, device = find_gpu()
    if args.cpu_dry_run:
        found, device, args.skip_tests = True, "CPU dry run (torch CPU tensors)", True
    if not found:
        print(f"gpu-check: no CUDA GPU found ({device}); nothing to check here.")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "device": device,
        "python": platform.python_version(),
        "versions": _versions(),
        "errors": [],
    }
    print(f"gpu-check on {device}", flush=True)
    if not args.skip_tests:
        result["tests"] = run_tests(budget=0.55 * args.budget)
        for name, t in result["tests"].items():
            print(f"  {name}: {t.get('status', t.get('skipped')) if isinstance(t, dict) else t} "
                  f"{t.get('summary', '') if isinstance(t, dict) else ''}", flush=True)  # fmt: skip
    libs = {name: _Lib(name) for name in ("cupy", "torch") if _available(name)}
    shapes, acc_shape, copy_bytes = BENCH_SHAPES, (16, 64, 28, 28), 1 << 30
    if args.cpu_dry_run:
        libs = {"torch": _Lib("torch", "cpu")}
        shapes = [("4x6x5x5", (4, 6, 5, 5), False), ("64x8", (64, 8), False),
                  ("4x6x5x5-cl", (4, 6, 5, 5), True)]  # fmt: skip
        acc_shape, copy_bytes = (4, 6, 5, 5), 1 << 20
    print("  accuracy on offset data", flush=True)
    try:
        result["accuracy"] = run_accuracy(libs, acc_shape)
    except Exception as exc:
        result["errors"].append(f"accuracy: {type(exc).__name__}: {exc}")
        result["accuracy"] = []
    deadline = start + args.budget
    try:
        result["bench"] = run_bench(libs, deadline, args.repeat, shapes, copy_bytes)
    except Exception as exc:
        result["errors"].append(f"bench: {type(exc).__name__}: {exc}")
        result["bench"] = {}
    result["targets"] = targets(result.get("bench") or {}, result["accuracy"])
    result["seconds"] = round(time.perf_counter() - start, 1)
    (args.out / "gpu-check.json").write_text(json.dumps(result, indent=1, default=str))
    text = _markdown(result)
    (args.out / "gpu-check.md").write_text(text)
    print(text)
    return 0
