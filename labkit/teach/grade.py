"""Grade a student notebook: run it and score each exercise, in Gradescope's results.json format.

An exercise is a solution-notebook code cell holding a ``### BEGIN SOLUTION`` block; its tests are the
code cells after it (up to the next exercise) that call a check (``check``, ``check_close``,
``check_shape``) or hold a ``### BEGIN HIDDEN TESTS`` block. Before running, every test cell of the
student copy is restored from the solution notebook, hidden tests included: students never see the
hidden checks (the generator strips them), and editing a check cell does not change the grade. The
notebook then runs top to bottom with errors allowed, so one wrong exercise costs its own points and
those of exercises that use its result, not the rest. An exercise scores its points (cell metadata
``"points"`` on the exercise cell, default 1) when its cell and all its test cells ran without error.

    labkit grade notebooks/01_behavior_cloning.ipynb --out results.json   # FAST=True by default
"""

from __future__ import annotations

import ast
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import nbformat
from nbformat import NotebookNode

from labkit.teach.student import BEGIN_HIDDEN, BEGIN_SOLUTION, END_SOLUTION, cell_id

_CHECK_CALL = re.compile(r"\bcheck(_close|_shape)?\s*\(")
_DEF = re.compile(r"^\s*def\s+(\w+)\s*\(", re.M)


@dataclass
class Exercise:
    """One graded exercise: the solution cell's index, its test cells, and its points."""

    name: str
    cell: int
    tests: list[int] = field(default_factory=list)
    points: float = 1.0
    hidden: bool = False  # some of its tests are hidden from students


def _is_test(source: str) -> bool:
    return bool(_CHECK_CALL.search(source)) or BEGIN_HIDDEN in source


def exercises(solution: NotebookNode) -> list[Exercise]:
    """The exercises of a solution notebook, in order, with the test cells that grade each."""
    out: list[Exercise] = []
    for i, cell in enumerate(solution.cells):
        if cell.cell_type != "code":
            continue
        if BEGIN_SOLUTION in cell.source:
            defined = _DEF.search(cell.source)
            name = defined.group(1) if defined else f"exercise {len(out) + 1}"
            out.append(Exercise(name=f"{len(out) + 1}. {name}", cell=i,
                                points=float(cell.metadata.get("points", 1.0))))
        elif out and _is_test(cell.source):
            out[-1].tests.append(i)
            out[-1].hidden |= BEGIN_HIDDEN in cell.source
    return out


def _restore_tests(student: NotebookNode, solution: NotebookNode, graded: list[Exercise], name: str) -> None:
    """Put the solution's test cells (hidden tests included) into the student copy, matched by cell id."""
    ids = {c.get("id"): k for k, c in enumerate(student.cells)}
    for ex in graded:
        for i in ex.tests:
            k = ids.get(solution.cells[i].get("id") or cell_id(name, i))
            if k is None:
                raise ValueError(f"the student notebook has no cell matching the solution's test cell {i} "
                                 f"(cells deleted or reordered?); grade a copy generated from this solution")
            student.cells[k].source = solution.cells[i].source


def handing_back(solution: NotebookNode) -> NotebookNode:
    """A copy of `solution` whose exercises hand back labkit's own function instead of being written.

    Each exercise cell that names its labkit counterpart (cell metadata ``"reference":
    "labkit.module:qualname"``) gets its solution block replaced by a call of that function with the
    exercise's arguments. Its visible checks pass; its hidden tests (run inside
    `labkit.teach.without`) must fail: grading this copy is how an instructor tests them.
    """
    nb = nbformat.from_dict(json.loads(json.dumps(solution)))
    for cell in nb.cells:
        ref = cell.metadata.get("reference")
        if cell.cell_type != "code" or not ref or BEGIN_SOLUTION not in cell.source:
            continue
        module, qualname = ref.split(":")
        lines = cell.source.splitlines()
        begin = next(k for k, line in enumerate(lines) if line.strip() == BEGIN_SOLUTION)
        end = next(k for k, line in enumerate(lines) if line.strip() == END_SOLUTION)
        func = next(n for n in ast.walk(ast.parse(cell.source)) if isinstance(n, ast.FunctionDef)
                    and n.lineno <= begin + 1 <= n.end_lineno)
        names = [a.arg for a in func.args.posonlyargs + func.args.args]
        indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
        call = f"{indent}return __import__('importlib').import_module({module!r}).{qualname}({', '.join(names)})"
        cell.source = "\n".join(lines[:begin] + [call] + lines[end + 1:])
    return nb


