"""Seconds per toy training step under each thread setting, on idle cores and under a CPU load this script
makes itself: what chose minipeft's thread setting (docs/performance.md, "Threads on a shared CPU").

    .venv/bin/python bench/bench_threads.py                  # 1 / 2 threads x OpenMP waiting ACTIVE / PASSIVE
    .venv/bin/python bench/bench_threads.py --load 3 --steps 10

Each setting runs in a fresh process (OMP_WAIT_POLICY is read when torch loads OpenMP): the shipped toy base
with LoRA (the toy recipe's shape: batch 16 of the toy task, max_len 256), forward + backward + AdamW, the
median of --steps steps after 2 warm-up steps. "loaded" starts --load busy processes (pure Python loops,
one core each) for the duration of the measurement, the way other jobs share a course's lab server.
The machine's own load average is printed too: other jobs on it make "idle" less idle.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [("1 thread", 1, "ACTIVE"), ("2 threads, OpenMP waiting ACTIVE", 2, "ACTIVE"),
            ("2 threads, OpenMP waiting PASSIVE", 2, "PASSIVE")]


def child(threads: int, steps: int) -> None:
    """Run in a fresh process: time `steps` toy LoRA steps; print one JSON line."""
    import torch
    torch.set_num_threads(threads)
    sys.path.insert(0, str(ROOT))
    from minipeft.adapters import apply_method
    from minipeft.base import load_base
    from minipeft.data import collate, encode_example, synthetic_gsm8k
    from minipeft.peft import param_groups

    model, tok, _ = load_base()
    apply_method(model, "lora")
    batch = collate([encode_example(tok, ex, "plain", 256) for ex in synthetic_gsm8k(16, 0, "train")], 0)
    opt = torch.optim.AdamW(param_groups(model, 1e-2))
    model.train()
    times = []
    for _ in range(steps + 2):
        t0 = time.perf_counter()
        _, loss = model(batch[0], batch[1], return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    print(json.dumps(dict(median_s=statistics.median(times[2:]), min_s=min(times[2:]), max_s=max(times[2:]))))


def busy() -> None:
    while True:
        pass


def measure(threads: int, policy: str, steps: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY=policy, OMP_NUM_THREADS=str(threads))
    out = subprocess.run([sys.executable, __file__, "--child", str(threads), str(steps)], env=env, cwd=ROOT,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=8, help="timed steps per setting (default 8)")
    p.add_argument("--load", type=int, default=3, help="busy processes for the loaded case (default 3)")
    p.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(*args.child)
    print(f"{os.cpu_count()} CPUs; load average before: {os.getloadavg()[0]:.1f}", flush=True)
    for case in ("idle", "loaded"):
        procs = [multiprocessing.Process(target=busy, daemon=True) for _ in range(args.load if case == "loaded" else 0)]
        for proc in procs:
            proc.start()
        try:
            for name, threads, policy in SETTINGS:
                r = measure(threads, policy, args.steps)
                print(f"{case:6s}  {name:34s}  {r['median_s'] * 1000:7.0f} ms/step  (min {r['min_s'] * 1000:.0f}, "
                      f"max {r['max_s'] * 1000:.0f}; load average {os.getloadavg()[0]:.1f})", flush=True)
        finally:
            for proc in procs:
                proc.terminate()


if __name__ == "__main__":
    main()
