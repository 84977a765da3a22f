"""Measure what synchronizing batch norm costs: 2 gloo ranks and 2 MPI ranks, on loopback.

Usage (from the repository root; needs torch, and mpi4py + mpiexec for the MPI rows)::

    python docs/scripts/sync_overhead.py [--repeat 15] [--engines gloo,mpi]
    OMP_NUM_THREADS=1 ANYBN_NUM_THREADS=1 python docs/scripts/sync_overhead.py --one-process
    OMP_NUM_THREADS=1 ANYBN_NUM_THREADS=1 python docs/scripts/sync_overhead.py --one-process --mask

For each shape (each rank's shard: ``(32, 64, 56, 56)`` and ``(256, 512)``, float32)
every rank times a training forward + backward with :func:`anybn.batch_norm` /
:func:`anybn.batch_norm_backward` three ways, interleaved so that load from elsewhere
hits all three alike: local (``comm=None``), synchronized (``comm=`` the group), and
the synchronized code path in a group of one rank (its compute, without network or
waiting). Each figure is the fastest of ``--repeat`` runs after 3 warm-up runs (the
minimum, not the median: on a shared machine other processes only ever add time), one
thread per rank. The table shows rank 0's times, the overhead ``sync - local``, and
the four collectives of a functional step timed alone. ``--mask`` (one process only)
times the same calls with a padding mask (70 % True) of x's shape.
gloo runs carry torch CPU tensors, MPI runs NumPy arrays. Also shown: the bytes each
rank sends per step. The ranks are processes of this machine talking over 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(32, 64, 56, 56), (256, 512)]


def _step(anybn: object, x: object, dy: object, comm: object, mask: object = None) -> None:
    out = anybn.batch_norm(x, training=True, comm=comm, mask=mask)  # type: ignore[attr-defined]
    anybn.batch_norm_backward(dy, x, None, out.mean, out.invstd, comm=comm, mask=mask)  # type: ignore[attr-defined]


def _alone_class() -> type:
    from anybn.distributed import Communicator

    class Alone(Communicator):
        """A group of one: the synchronized code path with no network and no waiting."""

        rank, size, engine = 0, 1, "none"

        def all_gather(self, a: object) -> object:
            return a[None, :]  # type: ignore[index]

        def all_reduce(self, a: object) -> object:
            return a

        def all_gather_ints(self, values: list[int], like: object = None) -> list[list[int]]:
            return [list(values)]

    return Alone


def one_process(repeat: int, masked: bool = False) -> None:
    """The compute of the synchronized path against the local one, in this process alone;
    ``masked``: both with a padding mask of x's shape (70 % True)."""
    import numpy as np
    import torch

    import anybn

    torch.set_num_threads(1)
    alone = _alone_class()()
    print("| library | shape (float32) | local fwd+bwd | synchronized code path, one rank |")
    print("|---|---|---|---|")
    for lib in ("torch", "numpy"):
        for shape in SHAPES:
            rng = np.random.default_rng(0)
            x = rng.normal(size=shape).astype(np.float32)
            dy = rng.normal(size=shape).astype(np.float32)
            mask = rng.uniform(size=shape) < 0.7 if masked else None
            if lib == "torch":
                x, dy = torch.from_numpy(x), torch.from_numpy(dy)
                mask = None if mask is None else torch.from_numpy(mask)
            runs: dict[str, list[float]] = {"local": [], "alone": []}
            for i in range(3 + repeat):
                for mode, c in (("local", None), ("alone", alone)):
                    t0 = time.perf_counter()
                    _step(anybn, x, dy, c, mask)
                    if i >= 3:
                        runs[mode].append(time.perf_counter() - t0)
            local, sync = min(runs["local"]) * 1e3, min(runs["alone"]) * 1e3
            shape_text = "(" + ", ".join(map(str, shape)) + ")"
            ratio = f"{sync:.2f} ms ({sync / local:.2f}x)"
            print(f"| {lib} | {shape_text} | {local:.2f} ms | {ratio} |")


