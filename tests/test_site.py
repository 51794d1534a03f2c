"""The course site: a lesson executed, its solution hidden but its outputs kept, rendered by Jupyter Book."""

from __future__ import annotations

import nbformat

from labkit.teach.site import build

LESSON = [
    nbformat.v4.new_markdown_cell("# 99 · A tiny lesson\n\nSome text."),
    nbformat.v4.new_code_cell("FAST = False", metadata={"tags": ["parameters"]}),
    nbformat.v4.new_code_cell("def answer():\n    ### BEGIN SOLUTION\n    return 41 + 1\n    ### END SOLUTION"),
    nbformat.v4.new_code_cell("print('the answer is', answer(), 'FAST =', FAST)"),
]


def test_site_hides_solutions_and_keeps_outputs(tmp_path):
    solutions = tmp_path / "solutions"
    solutions.mkdir()
    nb = nbformat.v4.new_notebook(cells=LESSON)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, solutions / "99_tiny.ipynb")
    nbformat.write(nb, solutions / "98_full.ipynb")
    # `make full` ran lesson 98 (its executed copy is newer than the lesson): the site shows that run.
    full_runs = tmp_path / "full"
    full_runs.mkdir()
    ran = nbformat.v4.new_notebook(cells=[nbformat.from_dict(c) for c in LESSON], metadata=nb.metadata)
    ran.cells[3].outputs = [nbformat.v4.new_output("stream", name="stdout", text="the answer is 42 FAST = False\n")]
    nbformat.write(ran, full_runs / "98_full.ipynb")
    index = build(solutions, tmp_path / "site", full_runs=full_runs)
    assert index.is_file() and "A tiny lesson" in index.read_text()
    page = (index.parent / "99_tiny.html").read_text()
    assert "the answer is 42 FAST = True" in page and "FAST-mode run" in page  # executed in FAST mode, labelled
    assert "41 + 1" not in page and "NotImplementedError" in page  # the solution is not published
    full_page = (index.parent / "98_full.html").read_text()
    assert "the answer is 42 FAST = False" in full_page and "Full-mode run" in full_page
    assert "41 + 1" not in full_page