def _inject(nb: NotebookNode, parameters: dict) -> None:
    """Insert the parameter assignments after the cell tagged `parameters`, as papermill does."""
    where = next((k for k, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])), -1)
    source = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
    cell = nbformat.v4.new_code_cell(source, metadata={"tags": ["injected-parameters"]})
    cell.id = "injected-parameters"
    nb.cells.insert(where + 1, cell)


def _error(cell: NotebookNode) -> str | None:
    for out in cell.get("outputs", []):
        if out.get("output_type") == "error":
            return f"{out.get('ename')}: {out.get('evalue')}"
    return None


def grade(student_path: str | Path, solution_path: str | Path | None = None,
          parameters: dict | None = None, timeout: int = 600, cwd: str | Path | None = None) -> dict:
    """Run `student_path` and return Gradescope's results dict (score, tests, execution_time).

    `solution_path` defaults to ``solutions/<same name>`` beside the student's ``notebooks/`` folder.
    `parameters` default to ``{"FAST": True, "SEED": 0}``; the kernel runs in `cwd` (default: the
    folder above the notebook's, where the lessons expect to run).
    """
    from nbclient import NotebookClient

    student_path = Path(student_path)
    if solution_path is None:
        solution_path = student_path.resolve().parent.parent / "solutions" / student_path.name
    solution_path = Path(solution_path)
    for p, what in ((student_path, "student notebook"), (solution_path, "solution notebook")):
        if not p.is_file():
            raise FileNotFoundError(f"{what} {p} not found" + (" (pass --solution)" if what[0] == "s" else ""))
    student = nbformat.read(student_path, as_version=4)
    solution = nbformat.read(solution_path, as_version=4)
    graded = exercises(solution)
    if not graded:
        raise ValueError(f"{solution_path} has no exercises (no '{BEGIN_SOLUTION}' cells) to grade")
    _restore_tests(student, solution, graded, solution_path.stem)

    # Remember where each graded cell sits (by id) before the injected cell shifts indices.
    ids = {c.get("id"): k for k, c in enumerate(student.cells)}
    want = {ex.cell: ids.get(solution.cells[ex.cell].get("id")) for ex in graded}
    want |= {i: ids.get(solution.cells[i].get("id")) for ex in graded for i in ex.tests}
    if None in want.values():
        raise ValueError("the student notebook does not match its solution's cells; regenerate it")
    graded_ids = {i: student.cells[k].get("id") for i, k in want.items()}
    _inject(student, dict(parameters or {"FAST": True, "SEED": 0}))

    start = time.perf_counter()
    client = NotebookClient(student, timeout=timeout, kernel_name="python3", allow_errors=True,
                            resources={"metadata": {"path": str(cwd or student_path.resolve().parent.parent)}})
    client.execute()
    by_id = {c.get("id"): c for c in student.cells}

    tests, score = [], 0.0
    for ex in graded:
        errors = [(i, _error(by_id[graded_ids[i]])) for i in [ex.cell, *ex.tests]]
        failed = [(i, e) for i, e in errors if e]
        passed = not failed
        score += ex.points if passed else 0.0
        if passed:
            output = "passed"
        elif failed[0][0] == ex.cell:
            output = f"the exercise cell raised {failed[0][1]}"
        else:  # a hidden check's source stays hidden: report only what it said
            output = failed[0][1]
        tests.append({"name": ex.name, "score": ex.points if passed else 0.0, "max_score": ex.points,
                      "output": output, "visibility": "visible"})
    return {"score": score, "max_score": sum(ex.points for ex in graded), "tests": tests,
            "execution_time": round(time.perf_counter() - start, 1), "stdout_visibility": "hidden"}


def main(student: str, solution: str | None = None, out: str | None = None, full: bool = False,
         timeout: int = 600) -> int:
    """`labkit grade`: print a per-exercise table and write results.json (Gradescope's format)."""
    results = grade(student, solution, parameters={"FAST": not full, "SEED": 0}, timeout=timeout)
    for t in results["tests"]:
        mark = "PASS" if t["score"] == t["max_score"] else "FAIL"
        print(f"{mark}  {t['score']:g}/{t['max_score']:g}  {t['name']}" + ("" if mark == "PASS" else f"  ({t['output']})"))
    print(f"score {results['score']:g}/{results['max_score']:g} in {results['execution_time']} s")
    if out:
        Path(out).write_text(json.dumps(results, indent=2))
        print(f"wrote {out}")
    return 0
