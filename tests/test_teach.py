"""labkit.teach: student-notebook generation, metric recording and exercise checks."""

from __future__ import annotations

import importlib
import json
import math
import sys
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from notebook_utils import Rel, assert_bars, assert_fails_at, first_stub_cell, run_notebook

from labkit.teach import (
    ExerciseFailed,
    check,
    check_close,
    check_shape,
    generate,
    load_metrics,
    make_student,
    metrics,
    record,
    stale,
    strip_outputs,
)
from labkit.teach.student import main as student_main

record_module = importlib.import_module("labkit.teach.record")  # the module, not the function it exports

EXERCISE = """\
import numpy as np

def softmax(x):
    \"\"\"Softmax over the last axis.\"\"\"
    ### BEGIN SOLUTION
    z = x - x.max(axis=-1, keepdims=True)
    return np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    ### END SOLUTION

check_close("softmax", softmax(np.zeros(2)), [0.5, 0.5])
### BEGIN HIDDEN TESTS
check_close("softmax-shift", softmax(np.ones(2) * 1000), [0.5, 0.5])
### END HIDDEN TESTS
print("done")"""


def _solution_nb() -> nbformat.NotebookNode:
    params = new_code_cell("FAST = False\nSEED = 1")
    params.metadata["tags"] = ["parameters"]
    run = new_code_cell("x = 1", execution_count=3,
                        outputs=[nbformat.v4.new_output("stream", name="stdout", text="hi\n")])
    return new_notebook(cells=[new_markdown_cell("# Title\n### BEGIN SOLUTION (in markdown: untouched)"),
                               params, run, new_code_cell(EXERCISE)])


# ---------------------------------------------------------------- student-notebook generation

def test_make_student_replaces_solution_keeps_indentation_and_rest():
    nb = _solution_nb()
    student = make_student(nb, "demo")
    src = student.cells[3].source
    assert "    # YOUR CODE HERE\n    raise NotImplementedError()\n" in src
    assert "np.exp" not in src and "BEGIN SOLUTION" not in src and "END SOLUTION" not in src
    assert "HIDDEN" not in src and "softmax-shift" not in src
    # Everything outside the markers is kept, line for line.
    assert src == EXERCISE.split("    ### BEGIN SOLUTION")[0] + (
        "    # YOUR CODE HERE\n    raise NotImplementedError()\n\n"
        'check_close("softmax", softmax(np.zeros(2)), [0.5, 0.5])\nprint("done")'
    )
    assert student.cells[0].source == nb.cells[0].source  # markdown untouched
    assert student.cells[1].metadata["tags"] == ["parameters"]
    # Outputs and counts stripped; the input notebook is unchanged.
    assert student.cells[2].outputs == [] and student.cells[2].execution_count is None
    assert nb.cells[2].outputs and "np.exp" in nb.cells[3].source


def test_marker_at_top_level_and_without_trailing_newline():
    nb = new_notebook(cells=[new_code_cell("a = 1\n### BEGIN SOLUTION\nb = 2\n### END SOLUTION")])
    assert make_student(nb).cells[0].source == "a = 1\n# YOUR CODE HERE\nraise NotImplementedError()"


@pytest.mark.parametrize("source, problem", [
    ("### BEGIN SOLUTION\nx = 1\n", "never closed"),
    ("x = 1\n### END SOLUTION\n", "without its BEGIN"),
    ("### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n### END SOLUTION\n", "nested"),
    ("### BEGIN SOLUTION\n### BEGIN HIDDEN TESTS\n### END HIDDEN TESTS\n### END SOLUTION\n", "nested"),
    ("### BEGIN HIDDEN TESTS\nx = 1\n### END SOLUTION\n", "without its BEGIN"),
])
def test_bad_markers_raise_naming_notebook_and_cell(source, problem):
    nb = new_notebook(cells=[new_code_cell("ok = 1"), new_markdown_cell("text"), new_code_cell(source)])
    with pytest.raises(ValueError, match=rf"lesson\.ipynb, cell 2: .*{problem}"):
        make_student(nb, "lesson")


