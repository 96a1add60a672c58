"""Wall seconds of one lab notebook per kernel thread setting, on idle cores and under a CPU load this script
makes itself: what chose the labs' one thread (docs/performance.md, "Threads on a shared CPU").

    .venv/bin/python bench/bench_lab_threads.py                                   # lab 12's solution
    .venv/bin/python bench/bench_lab_threads.py notebooks/solutions/07_*.ipynb --skip-active-loaded

Each setting executes the notebook as the grader does (`minipeft.grade.execute`: a fresh kernel, every cell),
with the kernel's OMP_NUM_THREADS / MKL_NUM_THREADS / OMP_WAIT_POLICY set per row. "loaded" starts --load busy
processes (pure Python loops) for its rows. --skip-active-loaded leaves out the row that can take minutes.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from minipeft import grade  # noqa: E402

SETTINGS = [("1 thread", "1", "PASSIVE"), ("2 threads, ACTIVE", "2", "ACTIVE"), ("2 threads, PASSIVE", "2", "PASSIVE")]


def busy() -> None:
    while True:
        pass


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("notebook", nargs="?", default=str(ROOT / "notebooks/solutions/12_adalora_dylora_solutions.ipynb"))
    p.add_argument("--load", type=int, default=3, help="busy processes for the loaded case (default 3)")
    p.add_argument("--skip-active-loaded", action="store_true", help="leave out 2 threads ACTIVE under load")
    args = p.parse_args()
    for case in ("idle", "loaded"):
        procs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load if case == "loaded" else 0)]
        for proc in procs:
            proc.start()
        for name, threads, policy in SETTINGS:
            if case == "loaded" and policy == "ACTIVE" and args.skip_active_loaded:
                continue
            grade.KERNEL_ENV = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "OMP_WAIT_POLICY": policy}
            load = os.getloadavg()[0]
            _, wall = grade.execute(Path(args.notebook), allow_errors=False)
            print(f"{case:7} {name:20} {wall:6.1f} s wall (load average {load:.1f})", flush=True)
        for proc in procs:
            proc.terminate()


if __name__ == "__main__":
    main()
