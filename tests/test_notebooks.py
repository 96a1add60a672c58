"""The companion notebooks: each runs top to bottom without an error or a failed assert, every figure it
shows has a title and labelled axes, and the committed files carry no outputs (diff-friendly).

    python -m pytest tests/test_notebooks.py          # execute every notebook (about 10 s each on 2 cores)
    python -m tests.test_notebooks --strip            # strip outputs before committing
    python -m tests.test_notebooks --run [NAME ...]   # execute and print each notebook's time

Notebooks run in a fresh kernel of the current interpreter (ipykernel's "python3" spec, which
jupyter_client starts with sys.executable), in notebooks/, with the repository on PYTHONPATH and
one thread (see KERNEL_ENV). A notebook's SEED (first code cell) fixes all its randomness.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))
TIMEOUT_S = 120  # per cell; a notebook is meant to take well under 20 s in all

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

# The kernel inherits these: the repository on the path, and one thread, because the notebooks' tensors
# are tiny and extra threads only add overhead (several times slower on a busy 2-core machine).
KERNEL_ENV = {
    "PYTHONPATH": lambda old: str(ROOT) + (os.pathsep + old if old else ""),
    "OMP_NUM_THREADS": lambda old: "1",
    "MKL_NUM_THREADS": lambda old: "1",
}


def execute(path: Path):
    """Execute the notebook at `path` in a fresh kernel.

    Returns (executed notebook, figures checked, wall seconds, kernel CPU seconds)."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(path, as_version=4)
    n_cells = len(nb.cells)
    nb.cells = [nbformat.v4.new_code_cell(FIGURE_CHECK)] + nb.cells + [nbformat.v4.new_code_cell(FIGURE_COUNT)]
    saved = {k: os.environ.get(k) for k in KERNEL_ENV}
    os.environ.update({k: v(saved[k]) for k, v in KERNEL_ENV.items()})
    try:
        start = time.perf_counter()
        NotebookClient(nb, kernel_name="python3", timeout=TIMEOUT_S,
                       resources={"metadata": {"path": str(NOTEBOOK_DIR)}}).execute()
        seconds = time.perf_counter() - start
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    _, cpu_seconds, checked = nb.cells[-1].outputs[0]["text"].split()
    nb.cells = nb.cells[1:1 + n_cells]
    return nb, int(checked), seconds, float(cpu_seconds)


def count_images(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def strip(path: Path) -> bool:
    """Remove outputs and execution counts in place; True if the file changed."""
    import nbformat

    nb = nbformat.read(path, as_version=4)
    before = nbformat.writes(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
        cell.metadata.pop("execution", None)
    if "language_info" in nb.metadata:  # the executing interpreter's version etc.: noise in a diff
        nb.metadata["language_info"] = {"name": nb.metadata["language_info"].get("name", "python")}
    nb.metadata.pop("widgets", None)
    after = nbformat.writes(nb)
    if after != before:
        path.write_text(after + ("" if after.endswith("\n") else "\n"))
    return after != before


def test_there_are_notebooks():
    assert len(NOTEBOOKS) >= 6, [p.name for p in NOTEBOOKS]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_has_no_outputs(path):
    import nbformat

    nb = nbformat.read(path, as_version=4)
    dirty = [i for i, c in enumerate(nb.cells) if c.cell_type == "code" and (c.outputs or c.execution_count)]
    assert not dirty, f"{path.name}: cells {dirty} have outputs; run `python -m tests.test_notebooks --strip`"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs(path):
    nb, checked, seconds, cpu = execute(path)  # raises CellExecutionError on any error or failed assert
    shown = count_images(nb)
    assert shown == checked, (f"{path.name}: {shown} figures shown but {checked} went through plt.show(); "
                              "end every plotting cell with plt.show() so its labels are checked")
    print(f"{path.name}: {seconds:.1f} s wall, {cpu:.1f} s kernel CPU, {shown} figures")


def main(argv: list[str]) -> None:
    if argv[:1] == ["--strip"]:
        for path in NOTEBOOKS:
            print(("stripped " if strip(path) else "clean    ") + str(path.relative_to(ROOT)))
    elif argv[:1] == ["--run"]:
        for path in NOTEBOOKS:
            if argv[1:] and not any(name in path.name for name in argv[1:]):
                continue
            nb, checked, seconds, cpu = execute(path)
            print(f"{path.name}: {seconds:.1f} s wall, {cpu:.1f} s kernel CPU, {count_images(nb)} figures "
                  f"({checked} checked)", flush=True)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