def _write_solutions(tmp_path):
    sol = tmp_path / "solutions"
    sol.mkdir()
    for name in ("01_a", "02_b"):
        nbformat.write(_solution_nb(), sol / f"{name}.ipynb")
    return sol, tmp_path / "notebooks"


def test_generate_is_deterministic_and_well_formed(tmp_path):
    sol, out = _write_solutions(tmp_path)
    paths = generate(sol, out)
    assert [p.name for p in paths] == ["01_a.ipynb", "02_b.ipynb"]
    first = {p.name: p.read_bytes() for p in paths}
    for p in paths:  # a fresh generation into an empty folder gives identical bytes
        p.unlink()
    generate(sol, out)
    assert {p.name: p.read_bytes() for p in paths} == first
    text = first["01_a.ipynb"].decode()
    assert text.endswith("}\n") and text.startswith('{\n "cells": [\n  {')  # indent 1, trailing newline
    nb = nbformat.reads(text, as_version=4)
    nbformat.validate(nb)
    ids = [c.id for c in nb.cells]
    assert len(set(ids)) == len(ids)
    assert ids != [c.id for c in nbformat.read(out / "02_b.ipynb", as_version=4).cells]  # name-derived


def test_stale_detects_edited_missing_and_orphaned(tmp_path):
    sol, out = _write_solutions(tmp_path)
    assert stale(sol, out) == ["01_a.ipynb", "02_b.ipynb"]  # nothing generated yet
    generate(sol, out)
    assert stale(sol, out) == []
    nb = nbformat.read(out / "01_a.ipynb", as_version=4)
    nb.cells[3].source = "# my answer"
    nbformat.write(nb, out / "01_a.ipynb")
    (out / "02_b.ipynb").unlink()
    (out / "99_extra.ipynb").write_text("{}")
    assert stale(sol, out) == ["01_a.ipynb", "02_b.ipynb", "99_extra.ipynb"]
    generate(sol, out)  # regenerating fixes all three (the orphan is pruned)
    assert stale(sol, out) == []
    assert not (out / "99_extra.ipynb").exists()
    with pytest.raises(FileNotFoundError, match="no such folder"):  # never prune against a wrong path
        generate(tmp_path / "typo", out)
    assert stale(sol, out) == []


def test_strip_outputs_in_place_is_idempotent(tmp_path):
    path = tmp_path / "sol.ipynb"
    nbformat.write(_solution_nb(), path)
    assert strip_outputs(path) is True
    once = path.read_bytes()
    assert strip_outputs(path) is False and path.read_bytes() == once
    nb = nbformat.read(path, as_version=4)
    assert nb.cells[2].outputs == [] and nb.cells[2].execution_count is None
    assert "np.exp" in nb.cells[3].source  # solutions keep their solutions


def test_cli_generate_and_check(tmp_path, capsys):
    sol, out = _write_solutions(tmp_path)
    args = ["--solutions", str(sol), "--out", str(out)]
    assert student_main([*args, "--check"]) == 1  # solutions have outputs, students missing
    assert "make student" in capsys.readouterr().err
    assert student_main(args) == 0
    assert student_main([*args, "--check"]) == 0
    nbformat.write(new_notebook(cells=[new_code_cell("### END SOLUTION")]), sol / "03_bad.ipynb")
    assert student_main(args) == 2
    assert "03_bad.ipynb, cell 0" in capsys.readouterr().err
    assert not (out / "03_bad.ipynb").exists()


# ---------------------------------------------------------------- metric recording

@pytest.fixture
def fresh_metrics(monkeypatch, tmp_path):
    monkeypatch.setattr(record_module, "_METRICS", {})
    path = tmp_path / "sub" / "metrics.json"
    monkeypatch.setenv("LABKIT_METRICS", str(path))
    return path


