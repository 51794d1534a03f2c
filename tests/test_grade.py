"""`labkit grade`: per-exercise scores in Gradescope's format, hidden tests restored from the solution,
and a student's edits to check cells ignored. Uses a small synthetic lesson (a few seconds a run)."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import nbformat
import pytest

from labkit.teach.grade import exercises, grade, handing_back
from labkit.teach.student import BEGIN_HIDDEN, _clean, dumps, make_student

CELLS = [
    ("markdown", "# A tiny lesson"),
    ("code", "FAST = False\nSEED = 0", ["parameters"]),
    ("code", "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION"),
    ("code", "from labkit.teach import check\ncheck('double', double(3) == 6)\n"
             "### BEGIN HIDDEN TESTS\ncheck('double (hidden)', double(-4) == -8)\n### END HIDDEN TESTS"),
    ("code", "def square(x):\n    ### BEGIN SOLUTION\n    return x * x\n    ### END SOLUTION"),
    ("code", "check('square', square(3) == 9)"),
    ("code", "print('FAST is', FAST)"),
]


def _lesson(tmp_path):
    cells = []
    for kind, src, *tags in CELLS:
        c = nbformat.v4.new_markdown_cell(src) if kind == "markdown" else nbformat.v4.new_code_cell(src)
        if tags:
            c.metadata["tags"] = tags[0]
        cells.append(c)
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    (tmp_path / "solutions").mkdir()
    (tmp_path / "notebooks").mkdir()
    sol = tmp_path / "solutions" / "lesson.ipynb"
    sol.write_text(dumps(_clean(nb, "lesson")))
    student = make_student(nbformat.read(sol, as_version=4), "lesson")
    return sol, student


def _write(tmp_path, nb, name="lesson.ipynb"):
    path = tmp_path / "notebooks" / name
    path.write_text(dumps(nb))
    return path


def test_exercises_and_their_tests_are_found(tmp_path):
    sol, _ = _lesson(tmp_path)
    found = exercises(nbformat.read(sol, as_version=4))
    assert [(e.name, e.cell, e.tests, e.hidden) for e in found] == [("1. double", 2, [3], True),
                                                                     ("2. square", 4, [5], False)]


def test_grades_solution_blank_and_partly_wrong_copies(tmp_path):
    sol, student = _lesson(tmp_path)
    assert grade(sol, sol, cwd=tmp_path)["score"] == 2.0  # the solution passes everything

    blank = grade(_write(tmp_path, student), cwd=tmp_path)  # the generated copy: nothing done yet
    assert blank["score"] == 0.0 and blank["max_score"] == 2.0
    assert all("NotImplementedError" in t["output"] for t in blank["tests"])

    # Exercise 1 passes the visible check but not the hidden one; exercise 2 is right. The student
    # also deleted the visible check of exercise 2 and the hidden block never reached them: the grader
    # restores both from the solution.
    student.cells[2].source = "def double(x):\n    return 6 if x == 3 else 0"
    student.cells[4].source = "def square(x):\n    return x ** 2"
    student.cells[5].source = "pass  # removed the check"
    res = grade(_write(tmp_path, student, "attempt.ipynb"), sol, cwd=tmp_path)
    assert [t["score"] for t in res["tests"]] == [0.0, 1.0]
    assert "double (hidden)" in res["tests"][0]["output"] and "BEGIN HIDDEN" not in json.dumps(res)
    assert res["score"] == 1.0 and {t["visibility"] for t in res["tests"]} == {"visible"}


def test_bad_input_is_named(tmp_path):
    sol, student = _lesson(tmp_path)
    with pytest.raises(FileNotFoundError, match="solution notebook"):
        grade(_write(tmp_path, student, "orphan.ipynb"), cwd=tmp_path)
    del student.cells[3]
    with pytest.raises(ValueError, match="no cell matching"):
        grade(_write(tmp_path, student), sol, cwd=tmp_path)


# ---------------------------------------------------------------- the real lessons
ROOT = Path(__file__).resolve().parents[1]
LESSONS = sorted(p.stem for p in (ROOT / "solutions").glob("*.ipynb"))


def _referenced(name: str) -> set[str]:
    """The exercises of lesson `name` that name their labkit counterpart (cell metadata "reference")."""
    sol = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
    return {ex.name for ex in exercises(sol) if sol.cells[ex.cell].metadata.get("reference")}


def assert_grades(name: str, tmp_path) -> None:
    """The solution scores full marks, the student copy zero, and a copy whose exercises hand back
    labkit's own functions loses every exercise that names one (its hidden tests catch it)."""
    sol_path = ROOT / "solutions" / f"{name}.ipynb"
    full = grade(sol_path, sol_path, cwd=ROOT)
    assert full["score"] == full["max_score"], [t for t in full["tests"] if t["score"] < t["max_score"]]
    blank = grade(ROOT / "notebooks" / f"{name}.ipynb", sol_path, cwd=ROOT)
    assert blank["score"] == 0, [t["name"] for t in blank["tests"] if t["score"]]
    referenced = _referenced(name)
    if referenced:
        cheat = tmp_path / "notebooks" / f"{name}.ipynb"
        cheat.parent.mkdir(parents=True)
        cheat.write_text(dumps(handing_back(nbformat.read(sol_path, as_version=4))))
        res = grade(cheat, sol_path, cwd=ROOT)
        caught = {t["name"] for t in res["tests"] if t["score"] == 0}
        assert caught == referenced, f"hidden tests missed {referenced - caught}; also failed: {caught - referenced}"
        assert all("called labkit's" in t["output"] for t in res["tests"] if t["name"] in caught)


@pytest.mark.notebook
def test_lesson_00_grades_full_zero_and_catches_handed_back_references(tmp_path):
    assert _referenced("00_tour"), "lesson 00's Wilson exercise should name labkit.eval:wilson_interval"
    assert_grades("00_tour", tmp_path)


@pytest.mark.grading
@pytest.mark.parametrize("name", [n for n in LESSONS if n != "00_tour"])
def test_every_lesson_grades_full_zero_and_catches_handed_back_references(name, tmp_path):
    """Three FAST runs per lesson: `make grade-check` runs them (not `make test`: ~30 min on 2 cores)."""
    assert_grades(name, tmp_path)


@pytest.mark.parametrize("name", LESSONS)
def test_referenced_exercises_have_hidden_tests_that_forbid_the_reference(name):
    sol = nbformat.read(ROOT / "solutions" / f"{name}.ipynb", as_version=4)
    for ex in exercises(sol):
        ref = sol.cells[ex.cell].metadata.get("reference")
        if not ref:
            continue
        module, qualname = ref.split(":")
        assert hasattr(importlib.import_module(module), qualname.split(".")[0]), f"{name} {ex.name}: no {ref}"
        hidden = [sol.cells[i].source for i in ex.tests if BEGIN_HIDDEN in sol.cells[i].source]
        assert any("without(" in h for h in hidden), f"{name} {ex.name}: no hidden test runs it inside without(...)"
