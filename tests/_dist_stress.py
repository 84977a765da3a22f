"""Stress the distributed fault scenarios: many consecutive launches, optionally under CPU load.

A rare race at process exit (a gloo thread still joinable, a pending collective torn
down) shows as a rank killed by a signal, not as a failed assertion; this script
repeats the scenarios that end in errors and checks that every rank, every time,
exits with code 0 after reporting a Python exception for each fault. Not collected
by pytest; run it directly::

    python tests/_dist_stress.py --runs 50 --load 2
    python tests/_dist_stress.py --runs 3 --scenario faults --scenario dead
    python tests/_dist_stress.py --runs 5 --scenario late   # deadlines, ~40 s a run

Each rank runs with ``PYTHONFAULTHANDLER=1`` (a fatal signal prints every thread's
Python traceback) and its stderr goes to ``WORKDIR/run{i}/rank{r}.err``; the
stderr of a failed run is printed. Exit status 1 when any run failed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import test_distributed as td  # noqa: E402

#: scenario -> (ranks, the exit codes every run must give)
SCENARIOS = {"faults": (3, [0, 0, 0]), "dead": (2, [0, 17]), "late": (3, [0, 0, 0])}


def _burn(stop: float) -> None:  # pragma: no cover - runs in a child process
    while time.monotonic() < stop:
        sum(i * i for i in range(10_000))


def launch(scenario: str, size: int, workdir: Path) -> list[int | None]:
    """Like :func:`test_distributed.launch` for gloo, with each rank's stderr kept."""
    env = {**td._env(), "PYTHONFAULTHANDLER": "1", "MASTER_ADDR": "127.0.0.1"}
    env.update(MASTER_PORT=str(td._free_port()), WORLD_SIZE=str(size))
    cmd = [sys.executable, str(td.WORKER), "gloo", scenario, str(workdir)]
    procs = []
    for rank in range(size):
        with open(workdir / f"rank{rank}.err", "wb") as err:
            procs.append(
                subprocess.Popen(
                    cmd, env={**env, "RANK": str(rank)}, stderr=err, start_new_session=True
                )
            )
    return td._wait(procs, td.LAUNCH_TIMEOUT)


def check(scenario: str, size: int, workdir: Path, codes: list[int | None]) -> str | None:
    """None if the run is clean, else what went wrong."""
    expected = SCENARIOS[scenario][1]
    if codes != expected:
        return f"exit codes {codes}, expected {expected}"
    for rank in range(size):
        if expected[rank] != 0:
            continue
        path = workdir / f"rank{rank}.json"
        if not path.exists() or not json.loads(path.read_text()).get("done"):
            return f"rank {rank} did not finish its report"
        report = json.loads(path.read_text())
        if scenario == "faults":
            # every fault case raised (a [type, message] pair), every state check held
            quiet = [k for k, v in report.items() if v is None or v is False]
            if quiet:
                return f"rank {rank}: {quiet} did not raise or changed state"
        if scenario == "dead" and report.get("forward") is None:
            return f"rank {rank} did not raise"
        if scenario == "late":
            steps = [name for name, _ in td.worker.LATE_STEPS]
            quiet = [k for k in steps if (report.get(k) or [""])[0] != "CollectiveTimeout"]
            if quiet:
                return f"rank {rank}: {quiet} did not raise CollectiveTimeout"
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=50, help="launches per scenario")
    parser.add_argument(
        "--scenario", action="append", choices=sorted(SCENARIOS), help="default: faults"
    )
    parser.add_argument("--load", type=int, default=0, help="busy processes running meanwhile")
    parser.add_argument("--workdir", type=Path, help="keep the runs' files here")
    args = parser.parse_args()
    scenarios = args.scenario or ["faults"]
    root = args.workdir or Path(tempfile.mkdtemp(prefix="anybn-dist-stress-"))
    root.mkdir(parents=True, exist_ok=True)
    burners = [
        multiprocessing.Process(target=_burn, args=(time.monotonic() + 24 * 3600,), daemon=True)
        for _ in range(args.load)
    ]
    for b in burners:
        b.start()
    failed = 0
    start = time.monotonic()
    try:
        for i in range(args.runs):
            for scenario in scenarios:
                size = SCENARIOS[scenario][0]
                workdir = root / f"{scenario}{i}"
                workdir.mkdir()
                codes = launch(scenario, size, workdir)
                problem = check(scenario, size, workdir, codes)
                status = "ok" if problem is None else f"FAILED: {problem}"
                print(f"run {i + 1}/{args.runs} {scenario}: {status}", flush=True)
                if problem is not None:
                    failed += 1
                    for rank in range(size):
                        err = (workdir / f"rank{rank}.err").read_text(errors="replace")
                        print(f"--- rank {rank} stderr ---\n{err[-4000:]}", flush=True)
    finally:
        for b in burners:
            b.terminate()
            b.join()
    total = args.runs * len(scenarios)
    print(
        f"{total - failed}/{total} runs clean ({', '.join(scenarios)}; load {args.load}; "
        f"{time.monotonic() - start:.0f} s; files in {root})"
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