def rank_main(engine: str, repeat: int) -> None:
    import numpy as np

    import anybn

    if engine == "gloo":
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        rank, comm = dist.get_rank(), dist.group.WORLD
        barrier = dist.barrier

        def make(a: np.ndarray) -> object:
            return torch.from_numpy(a)
    else:
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, barrier = comm.Get_rank(), comm.Barrier

        def make(a: np.ndarray) -> object:
            return a

    from anybn.distributed import as_communicator

    Alone = _alone_class()
    communicator = as_communicator(comm)
    rows = []
    rng = np.random.default_rng(rank)
    for shape in SHAPES:
        x = make(rng.normal(size=shape).astype(np.float32))
        dy = make(rng.normal(size=shape).astype(np.float32))
        modes = {"local": None, "sync": comm, "alone": Alone()}
        runs: dict[str, list[float]] = {mode: [] for mode in modes}
        for i in range(3 + repeat):  # interleaved, so that load from elsewhere hits all three
            for mode, c in modes.items():
                barrier()
                t0 = time.perf_counter()
                _step(anybn, x, dy, c)
                if i >= 3:  # warm-up
                    runs[mode].append(time.perf_counter() - t0)
        timings = {mode: min(r) for mode, r in runs.items()}
        channels = shape[1]
        stats = make(np.zeros(3 * channels, dtype=np.float32))
        sums = make(np.zeros(2 * channels, dtype=np.float32))

        def collectives(stats: object = stats, sums: object = sums) -> None:
            # what one functional forward + backward sends
            communicator.all_gather_ints([0] * 8, like=stats)
            communicator.all_gather(stats)
            communicator.all_gather_ints([0] * 8, like=sums)
            communicator.all_reduce(sums)

        for _ in range(3):
            collectives()
        runs = []
        for _ in range(repeat):
            barrier()
            t0 = time.perf_counter()
            collectives()
            runs.append(time.perf_counter() - t0)
        timings["collectives"] = min(runs)
        # two headers (8 int64), all-gather of 3C stats, all-reduce of 2C sums; float32
        sent = 2 * 8 * 8 + 3 * channels * 4 + 2 * channels * 4
        rows.append({"shape": shape, **timings, "bytes": sent})
    if rank == 0:
        print(json.dumps(rows))
    if engine == "gloo":
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(engine: str, repeat: int) -> list[dict]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env.update(OMP_NUM_THREADS="1", ANYBN_NUM_THREADS="1")  # one core per rank
    cmd = [sys.executable, __file__, "--rank-of", engine, "--repeat", str(repeat)]
    if engine == "gloo":
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
        procs = [
            subprocess.Popen(cmd, env={**env, "RANK": str(r)}, stdout=subprocess.PIPE, text=True)
            for r in range(2)
        ]
    else:
        mpiexec = shutil.which("mpiexec")
        if mpiexec is None:
            raise SystemExit("mpiexec not found (pip install mpich mpi4py)")
        procs = [
            subprocess.Popen([mpiexec, "-n", "2", *cmd], env=env, stdout=subprocess.PIPE, text=True)
        ]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{engine}: a rank failed")
    return json.loads(next(o for o in outs if o.strip()).strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--engines", default="gloo,mpi")
    parser.add_argument(
        "--one-process",
        action="store_true",
        help="time only the compute of the synchronized path, in this process (one thread)",
    )
    parser.add_argument(
        "--mask", action="store_true", help="with --one-process: every call with a padding mask"
    )
    parser.add_argument("--rank-of", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_of:
        rank_main(args.rank_of, args.repeat)
        return
    if args.one_process:
        one_process(args.repeat, args.mask)
        return
    print(
        "| engine | shard shape (float32) | local fwd+bwd | synchronized fwd+bwd | overhead "
        "| sync code path, one rank | the 4 collectives alone | bytes sent per rank per step |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for engine in args.engines.split(","):
        for row in launch(engine, args.repeat):
            local, sync = row["local"] * 1e3, row["sync"] * 1e3
            shape = "(" + ", ".join(map(str, row["shape"])) + ")"
            print(
                f"| {engine} | {shape} | {local:.2f} ms | {sync:.2f} ms "
                f"| {sync - local:+.2f} ms ({100 * (sync - local) / local:+.0f}%) "
                f"| {row['alone'] * 1e3:.2f} ms | {row['collectives'] * 1e3:.2f} ms "
                f"| {row['bytes']} |"
            )


if __name__ == "__main__":
    main()