def test_record_writes_json_and_converts(fresh_metrics):
    assert record("acc", np.float32(0.5)) == np.float32(0.5)  # returns the value unchanged
    record("n", np.int64(3))
    record("loss", torch.tensor(0.25))
    record("curve", np.array([1.0, 2.0]))
    record("ok", np.bool_(True))
    record("name", "bc")
    expected = {"acc": 0.5, "n": 3, "loss": 0.25, "curve": [1.0, 2.0], "ok": True, "name": "bc"}
    assert json.loads(fresh_metrics.read_text()) == expected == load_metrics(fresh_metrics) == metrics()
    assert type(metrics()["n"]) is int and type(metrics()["ok"]) is bool
    assert not list(fresh_metrics.parent.glob("*.tmp"))  # the atomic write left no temp file


@pytest.mark.parametrize("name, value, error", [
    ("", 1.0, ValueError), (None, 1.0, ValueError), ("x", math.nan, ValueError),
    ("x", [1.0, math.inf], ValueError), ("x", torch.tensor(float("nan")), ValueError),
    ("x", {"a": 1}, TypeError), ("x", None, TypeError), ("x", np.zeros(100_000), ValueError),
])
def test_record_rejects_bad_input(fresh_metrics, name, value, error):
    record("kept", 1)
    with pytest.raises(error, match="record"):
        record(name, value)
    assert load_metrics(fresh_metrics) == {"kept": 1}  # nothing already recorded is lost


def test_record_without_env_var_stays_in_memory(monkeypatch, tmp_path):
    monkeypatch.setattr(record_module, "_METRICS", {})
    monkeypatch.delenv("LABKIT_METRICS", raising=False)
    monkeypatch.chdir(tmp_path)
    record("a", 1)
    assert metrics() == {"a": 1} and list(tmp_path.iterdir()) == []
    assert load_metrics(tmp_path / "missing.json") == {}


# ---------------------------------------------------------------- exercise checks

def test_check_prints_pass_and_fail(capsys):
    check("ex1", True, hint="unused")
    assert capsys.readouterr().out == "✅ ex1: correct\n"
    with pytest.raises(ExerciseFailed) as err:
        check("ex2", 1 > 2, hint="compare again")
    assert capsys.readouterr().out == "❌ ex2: not quite right. Hint: compare again\n"
    assert isinstance(err.value, AssertionError) and "ex2" in str(err.value)


def test_check_close_numbers_arrays_tensors(capsys):
    check_close("scalar", 0.1 + 0.2, 0.3)
    check_close("array", np.array([1.0, 2.0]), [1.0, 2.0 + 1e-9])
    check_close("tensor", torch.ones(2, 3, requires_grad=True), np.ones((2, 3)))
    assert capsys.readouterr().out.count("correct") == 3
    with pytest.raises(ExerciseFailed, match=r"got 1\.5, expected 1 .*Hint: off by half"):
        check_close("value", 1.5, 1.0, hint="off by half")
    with pytest.raises(ExerciseFailed, match=r"1 of 3 values differ; worst at index \(2,\): got 9"):
        check_close("vec", [1, 2, 9], [1, 2, 3])
    with pytest.raises(ExerciseFailed, match="NaN"):
        check_close("nan", torch.tensor([float("nan")]), [0.0])
    with pytest.raises(ExerciseFailed, match="got None"):
        check_close("none", None, 1.0)
    with pytest.raises(ExerciseFailed, match="got a str"):
        check_close("str", "1.0", 1.0)


def test_shape_mismatch_names_both_shapes(capsys):
    with pytest.raises(ExerciseFailed, match=r"shape is \(2, 3\), expected \(3, 2\)"):
        check_close("logits", torch.zeros(2, 3), np.zeros((3, 2)))
    out = capsys.readouterr().out
    assert out.startswith("❌ logits: shape is (2, 3), expected (3, 2)")
    check_shape("chunk", np.zeros((4, 16, 2)), (None, 16, 2))
    assert capsys.readouterr().out == "✅ chunk: correct\n"
    with pytest.raises(ExerciseFailed, match=r"shape is \(4, 8, 2\), expected \(\*, 16, 2\). Hint: H=16"):
        check_shape("chunk", torch.zeros(4, 8, 2), (None, 16, 2), hint="H=16")
    with pytest.raises(ExerciseFailed, match=r"shape is \(3,\), expected \(3, 1\)"):
        check_shape("col", [1, 2, 3], (3, 1))


