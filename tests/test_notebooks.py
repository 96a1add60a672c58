"""The labs: every notebook in notebooks/ and every solution notebook in notebooks/solutions/ runs top to
bottom in a fresh kernel without an error, in under MAX_KERNEL_CPU_S seconds of kernel CPU; every figure
it shows has a title and labelled axes; its checks behave (as shipped every build step says "not built
yet" and every exercise "not done yet"; the solution notebook passes every one of them, as the grader
`minipeft.grade` reads them); a lab and its solution differ only in the cells the student fills; and the
committed files carry no outputs, keep code at MAX_CODE_COLUMNS, and declare the kernel `make install`
registers.

    python -m pytest -m "" tests/test_notebooks.py    # = make notebooks (labs and solutions)
    python -m pytest tests/test_notebooks.py          # the labs only (solution runs are marked slow)
    python -m tests.test_notebooks --strip            # strip outputs (and set the kernel) before committing
    python -m tests.test_notebooks --run [NAME ...]   # execute some, one after the other; print each one's time

Running them early. Executing a notebook is mostly one busy single-threaded kernel (minipeft.grade's
KERNEL_ENV), so when pytest has collected the session, `pytest_collection_finish` below queues every
selected notebook for execution in the background, WORKERS at a time, each in a process of its own
(`--execute`), and the tests only wait for their notebook's result; `pytest_collection_modifyitems` puts
them at the end of the session, so the notebooks run while the rest of the suite does. The slowest of the
last run start first (kernel CPU seconds kept in pytest's cache), so no long notebook starts last. This
module registers itself as a pytest plugin (`pytest_plugins`) for those hooks and for
`pytest_sessionfinish`, which stops what still runs. A notebook whose test is not selected (-k, -m slow)
is never started.

The kernel: notebooks declare KERNEL ("minipeft"), the name `make install` registers with ipykernel;
they run under a kernelspec made on the spot whose interpreter is the current one
(`minipeft.grade.kernel_environment`), so they test the code of this checkout whatever kernels are
registered on the machine. A notebook's SEED (first code cell) fixes all its randomness.

The cells a lab marks with tags (notebooks/README.md): "student" (a stub: `raise NotImplementedError`,
or an answer left None), "check" (one `check(...)` call, printing one status line), "setup" (what a
student cell needs besides the first code cell); a solution notebook is its lab with the student cells
filled in, plus cells tagged "solution". tests/lab_cells.py runs those cells in-process, for the
mistake-planting tests of each lab (tests/test_lab_NN.py).
"""

from __future__ import annotations

import ast
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from minipeft import grade
from minipeft.grade import KERNEL, KERNELSPEC

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
SOLUTION_DIR = NOTEBOOK_DIR / "solutions"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
SOLUTIONS = sorted(SOLUTION_DIR.glob("*.ipynb"))
ALL = NOTEBOOKS + SOLUTIONS
IDS = [str(p.relative_to(NOTEBOOK_DIR).with_suffix("")) for p in ALL]
TIMEOUT_S = 300        # per cell: a guard against a hung kernel, generous because a loaded machine slows every cell
# per notebook: the labs' budget ("under a minute on 2 cores"), counted in the kernel's CPU seconds because
# the wall time on a shared machine measures the neighbours as much as the notebook
MAX_KERNEL_CPU_S = 60
WORKERS = 2            # notebooks executing at once in the background during a pytest session
MAX_CODE_COLUMNS = 88  # code cells stay readable beside the prose

# Run before the notebook: every plt.show() first checks that each axes of the figure has a title
# and both axis labels (a colorbar: a label), and counts the figures it checked.
FIGURE_CHECK = """
import matplotlib.pyplot as _plt
_FIGURES_CHECKED = 0
_show = _plt.show
def _checked_show(*args, **kwargs):
    global _FIGURES_CHECKED
    for num in _plt.get_fignums():
        for ax in _plt.figure(num).axes:
            if ax.get_label() == "<colorbar>":
                assert ax.get_xlabel() or ax.get_ylabel(), "a colorbar has no label"
                continue
            missing = [what for what, text in (("title", ax.get_title()), ("x label", ax.get_xlabel()),
                                               ("y label", ax.get_ylabel())) if not text]
            assert not missing, f"a figure's axes has no {', '.join(missing)}"
        _FIGURES_CHECKED += 1
    return _show(*args, **kwargs)
_plt.show = _checked_show
"""
FIGURE_COUNT = "import time as _time; print('FIGURES_CHECKED', _time.process_time(), _FIGURES_CHECKED)"

