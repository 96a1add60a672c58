"""The prepared GPU check (issue 18): one command, on a bare GPU machine, from a fresh clone.

    python scripts/gpu_check.py --device cuda --out runs/gpu-check     # `make gpu-check`: <= 8 minutes
    python scripts/gpu_check.py --device cpu --quick --out /tmp/gc     # the same code on the tiny preset, seconds

Sections, each printing its figures as it goes; after each one, every figure so far is (re)written to
OUT/gpu_check.json (atomically), so a run cut short still leaves what it measured:
  install     (CUDA only) when this Python's torch sees no GPU: `pip install torch` from PyPI (its
              default Linux wheel is the CUDA build), the package with its test extra, and the bench
              extra (transformers, peft) if it installs; then the script restarts itself once.
              `make install` and CI never do this: they keep the CPU wheel.
  tests       `pytest -m gpu tests/test_gpu.py tests/test_fast_paths.py` on the llama-3.2-1b preset
              (tiny with --quick): bf16 autocast vs fp32, one training step of every method, KV-cache
              generation == full forward, generate on a ragged batch, FlexAttention == dense (CUDA).
  throughput  `python -m minipeft.compare --throughput --preset llama-3.2-1b --max-len 512` for every
              method (the same function, called per method so one failure does not stop the rest):
              tokens/s and peak memory (max_memory_allocated).
  bench       `python bench/bench.py --device cuda` sections parity, train, memory (T = 512, 2048):
              minipeft vs transformers + PEFT, tokens/s, peak memory, MFU; skipped when the extra is
              missing (with --quick: the tiny preset on CPU, one repetition).
Time budget on one GPU (sizes chosen for it): tests ~2 min, throughput 17 methods x (2 + 5 steps of
8 x 512 tokens) ~3 min, bench ~2 min (parity, then medians of 3).
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # a fresh clone, not installed


def pip(*args: str) -> int:
    cmd = [sys.executable, "-m", "pip", "install", "-q", *args]
    print("+", " ".join(cmd), flush=True)
    return subprocess.call(cmd)


def install_cuda_torch() -> None:
    """Only when run with --device cuda on a machine whose current torch cannot see the GPU."""
    if os.environ.get("MINIPEFT_GPU_CHECK_INSTALLED"):
        return
    try:
        import torch
        if torch.cuda.is_available():
            return
        print(f"torch {torch.__version__} sees no GPU: installing the CUDA build from PyPI", flush=True)
    except ImportError:  # a bare venv (make gpu-check on a fresh clone)
        print("no torch here: installing the CUDA build from PyPI", flush=True)
    pip("--upgrade", "--force-reinstall", "--no-cache-dir", "torch")
    pip("-e", f"{ROOT}[dev]")
    if pip("-e", f"{ROOT}[bench]"):
        print("the bench extra (transformers, peft) did not install: the bench section will be skipped")
    os.environ["MINIPEFT_GPU_CHECK_INSTALLED"] = "1"  # restart once, with the new torch
    os.execv(sys.executable, [sys.executable, *sys.argv])


class Report:
    def __init__(self, out: Path, args):
        import torch
        self.path = out / "gpu_check.json"
        out.mkdir(parents=True, exist_ok=True)
        gpu = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
        self.data = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                         command=" ".join([Path(sys.executable).name, *sys.argv]), device=args.device, gpu=gpu,
                         torch=torch.__version__, cuda=torch.version.cuda, quick=args.quick, sections={})
        print(f"gpu-check: {gpu}, torch {torch.__version__} (CUDA {torch.version.cuda})", flush=True)

    def add(self, section: str, value) -> None:
        self.data["sections"][section] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str))
        os.replace(tmp, self.path)  # atomic: a reader never sees half a file


def run_tests(args, sizes: dict) -> dict:
    env = dict(os.environ, MINIPEFT_GPU_DEVICE=args.device, MINIPEFT_GPU_PRESET=sizes["preset"])
    files = ["tests/test_gpu.py"] + (["tests/test_fast_paths.py"] if args.device == "cuda" else [])
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu", *files]
    print("+", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=sizes["tests_timeout"])
    print(proc.stdout[-4000:] + proc.stderr[-2000:], flush=True)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    return dict(returncode=proc.returncode, summary=summary, seconds=round(time.time() - t0, 1),
                figures=[line for line in proc.stdout.splitlines() if ": loss " in line or "relative error" in line])


def run_throughput(args, sizes: dict) -> list[dict]:
    from minipeft.compare import available_methods, throughput
    rows = []
    print(f"+ python -m minipeft.compare --throughput --preset {sizes['preset']} --max-len {sizes['max_len']} "
          f"(batch {sizes['batch']}, {sizes['warmup']} + {sizes['steps']} steps per method)", flush=True)
    for method in args.methods.split(",") if args.methods else available_methods():
        try:
            rows += throughput(sizes["preset"], [method], sizes["max_len"], sizes["batch"], sizes["steps"],
                               sizes["warmup"], device=args.device)
        except Exception as e:  # noqa: BLE001  one method's failure is a figure too; the rest still run
            print(f"{method:>16}: FAILED {type(e).__name__}: {e}", flush=True)
            rows.append(dict(method=method, error=f"{type(e).__name__}: {e}"))
            if args.device == "cuda":
                import torch
                torch.cuda.empty_cache()
    return rows


def run_bench(args, out: Path, sizes: dict) -> dict:
    if not (importlib.util.find_spec("transformers") and importlib.util.find_spec("peft")):
        print("bench: skipped (transformers / peft not installed: pip install -e '.[bench]')", flush=True)
        return dict(skipped="transformers/peft not installed")
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--device", args.device,
           "--json", str(out / "bench.json"), *sizes["bench_args"]]
    print("+", " ".join(cmd), flush=True)
    try:
        proc = subprocess.run(cmd, cwd=ROOT, timeout=sizes["bench_timeout"])
    except subprocess.TimeoutExpired:
        return dict(error=f"timeout after {sizes['bench_timeout']}s")
    result = dict(returncode=proc.returncode)
    if (out / "bench.json").exists():
        result["results"] = json.loads((out / "bench.json").read_text())
    return result


SIZES = {  # full: llama-3.2-1b on one GPU within 8 minutes; quick: tiny on CPU within seconds
    "full": dict(preset="llama-3.2-1b", max_len=512, batch=8, warmup=2, steps=5, tests_timeout=240,
                 bench_timeout=210, bench_args=["--sections", "parity,train,memory", "--memory-runs", "1",
                                                "--reps", "3", "--warmup", "1"]),
    "quick": dict(preset="tiny", max_len=256, batch=2, warmup=1, steps=2, tests_timeout=120, bench_timeout=120,
                  bench_args=["--config", "tiny", "--sections", "train", "--seq-len", "32", "--batch", "1",
                              "--reps", "1", "--warmup", "0"]),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="The prepared GPU check of issue 18 (see the module docstring).")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny preset and sizes (the CPU path that tests the script)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="folder for gpu_check.json")
    p.add_argument("--sections", default="tests,throughput,bench")
    p.add_argument("--methods", help="comma-separated methods for the throughput section (default: all)")
    p.add_argument("--no-install", dest="install", action="store_false", help="never pip install anything")
    args = p.parse_args(argv)
    if args.device == "cuda" and args.install:
        install_cuda_torch()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda, but torch sees no CUDA device (even after installing)", file=sys.stderr)
        return 2
    sizes, report, t0 = SIZES["quick" if args.quick else "full"], Report(args.out, args), time.time()
    sections = args.sections.split(",")
    failed = False
    if "tests" in sections:
        tests = run_tests(args, sizes)
        report.add("tests", tests)
        failed |= tests["returncode"] != 0
    if "throughput" in sections:
        rows = run_throughput(args, sizes)
        report.add("throughput", rows)
        failed |= any("error" in r for r in rows)
    if "bench" in sections:
        report.add("bench", run_bench(args, args.out, sizes))
    report.add("total_seconds", round(time.time() - t0, 1))
    print(f"gpu-check: {'FAILED' if failed else 'ok'} in {time.time() - t0:.0f}s; figures in {report.path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
