"""Grade a lab notebook: run a student's copy top to bottom in a fresh kernel and report every check.

    .venv/bin/python -m minipeft.grade notebooks/02_lora_learning_rate_of_B.ipynb     # or: make grade NB=...
    .venv/bin/python -m minipeft.grade alice/02_lora_learning_rate_of_B.ipynb --timeout 600

Each check cell of a lab prints one status line (`minipeft.lab.check`): "Build N (name): passed / not built
yet / wrong. Hint: ..." and "Exercise N: correct / not done yet / wrong. Hint: ...". The grader runs the
notebook (a failing cell does not stop it: the cells after it still run), reads those lines, and prints
per build step and exercise: passed, not built, wrong (with the hint) or did not run (with the error of
the cell that failed before it), then the total. The checks it expects are those the notebook's own cells
call, plus those of the shipped lab of the same name in notebooks/ (so a deleted check cell counts as not
run). Exit status 0 only when every check passed.

The kernel runs the interpreter this command runs under (not whatever kernel named `minipeft` is
registered), with the repository on PYTHONPATH and one torch thread (see KERNEL_ENV).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "notebooks"
KERNEL = "minipeft"
KERNELSPEC = {"display_name": "minipeft", "language": "python", "name": KERNEL}
# A lab's tensors are tiny: a second thread gains nothing, and on a shared machine it can make a lab many times
# slower (lab 12: 297 s with two spinning threads under load, 18 s with one: bench/bench_lab_threads.py).
KERNEL_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

CHECK_CALL = re.compile(r"""check\(\s*["']((?:Build|Exercise) \d+(?: \([^)"']*\))?)["']""")
STATUS_LINE = re.compile(r"^((?:Build|Exercise) \d+(?: \([^)]*\))?): (passed|correct|not built yet|not done yet|wrong)"
                         r"(?:\. Hint: (.*)| \((.*)\))?$", re.M)
PASSED = ("passed", "correct")
SHORT = {"passed": "passed", "correct": "passed", "not built yet": "not built", "not done yet": "not done",
         "wrong": "wrong"}


@dataclass
class Item:
    label: str        # "Build 1 (MyLoRA)" or "Exercise 2"
    status: str       # passed | not built (a build step) | not done (an exercise) | wrong | did not run
    detail: str = ""  # the hint, the passed check's summary, or the error that stopped it


def kernel_environment() -> dict[str, str]:
    """os.environ plus KERNEL_ENV, the repository on PYTHONPATH, and a JUPYTER_PATH whose kernel KERNEL
    runs this interpreter (jupyter_client starts a kernel.json argv[0] of "python" with sys.executable)."""
    spec_dir = Path(tempfile.gettempdir()) / f"minipeft-kernelspec-{os.getuid()}" / "kernels" / KERNEL
    spec_dir.mkdir(parents=True, exist_ok=True)
    spec = dict(KERNELSPEC, argv=["python", "-m", "ipykernel_launcher", "-f", "{connection_file}"])
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    env = dict(os.environ, **KERNEL_ENV)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(spec_dir.parents[1]), env.get("JUPYTER_PATH")) if p)
    return env


def execute(path: Path, timeout: int = 300, allow_errors: bool = True, before: str = "", after: str = ""):
    """Run the notebook at `path` in a fresh kernel (cwd: its folder); returns (executed notebook, wall
    seconds). `before`/`after`: code run in an extra first/last cell (both kept in the result). With
    allow_errors a failing cell records its error and the next cells still run, and a cell that times out
    or kills the kernel ends the run with the reason in the notebook's metadata["stopped"]; without it the
    first error raises (nbclient's CellExecutionError)."""
    try:
        import nbformat
        from nbclient import NotebookClient
        from nbclient.exceptions import CellTimeoutError, DeadKernelError
    except ImportError:
        raise OSError("grading runs notebooks with nbformat and nbclient: .venv/bin/pip install -e '.[dev]'") from None
    nb = nbformat.read(path, as_version=4)
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.cells = [nbformat.v4.new_code_cell(before)] + nb.cells + [nbformat.v4.new_code_cell(after)]
    os.environ.update(kernel_environment())
    start = time.perf_counter()
    client = NotebookClient(nb, timeout=timeout, allow_errors=allow_errors,
                            resources={"metadata": {"path": str(path.resolve().parent)}})
    try:  # the kernel's own stderr (e.g. ipykernel's start-up warnings) is not the notebook's output
        client.execute(stderr=subprocess.DEVNULL)
    except (CellTimeoutError, DeadKernelError) as e:
        if not allow_errors:
            raise
        nb.metadata["stopped"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    return nb, time.perf_counter() - start


def expected_checks(*notebooks) -> list[str]:
    """The labels of the check(...) calls in the notebooks' code cells, in order, without repeats."""
    labels = [m for nb in notebooks for cell in nb.cells if cell.cell_type == "code"
              for m in CHECK_CALL.findall(cell.source)]
    return list(dict.fromkeys(labels))


def _cell_error(cell) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"
    return None


def grade(executed, expected: list[str]) -> list[Item]:
    """One Item per expected label, from the status lines the executed notebook printed (the last one
    printed for a label counts); a label never printed did not run, with the first error before it."""
    found: dict[str, Item] = {}
    first_error: str | None = None
    errors_before: dict[str, str | None] = {}
    for i, cell in enumerate(executed.cells):
        if cell.cell_type != "code":
            continue
        text = "".join(out.get("text", "") for out in cell.outputs if out.get("name") == "stdout")
        for label, status, hint, summary in STATUS_LINE.findall(text):
            found[label] = Item(label, SHORT[status], hint if status == "wrong" else "")
        for label in CHECK_CALL.findall(cell.source):
            errors_before.setdefault(label, first_error)
        error = _cell_error(cell)
        if error and first_error is None:
            first_error = f"cell {i + 1} raised {error}"
        if error:
            for label in CHECK_CALL.findall(cell.source):
                errors_before[label] = f"its cell raised {error}"
    missing = executed.metadata.get("stopped") or "its check cell is missing"
    return [found.get(label) or Item(label, "did not run", errors_before.get(label) or missing)
            for label in expected]


def report(items: list[Item]) -> tuple[str, bool]:
    """The grader's printout and whether everything passed."""
    width = max((len(it.label) for it in items), default=0)
    lines = [f"{it.label:<{width}}  {it.status:<11}  {it.detail}".rstrip() for it in items]
    passed = sum(it.status == "passed" for it in items)
    lines.append(f"{passed} of {len(items)} checks passed")
    return "\n".join(lines), bool(items) and passed == len(items)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m minipeft.grade", description=__doc__.split("\n")[0])
    p.add_argument("notebook", help="a lab notebook (a student's copy of notebooks/NN_name.ipynb)")
    p.add_argument("--timeout", type=int, default=300, help="seconds per cell before the kernel is stopped "
                                                            "(default 300)")
    args = p.parse_args(argv)
    path = Path(args.notebook).expanduser()
    try:
        import nbformat

        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such notebook")
        try:
            own = nbformat.read(path, as_version=4)
        except Exception as e:  # nbformat raises several kinds for a file that is not a notebook
            raise ValueError(f"{path}: not a Jupyter notebook ({type(e).__name__}: {e})") from None
        shipped = LABS / path.name
        expected = expected_checks(*([own] + ([nbformat.read(shipped, as_version=4)] if shipped.is_file() else [])))
        if not expected:
            raise ValueError(f"{path}: no check(...) cells found: is this a minipeft lab?")
        print(f"grading {path} ({len(expected)} checks) ...", flush=True)
        executed, seconds = execute(path, timeout=args.timeout)
    except ImportError:
        print("error: grading needs nbformat and nbclient: .venv/bin/pip install -e '.[dev]'", file=sys.stderr)
        return 1
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    text, all_passed = report(grade(executed, expected))
    print(text)
    print(f"({seconds:.0f} s)")
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