def execute(path: Path) -> dict:
    """Execute the notebook at `path` in a fresh kernel, in this process, stopping at the first error.

    Returns {"notebook": executed notebook (JSON text), "figures_checked", "seconds" (wall),
    "cpu_seconds" (the kernel's)}; raises CellExecutionError on any error."""
    import nbformat

    nb, seconds = grade.execute(path, timeout=TIMEOUT_S, allow_errors=False, before=FIGURE_CHECK, after=FIGURE_COUNT)
    # a print may reach us in several stream messages: join them before reading the line
    stdout = "".join(out.get("text", "") for out in nb.cells[-1].outputs if out.get("name") == "stdout")
    cpu_seconds, checked = re.search(r"FIGURES_CHECKED (\S+) (\d+)", stdout).groups()
    nb.cells = nb.cells[1:-1]
    return dict(notebook=nbformat.writes(nb), figures_checked=int(checked), seconds=seconds,
                cpu_seconds=float(cpu_seconds))


# ---------------------------------------------------------------------------- background execution

_pool: ThreadPoolExecutor | None = None
_runs: dict[Path, Future] = {}
_children: set[subprocess.Popen] = set()


def _execute_in_child(path: Path) -> dict:
    """`python tests/test_notebooks.py --execute PATH OUT` in a process of its own; its result."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        # a session of its own: a Ctrl-C at the terminal reaches pytest, whose stop() then ends the child
        # (and so its kernel: ipykernel exits within a second of its parent)
        child = subprocess.Popen([sys.executable, __file__, "--execute", str(path), str(out)], cwd=ROOT,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                 start_new_session=True)
        _children.add(child)
        try:
            log, _ = child.communicate()
        finally:
            _children.discard(child)
        if child.returncode != 0 or not out.exists():
            raise AssertionError(f"{path.relative_to(ROOT)} failed (exit status {child.returncode}):\n{log[-6000:]}")
        return json.loads(out.read_text())


def start(path: Path) -> Future:
    """Queue `path` for execution in the background (once); its future result."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="notebook")
    if path not in _runs:
        _runs[path] = _pool.submit(_execute_in_child, path)
    return _runs[path]


