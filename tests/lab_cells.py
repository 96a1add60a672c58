"""Run a lab's checks in this process, without a kernel, so tests can plant a student's typical mistakes.

A lab notebook marks its cells with Jupyter cell tags (notebooks/README.md, "How a lab is built"):
"student" (a stub the student fills: filled in, in the solution notebook), "setup" (what a student cell
needs besides the first code cell), "check" (one `check(...)` call) and, in a solution notebook only,
"solution" (worked reasoning). `namespace` executes the first code cell and the student/setup cells, in
order, from the solution (or the shipped lab), optionally with text replaced (a planted mistake);
`run_checks` then executes each check cell and returns the status line it printed.

    ns = namespace("02_lora_learning_rate_of_B", plant=[("nn.init.kaiming_uniform_(", "nn.init.zeros_(")])
    statuses = run_checks("02_lora_learning_rate_of_B", ns)     # {"Build 1 (MyLoRA)": Item(...), ...}
"""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import nbformat

from minipeft.grade import STATUS_LINE, SHORT, Item

ROOT = Path(__file__).resolve().parents[1]
LABS = ROOT / "notebooks"


def lab_path(lab: str, solution: bool = False) -> Path:
    return LABS / "solutions" / f"{lab}_solutions.ipynb" if solution else LABS / f"{lab}.ipynb"


def tagged(nb, *tags: str) -> list:
    return [c for c in nb.cells if c.cell_type == "code" and set(c.metadata.get("tags", [])) & set(tags)]


def first_code_cell(nb):
    return next(c for c in nb.cells if c.cell_type == "code")


def namespace(lab: str, solution: bool = True, plant: list[tuple[str, str]] = ()) -> dict:
    """The names the first code cell and the student/setup cells define; each planted (old, new) must
    match exactly once in those cells' text."""
    nb = nbformat.read(lab_path(lab, solution), as_version=4)
    source = "\n\n".join([first_code_cell(nb).source] + [c.source for c in tagged(nb, "student", "setup")])
    for old, new in plant:
        assert source.count(old) == 1, f"{lab}: the planted text {old!r} occurs {source.count(old)} times, want 1"
        source = source.replace(old, new)
    ns = {"__name__": f"lab_{lab}"}
    exec(compile(source, f"<{lab} student cells>", "exec"), ns)
    return ns


def run_checks(lab: str, ns: dict) -> dict[str, Item]:
    """Execute every check cell of the shipped lab in `ns`; {label: Item} from the lines they print."""
    statuses = {}
    for cell in tagged(nbformat.read(lab_path(lab), as_version=4), "check"):
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(cell.source, f"<{lab} check cell>", "exec"), ns)
        lines = STATUS_LINE.findall(out.getvalue())
        assert len(lines) == 1, f"{lab}: a check cell printed {len(lines)} status lines:\n{out.getvalue()}"
        label, status, hint, summary = lines[0]
        statuses[label] = Item(label, SHORT[status], hint or summary)
    return statuses


def assert_caught(lab: str, plant: list[tuple[str, str]], hint: str) -> Item:
    """Plant the mistake in the solution's student cells: some check must say wrong, with a hint that
    matches the regex `hint`, and every other check must still pass or say wrong (never crash)."""
    statuses = run_checks(lab, namespace(lab, plant=plant))
    wrong = [it for it in statuses.values() if it.status == "wrong"]
    assert wrong, f"{lab}: the planted mistake {plant} was not caught: {statuses}"
    matching = [it for it in wrong if re.search(hint, it.detail)]
    assert matching, f"{lab}: caught, but no hint matches {hint!r}: {[(it.label, it.detail) for it in wrong]}"
    return matching[0]