# ---------------------------------------------------------------- the notebook harness, end to end

HARNESS_CELLS = [
    ("parameters", "FAST = False\nSEED = 1"),
    (None, "import sys\nimport numpy as np\nfrom labkit.teach import check_close, record\n"
           "record('prefix', sys.prefix)\nrecord('fast', FAST)\nrecord('seed', SEED)"),
    (None, "def double(x):\n    ### BEGIN SOLUTION\n    return 2 * x\n    ### END SOLUTION\n\n"
           "check_close('double', double(np.arange(3)), [0, 2, 4], hint='multiply by two')\n"
           "### BEGIN HIDDEN TESTS\ncheck_close('double-hidden', double(5), 10)\n### END HIDDEN TESTS"),
    (None, "record('answer', double(21))"),
]


@pytest.mark.notebook
def test_harness_runs_solution_and_student_copy(tmp_path):
    """A throwaway lesson goes through the same helpers as tests/test_notebooks.py: the solution
    records its metrics (in the venv's kernel, with FAST injected), the student copy stops at the
    exercise."""
    from papermill.exceptions import PapermillExecutionError

    cells = []
    for tag, source in HARNESS_CELLS:
        cells.append(new_code_cell(source))
        if tag:
            cells[-1].metadata["tags"] = [tag]
    sol, out = tmp_path / "solutions", tmp_path / "notebooks"
    sol.mkdir()
    nbformat.write(new_notebook(cells=cells, metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                      "display_name": "Python 3"}}),
                   sol / "99_demo.ipynb")
    generate(sol, out)

    metrics_path = tmp_path / "metrics.json"
    run_notebook(sol / "99_demo.ipynb", tmp_path / "sol_out.ipynb", metrics_path)
    recorded = load_metrics(metrics_path)
    assert recorded["prefix"] == sys.prefix, "the kernel is not the venv's Python"
    assert_bars("99_demo", recorded, {"answer": ("==", 42), "fast": ("==", True), "seed": ("between", (0, 0))})
    with pytest.raises(AssertionError, match=r"answer = 42, expected >= 50.*missing: not recorded"):
        assert_bars("99_demo", recorded, {"answer": (">=", 50), "missing": ("<=", 1)})
    # Relative bars read another metric of the same run.
    assert_bars("99_demo", {"base": 0.4, "rl": 0.35}, {"rl": (">=", Rel("base", -0.1))})
    with pytest.raises(AssertionError, match=r"rl = 0.2, expected >= base \(0.4\) -0.1"):
        assert_bars("99_demo", {"base": 0.4, "rl": 0.2}, {"rl": (">=", Rel("base", -0.1))})
    with pytest.raises(AssertionError, match=r"base: not recorded"):
        assert_bars("99_demo", {"rl": 0.2}, {"rl": (">=", Rel("base", -0.1))})

    student = nbformat.read(out / "99_demo.ipynb", as_version=4)
    stub = first_stub_cell(student)
    assert stub == 2
    with pytest.raises(PapermillExecutionError) as err:
        run_notebook(out / "99_demo.ipynb", tmp_path / "student_out.ipynb", tmp_path / "student.json")
    assert err.value.ename == "NotImplementedError"
    assert_fails_at(nbformat.read(tmp_path / "student_out.ipynb", as_version=4), stub, "99_demo.ipynb")
    assert "answer" not in load_metrics(tmp_path / "student.json")