def stop() -> None:
    """Cancel what has not started; end the running notebook processes (their kernels follow them)."""
    for future in _runs.values():
        future.cancel()
    for child in list(_children):
        try:
            os.killpg(child.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    if _pool is not None:
        _pool.shutdown(wait=True)


pytest_plugins = [__name__]  # so that pytest calls the hooks below


CACHE_KEY = "minipeft/notebook_cpu_seconds"  # in pytest's cache (.pytest_cache/): each notebook's last kernel CPU


def _is_here(item) -> bool:
    return Path(str(item.path)).resolve() == Path(__file__).resolve()


def pytest_collection_modifyitems(session, config, items) -> None:
    """This module's tests go last: pytest then waits for the background notebooks only once the rest of
    the suite is done, instead of idling a core in the middle of it."""
    items[:] = [item for item in items if not _is_here(item)] + [item for item in items if _is_here(item)]


def pytest_collection_finish(session) -> None:
    """Start every notebook that a selected test of this module needs: the slowest of the last run first
    (so that no long one starts last), those never timed before them, otherwise in the tests' order."""
    if session.config.option.collectonly:
        return
    needed = [item.callspec.params["path"] for item in session.items
              if _is_here(item) and "path" in getattr(getattr(item, "callspec", None), "params", {})]
    cache = getattr(session.config, "cache", None)  # None with -p no:cacheprovider
    last = cache.get(CACHE_KEY, {}) if cache is not None else {}
    for path in sorted(dict.fromkeys(needed), key=lambda p: -last.get(p.relative_to(ROOT).as_posix(), math.inf)):
        start(path)


def pytest_sessionfinish(session) -> None:
    stop()
    cache = getattr(session.config, "cache", None)
    timed = {path.relative_to(ROOT).as_posix(): future.result()["cpu_seconds"] for path, future in _runs.items()
             if future.done() and not future.cancelled() and future.exception() is None}
    if cache is not None and timed:
        cache.set(CACHE_KEY, {**cache.get(CACHE_KEY, {}), **timed})


# ---------------------------------------------------------------------------- reading notebooks


def read(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


def count_images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def checks(nb) -> list[str]:
    """The labels of the notebook's check(...) calls: "Build N (name)" and "Exercise N", in order."""
    return grade.expected_checks(nb)


def exercises(nb) -> list[int]:
    return [int(label.split()[1]) for label in checks(nb) if label.startswith("Exercise")]


def builds(nb) -> list[int]:
    return [int(label.split()[1]) for label in checks(nb) if label.startswith("Build")]


def tags(cell) -> set[str]:
    return set(cell.metadata.get("tags", []))


def solution_of(path: Path) -> Path:
    return SOLUTION_DIR / f"{path.stem}_solutions.ipynb"


def lab_of(solution: Path) -> Path:
    return NOTEBOOK_DIR / f"{solution.stem.removesuffix('_solutions')}.ipynb"


def strip(path: Path) -> bool:
    """Remove outputs and execution counts in place and declare KERNEL; True if the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    if "language_info" in nb.metadata:  # the executing interpreter's version etc.: noise in a diff
        nb.metadata["language_info"] = {"name": nb.metadata["language_info"].get("name", "python")}
    nb.metadata["kernelspec"] = dict(KERNELSPEC)
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"))
    return after != before


# ---------------------------------------------------------------------------- the tests


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 7, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("nb_path", ALL, ids=IDS)
def test_notebook_is_stripped_and_declares_the_kernel(nb_path):
    nb = read(nb_path)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{nb_path.name}: cells {dirty} have outputs; run `python -m tests.test_notebooks --strip`"
    assert nb.metadata.get("kernelspec", {}).get("name") == KERNEL, (
        f"{nb_path.name} declares kernel {nb.metadata.get('kernelspec')}, not {KERNEL!r} (the one `make install` "
        "registers); run `python -m tests.test_notebooks --strip`")


def test_make_install_registers_the_kernel_the_notebooks_declare():
    makefile = (ROOT / "Makefile").read_text()
    names = re.findall(r"ipykernel install .*--name (\S+)", makefile)
    assert names == [KERNEL], f"Makefile registers kernels {names}; the notebooks declare {KERNEL!r}"
    # the labs' setting measured in docs/performance.md ("Threads on a shared CPU"), as the grader's KERNEL_ENV
    env = dict(re.findall(r"--env (\S+) (\S+)", makefile))
    assert env == {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}, env


def test_every_lab_has_builds_exercises_and_a_solution():
    """Each lab hands the student 1+ build steps (numbered from 1) and 2-4 exercises (numbered from 1),
    and has a solution notebook; each solution notebook belongs to a lab."""
    for path in NOTEBOOKS:
        nb = read(path)
        found_builds, found_exercises = builds(nb), exercises(nb)
        assert found_builds and found_builds == list(range(1, len(found_builds) + 1)), (
            f"{path.name}: build checks {found_builds} (want 1, 2, ...: a check(\"Build N (name)\", ...) cell under "
            "each stub)")
        assert 2 <= len(found_exercises) <= 4 and found_exercises == list(range(1, len(found_exercises) + 1)), (
            f"{path.name}: exercises {found_exercises} (want 2-4 numbered from 1, each checked by "
            "check(\"Exercise N\", ...))")
        assert solution_of(path).exists(), f"{path.name} has no {solution_of(path).relative_to(ROOT)}"
    for solution in SOLUTIONS:
        assert lab_of(solution).exists(), f"{solution.name}: no notebook {lab_of(solution).name}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lab_and_solution_differ_only_in_the_student_cells(path):
    """The solution notebook is the lab with its "student" cells filled in, plus "solution" cells: every
    other cell is the lab's, character for character, so the two cannot drift apart."""
    lab, solution = read(path), read(solution_of(path))
    kept = [c for c in solution.cells if "solution" not in tags(c)]
    assert len(kept) == len(lab.cells), (
        f"{solution_of(path).name} has {len(kept)} cells besides its 'solution' cells, {path.name} has {len(lab.cells)}")
    for i, (mine, theirs) in enumerate(zip(lab.cells, kept)):
        assert tags(mine) == tags(theirs) and mine.cell_type == theirs.cell_type, (
            f"{path.name} cell {i + 1}: tags {sorted(tags(mine))} / {sorted(tags(theirs))} in the solution")
        if "student" in tags(mine):
            assert mine.source != theirs.source, f"{path.name} cell {i + 1}: the solution does not fill it in"
        else:
            assert mine.source == theirs.source, f"{path.name} cell {i + 1} differs in the solution notebook"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_lab_cells_follow_the_convention(path):
    """Student cells are stubs (NotImplementedError, or an answer set to None); a check cell calls check()
    once; each exercise has its own answer name (no name is set by two student cells); code fits
    MAX_CODE_COLUMNS."""
    nb = read(path)
    assigned: dict[str, int] = {}
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        long = [line for line in cell.source.splitlines() if len(line) > MAX_CODE_COLUMNS]
        assert not long, f"{path.name} cell {i + 1}: {len(long)} lines over {MAX_CODE_COLUMNS} columns: {long[0]!r}"
        if "check" in tags(cell):
            assert len(grade.CHECK_CALL.findall(cell.source)) == 1, f"{path.name} cell {i + 1}: want one check(...)"
        if "student" in tags(cell):
            assert "raise NotImplementedError" in cell.source or re.search(r"= None\b", cell.source), (
                f"{path.name} cell {i + 1}: a student cell is a stub (raise NotImplementedError / answer = None)")
            for node in ast.parse(cell.source).body:
                names = ([node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else
                         [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
                for name in names:
                    assert assigned.setdefault(name, i) == i, (
                        f"{path.name}: cells {assigned[name] + 1} and {i + 1} both set {name!r}: give each "
                        "exercise its own answer name")
    assert all(any(label in c.source for c in nb.cells if "check" in tags(c)) for label in checks(nb)), (
        f"{path.name}: a check(...) call sits in a cell not tagged 'check'")


# Running a solution notebook is kept out of `make test` (marked slow: 14 kernels of about 4-7 CPU seconds each,
# about 30 s of the suite's wall time on 2 cores); `make notebooks` and `make test-slow` run them. The labs
# themselves run in `make test`, and every solution is still checked above for answering its lab's exercises.
RUNS = [pytest.param(p, marks=pytest.mark.slow) if p.parent == SOLUTION_DIR else p for p in ALL]


@pytest.mark.parametrize("path", RUNS, ids=IDS)
def test_notebook_runs(path):
    """Waits for the background run (started at collection) and checks what it printed and showed: as
    shipped every check says not built / not done yet; the solution passes every check of its lab."""
    result = start(path).result()  # raises with the child's log on any error
    nb, checked = read_result(result), result["figures_checked"]
    shown = count_images(nb)
    assert shown == checked, (f"{path.name}: {shown} figures shown but {checked} went through plt.show(); "
                              "end every plotting cell with plt.show() so its labels are checked")
    assert result["cpu_seconds"] < MAX_KERNEL_CPU_S, (
        f"{path.name} took {result['cpu_seconds']:.1f} s of kernel CPU, over the labs' {MAX_KERNEL_CPU_S} s")
    lab = read(lab_of(path) if path.parent == SOLUTION_DIR else path)
    items = grade.grade(nb, checks(lab))
    want = {"passed"} if path.parent == SOLUTION_DIR else {"not built", "not done"}
    wrong = [(it.label, it.status, it.detail) for it in items if it.status not in want]
    assert not wrong, f"{path.name}: want every check {want!r}, got {wrong}"
    text, all_passed = grade.report(items)
    assert all_passed == (path.parent == SOLUTION_DIR), text
    print(f"{path.name}: {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s kernel CPU, {shown} figures")


GRADED_LAB = "02_lora_learning_rate_of_B"   # the grader's command line runs on a copy of its solution


def test_grader_reports_a_planted_mistake(tmp_path):
    """`python -m minipeft.grade` on a copy of a solution whose LoRA starts A at zeros: that build step is
    wrong, with its hint, every other check passed, exit status 1."""
    import nbformat

    nb = read(SOLUTION_DIR / f"{GRADED_LAB}_solutions.ipynb")
    build = next(c for c in nb.cells if "student" in tags(c) and "class MyLoRA" in c.source)
    build.source = build.source.replace("nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))", "nn.init.zeros_(self.A)")
    nbformat.write(nb, tmp_path / f"{GRADED_LAB}.ipynb")
    done = subprocess.run([sys.executable, "-m", "minipeft.grade", str(tmp_path / f"{GRADED_LAB}.ipynb")],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert re.search(r"^Build 1 \(MyLoRA\) +wrong +A is all zeros", done.stdout, re.M), done.stdout
    total = len(checks(read(NOTEBOOK_DIR / f"{GRADED_LAB}.ipynb")))
    assert f"{total - 1} of {total} checks passed" in done.stdout, done.stdout


def read_result(result: dict):
    import nbformat

    return nbformat.reads(result["notebook"], as_version=4)


def main(argv: list[str]) -> None:
    if argv[:1] == ["--strip"]:
        for path in ALL:
            print(("stripped " if strip(path) else "clean    ") + str(path.relative_to(ROOT)))
    elif argv[:1] == ["--execute"] and len(argv) == 3:  # one background run (see start)
        result = execute(Path(argv[1]))
        Path(argv[2]).write_text(json.dumps(result))
    elif argv[:1] == ["--run"]:
        for path in ALL:
            if argv[1:] and not any(name in str(path.relative_to(NOTEBOOK_DIR)) for name in argv[1:]):
                continue
            result = execute(path)
            print(f"{path.relative_to(NOTEBOOK_DIR)}: {result['seconds']:.1f} s wall, {result['cpu_seconds']:.1f} s "
                  f"kernel CPU, {count_images(read_result(result))} figures ({result['figures_checked']} checked)",
                  flush=True)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
