"""The prepared GPU check (issue 18): one command on the bare GPU machine this project is lent (docs/gpu.md).

    timeout 540 python3 scripts/gpu_check.py --device cuda --out runs/gpu-check   # `make gpu-check`
    python3 scripts/gpu_check.py --device cpu --quick --out /tmp/gc                # the CPU rehearsal, tiny preset

That machine has a system python3 with torch (CUDA), triton, transformers, peft, numpy, tiktoken and pytest;
it downloads nothing and minipeft is not installed there. So this script installs nothing: it runs with the
interpreter it is started with, puts this checkout first on sys.path (and on PYTHONPATH for its children),
and skips, with a one-line reason, any section whose needs are missing.

This process never imports torch. Each section is a child process of the same interpreter with its own
budget: past it, the child and its whole process group are killed, the section is recorded as "timed_out",
and the next section starts. After each section OUT/gpu_check.json is rewritten (atomically), so a run cut
short keeps what it measured; OUT/<section>.log holds each section's whole output.

  section     budget s (GPU / --quick)
  preflight    30 /  30   python, torch, CUDA, GPU and its memory, triton, C compiler + Python.h, transformers, peft
  tests       120 / 120   pytest -m gpu tests/test_gpu.py on llama-3.2-1b (tiny with --quick): bf16 autocast vs
                          fp32, one training step of every method, KV-cache generation, ragged generate; on CUDA
                          with a C compiler also tests/test_fast_paths.py (compiled FlexAttention == dense)
  throughput  150 / 240   compare.throughput (`compare --throughput`) per method of METHODS (24): 2 + 5 steps
                          of 8 x 512 packed tokens on llama-3.2-1b; tokens/s, peak memory; one failure is a row
  bench       120 /  60   bench/bench.py --device cuda, sections parity, train, memory (T = 512, 2048), medians
                          of 3: minipeft vs transformers + PEFT; skipped without transformers or peft
  total       420 s of budgets on the GPU: 60 s under the --deadline (480 s), which cuts any budget to the time
              left (450 s with --quick). Each budget includes its child's imports and model loading.
              The GPU budgets are set, not measured: no GPU has been lent yet. --budget SECTION=SECONDS
              overrides one (the tests give a section half a second to see it timed out).

Without a C compiler and Python.h (triton builds its CUDA launcher with them, so torch.compile cannot run)
FlexAttention is left out: throughput's packed rows take the dense document mask, and test_fast_paths is not run.
Exit status: 0 every section ok or skipped, 1 a section failed or timed out, 2 the preflight failed.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy: the GPU machine installs nothing
SECTIONS = ("preflight", "tests", "throughput", "bench")
DEADLINE_S = 480.0
SIZES = {  # full: llama-3.2-1b on one GPU; quick: the tiny preset (the CPU rehearsal)
    "full": dict(preset="llama-3.2-1b", max_len=512, batch=8, warmup=2, steps=5,
                 budgets=dict(preflight=30, tests=120, throughput=150, bench=120),
                 bench_args=["--sections", "parity,train,memory", "--memory-runs", "1", "--reps", "3",
                             "--warmup", "1"]),
    "quick": dict(preset="tiny", max_len=256, batch=2, warmup=1, steps=2,
                  budgets=dict(preflight=30, tests=120, throughput=240, bench=60),
                  bench_args=["--config", "tiny", "--sections", "parity,train", "--seq-len", "32", "--batch", "1",
                              "--reps", "1", "--warmup", "0"]),
}


def write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # atomic: a reader never sees half a file


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


# ------------------------------------------------------------------ the children (these import torch)

def preflight(args) -> int:
    """Print what this interpreter has, one line each; OUT/preflight.json. 1 when the check cannot go on."""
    import importlib.metadata
    import importlib.util
    import shutil
    import sysconfig

    def version(name: str) -> str | None:
        if importlib.util.find_spec(name) is None:
            return None
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "present"

    spec = importlib.util.find_spec("minipeft")
    info = dict(python=platform.python_version(), python_path=sys.executable,
                minipeft=str(Path(spec.origin).parent) if spec else None)
    print(f"preflight: python {info['python']} at {sys.executable}; minipeft from {info['minipeft']}", flush=True)
    try:
        import torch
    except Exception as e:  # noqa: BLE001  a missing or broken torch is this check's first finding
        info.update(torch=None, error=f"torch does not import: {one_line(e)}")
        print(f"preflight: {info['error']}", flush=True)
    else:
        info.update(torch=torch.__version__, cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
        print(f"preflight: torch {torch.__version__}; CUDA available: {info['cuda_available']} "
              f"(CUDA {torch.version.cuda})", flush=True)
        if info["cuda_available"]:
            p = torch.cuda.get_device_properties(0)
            info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), gpus=torch.cuda.device_count())
            print(f"preflight: GPU {p.name}, {info['gpu_memory_gib']} GiB; {info['gpus']} device(s)", flush=True)
        else:
            print("preflight: GPU none", flush=True)
        if args.device == "cuda" and not info["cuda_available"]:
            info["error"] = "--device cuda, but torch sees no CUDA device"
            print(f"preflight: {info['error']}", flush=True)
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")  # where triton looks for one
    headers = Path(sysconfig.get_paths()["include"], "Python.h").exists()
    info.update(triton=version("triton"), c_compiler=cc, python_h=headers)
    info["compile"] = bool(info["triton"] and cc and headers)
    print(f"preflight: triton {info['triton'] or 'missing'}; C compiler {cc or 'missing'}; Python.h "
          f"{'present' if headers else 'missing'} -> torch.compile on CUDA "
          f"{'possible' if info['compile'] else 'not possible'}", flush=True)
    info.update({name: version(name) for name in ("transformers", "peft", "pytest")})
    print("preflight: " + "; ".join(f"{n} {info[n] or 'missing'}" for n in ("transformers", "peft", "pytest")),
          flush=True)
    write_json(args.out / "preflight.json", info)
    return 1 if "error" in info else 0


def throughput_rows(args) -> int:
    """compare.throughput one method at a time (a failure is a row too); each row appended to
    OUT/throughput.jsonl as it comes, so a killed run keeps the rows it finished."""
    import torch

    import minipeft.llama as llama
    from minipeft.compare import available_methods, throughput
    if args.dense:  # no torch.compile: packed rows keep the dense document mask (no FlexAttention)
        llama.create_block_mask = None
    s, rows = sizes(args), args.out / "throughput.jsonl"
    methods = args.methods.split(",") if args.methods else available_methods()
    print(f"+ compare.throughput(preset={s['preset']!r}, max_len={s['max_len']}, batch {s['batch']}, "
          f"{s['warmup']} + {s['steps']} steps) for {len(methods)} methods", flush=True)
    rows.write_text(json.dumps(dict(planned=methods)) + "\n")
    failed = False
    for method in methods:
        t0 = time.time()
        try:
            row = throughput(s["preset"], [method], s["max_len"], s["batch"], s["steps"], s["warmup"],
                             device=args.device)[0]
        except Exception as e:  # noqa: BLE001  one method's failure is a figure too; the rest still run
            row, failed = dict(method=method, error=one_line(e)), True
            print(f"{method:>16}: FAILED {row['error']}", flush=True)
            if args.device == "cuda":
                torch.cuda.empty_cache()
        with rows.open("a") as f:
            f.write(json.dumps(dict(row, seconds=round(time.time() - t0, 1))) + "\n")
    return 1 if failed else 0


# ------------------------------------------------------------------ this process (no torch)

def sizes(args) -> dict:
    return SIZES["quick" if args.quick else "full"]


def child_env(**extra: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONUNBUFFERED="1", **extra)


def run(name: str, cmd: list[str], budget: float, out: Path, env: dict | None = None) -> tuple[dict, list[str]]:
    """Run one section's child in its own process group, its output echoed and kept in OUT/<name>.log;
    past `budget` seconds the whole group is killed and the section is "timed_out"."""
    print(f"== {name}: budget {budget:g}s\n+ {' '.join(cmd)}", flush=True)
    lines: list[str] = []
    t0 = time.time()
    with open(out / f"{name}.log", "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env or child_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True)

        def echo() -> None:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                log.write(line)
                print(line, end="", flush=True)

        reader = threading.Thread(target=echo, daemon=True)
        reader.start()
        try:
            rc = proc.wait(timeout=budget)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            rc, status = None, "timed_out"
        finally:  # the group: a child's own children (bench's memory runs, pytest workers) go too
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
        reader.join(10)
    return dict(status=status, returncode=rc, seconds=round(time.time() - t0, 1), budget_s=budget,
                tail=lines[-20:]), lines


def tests_section(args, pre: dict, budget: float) -> dict:
    if not pre.get("pytest"):
        return dict(status="skipped", reason="pytest not installed")
    files = ["tests/test_gpu.py"]
    if args.device == "cuda" and pre.get("compile"):
        files.append("tests/test_fast_paths.py")
    elif args.device == "cuda":
        print("tests: tests/test_fast_paths.py left out: no C compiler or Python.h (FlexAttention compiles)",
              flush=True)
    env = child_env(MINIPEFT_GPU_DEVICE=args.device, MINIPEFT_GPU_PRESET=sizes(args)["preset"])
    cmd = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider", "-m", "gpu", *files]
    result, lines = run("tests", cmd, budget, args.out, env)
    summaries = [ln.strip("= ") for ln in lines if re.search(r"\d+ (passed|failed|errors?|skipped)", ln)]
    return dict(result, files=files, summary=summaries[-1] if summaries else None,
                figures=[ln for ln in lines if ": loss " in ln or "relative error" in ln])


def throughput_section(args, pre: dict, budget: float) -> dict:
    dense = args.device == "cuda" and not pre.get("compile")
    if dense:
        print("throughput: FlexAttention left out (no C compiler or Python.h): packed rows use the dense mask",
              flush=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "throughput", "--device", args.device,
           "--out", str(args.out), *(["--quick"] if args.quick else []), *(["--dense"] if dense else []),
           *(["--methods", args.methods] if args.methods else [])]
    result, _ = run("throughput", cmd, budget, args.out)
    path = args.out / "throughput.jsonl"
    entries = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    planned = entries[0]["planned"] if entries and "planned" in entries[0] else []
    rows = [e for e in entries if "method" in e]
    done = {r["method"] for r in rows}
    return dict(result, attention="dense" if dense else "auto", rows=rows,
                not_run=[m for m in planned if m not in done])


def bench_section(args, pre: dict, budget: float) -> dict:
    if not (pre.get("transformers") and pre.get("peft")):
        return dict(status="skipped", reason="transformers or peft not installed: bench compares against them")
    cmd = [sys.executable, str(ROOT / "bench" / "bench.py"), "--device", args.device,
           "--json", str(args.out / "bench.json"), *sizes(args)["bench_args"]]
    result, _ = run("bench", cmd, budget, args.out)
    if (args.out / "bench.json").exists() and result["status"] == "ok":
        result["results"] = json.loads((args.out / "bench.json").read_text())
    return result


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="The prepared GPU check of issue 18 (see the module docstring).")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny preset and sizes (the CPU rehearsal)")
    p.add_argument("--out", type=Path, default=Path("runs/gpu-check"), help="folder for gpu_check.json")
    p.add_argument("--sections", default="tests,throughput,bench", help="after the preflight, which always runs")
    p.add_argument("--methods", help="comma-separated methods for the throughput section (default: all)")
    p.add_argument("--budget", action="append", default=[], metavar="SECTION=SECONDS",
                   help="override one section's budget (repeatable)")
    p.add_argument("--deadline", type=float, default=DEADLINE_S, help="seconds for the whole run (default 480)")
    p.add_argument("--child", choices=("preflight", "throughput"), help=argparse.SUPPRESS)
    p.add_argument("--dense", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.out = args.out.resolve()
    budgets = dict(sizes(args)["budgets"])
    for item in args.budget:
        name, _, seconds = item.partition("=")
        if name not in SECTIONS or not re.fullmatch(r"\d+(\.\d*)?", seconds) or float(seconds) <= 0:
            p.error(f"--budget {item!r}: expected SECTION=SECONDS, SECTION one of {', '.join(SECTIONS)}")
        budgets[name] = float(seconds)
    args.budgets, args.sections = budgets, [s for s in args.sections.split(",") if s]
    if unknown := [s for s in args.sections if s not in SECTIONS[1:]]:
        p.error(f"--sections: unknown {', '.join(unknown)}; expected some of {', '.join(SECTIONS[1:])}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return {"preflight": preflight, "throughput": throughput_rows}[args.child](args)
    report = dict(date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  command=" ".join([sys.executable, *sys.argv]), device=args.device, quick=args.quick,
                  deadline_s=args.deadline, budgets_s=args.budgets, sections={})
    path, t0, pre = args.out / "gpu_check.json", time.time(), {}
    for old in ("preflight.json", "throughput.jsonl", "bench.json"):  # an earlier run's figures are not this one's
        (args.out / old).unlink(missing_ok=True)
    steps = {"tests": tests_section, "throughput": throughput_section, "bench": bench_section}
    old_term = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: stop the child too
    try:
        for name in ["preflight", *args.sections]:
            left = args.deadline - (time.time() - t0)
            budget = min(args.budgets[name], left)
            if left <= 1:
                result = dict(status="skipped", reason=f"no time left before the deadline ({args.deadline:.0f}s)")
            elif name == "preflight":
                cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "preflight",
                       "--device", args.device, "--out", str(args.out)]
                result, _ = run("preflight", cmd, budget, args.out)
                if (args.out / "preflight.json").exists():
                    pre = json.loads((args.out / "preflight.json").read_text())
                    result.update(pre)
            elif report["sections"]["preflight"]["status"] != "ok":
                result = dict(status="skipped", reason="the preflight failed: "
                              + str(pre.get("error", report["sections"]["preflight"]["status"])))
            else:
                result = steps[name](args, pre, budget)
            report["sections"][name] = result
            write_json(path, report)
            print(f"== {name}: {result['status']}" + (f" ({result['reason']})" if "reason" in result else
                  f" after {result['seconds']}s") + f"; {path} updated", flush=True)
    except BaseException:  # SIGTERM (`timeout`), Ctrl-C: the running section is "interrupted"
        report["sections"].setdefault(name, dict(status="interrupted"))
        report.update(status="interrupted", total_seconds=round(time.time() - t0, 1))
        write_json(path, report)
        raise
    finally:
        signal.signal(signal.SIGTERM, old_term)
    bad = [f"{n} {r['status']}" for n, r in report["sections"].items() if r["status"] not in ("ok", "skipped")]
    report.update(status="failed" if bad else "ok", total_seconds=round(time.time() - t0, 1))
    write_json(path, report)
    print(f"gpu-check: {'FAILED (' + ', '.join(bad) + ')' if bad else 'ok'} in {report['total_seconds']}s; "
          f"figures in {path}", flush=True)
    return 2 if report["sections"]["preflight"]["status"] != "ok" else 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