# ---------------------------------------------------------------- lesson lint (labkit.teach.lint)
@pytest.mark.parametrize("text, hits", [
    ("flow reached **85% (77-91%, 100 episodes)** after 3.0 min", ["85%", "77-91%", "3.0"]),
    ("mean final coverage 0.93", ["0.93"]),
    ("DPPO: 47% → 91%", ["47%", "91%"]),
    # parameters in code or math, the level of an interval, section numbers and counts are not results
    ("success needs coverage `> 0.95`; noise $\\sigma = 0.1$; a Wilson 95% interval", []),
    ("a 95% confidence interval over 200 episodes, chunks of 16 (lab guide §3.4)", []),
    ("```\nlr = 3.0e-4\n```", []),
])
def test_typed_results_rule(text, hits):
    from labkit.teach.lint import typed_results

    found = typed_results(text)
    assert len(found) == len(hits), found
    for hit, number in zip(found, hits, strict=True):
        assert number.split("-")[0] in hit


def test_checks_without_hint_finds_bare_checks():
    from labkit.teach.lint import checks_without_hint

    source = ('%matplotlib inline\n'
              'check("a", x == 1)\n'
              'check("b", x == 1, "look at the sign")\n'   # positional hint
              'check_close("c", y, z, hint="")\n'          # empty hint
              'check_close("d", y, z, hint=f"y={y}")\n'
              'check_shape("e", y, (2, 3))\n')
    missing = checks_without_hint(source)
    assert [m.split('"')[1] for m in missing] == ["a", "c", "e"]


def test_without_refuses_labkit_references_and_restores_them(capsys):
    import labkit.eval
    import labkit.policies
    from labkit.eval import wilson_interval
    from labkit.policies import fit
    from labkit.teach import without

    # A notebook's globals: a "solution" that hands back labkit's reference, and one written out.
    notebook = {"wilson_interval": wilson_interval}
    exec("def handed_back(k, n):\n    return wilson_interval(k, n)\n"
         "def written_out(k, n):\n    return (k / n, k / n)", notebook)
    with without(wilson_interval, fit, namespace=notebook):
        assert notebook["written_out"](1, 2) == (0.5, 0.5)
        with pytest.raises(ExerciseFailed, match="labkit.eval.wilson_interval"):
            notebook["handed_back"](1, 2)
        with pytest.raises(ExerciseFailed):
            labkit.policies.fit(None, None)  # a re-export is refused too
    assert "called labkit's" in capsys.readouterr().out
    assert labkit.eval.wilson_interval is wilson_interval and labkit.policies.fit is fit
    assert notebook["handed_back"](1, 2) == wilson_interval(1, 2)


# ---------------------------------------------------------------- make full: results file and README
def test_full_results_render_into_the_readme_block(tmp_path):
    from labkit.teach.full import BEGIN, END, readme_block, render, update_readme

    data = {"01_bc": {"date": "2026-12-03", "machine": "a CPU, 2 cores, Linux", "minutes": 2.14,
                      "cpu_minutes": 1.96, "parameters": {"FAST": False, "SEED": 0},
                      "metrics": {"detour_bc_success": 0.0, "frames": 1200, "curve": [0.5, 0.25]}}}
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\nbefore\n{BEGIN}\nstale\n{END}\nafter\n")
    update_readme(readme, data)
    text = readme.read_text()
    assert text.startswith("# x\n\nbefore\n") and text.endswith("after\n") and "stale" not in text
    block = readme_block(text)
    assert block == render(data)
    assert "| `01_bc` | 2026-12-03 | 2.1 | 2.0 |" in block and "`detour_bc_success` = 0" in block and "[0.5, 0.25]" in block
    del data["01_bc"]["cpu_minutes"]  # entries from before CPU minutes were recorded
    assert "| 2.1 | not recorded |" in render(data)
    readme.write_text("# no markers\n")
    with pytest.raises(ValueError, match="no generated results block"):
        update_readme(readme, data)


def test_readme_results_agree_with_the_results_file():
    """README.md's generated block is exactly what results/full.json renders to (`make full` writes both)."""
    from labkit.teach.full import readme_block, render

    root = Path(__file__).resolve().parents[1]
    results = root / "results" / "full.json"
    data = json.loads(results.read_text()) if results.exists() else {}
    assert readme_block((root / "README.md").read_text()) == render(data), (
        "README.md's full-mode block differs from results/full.json: run `python -m labkit.teach.full --readme-only`")
