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
    index = build(solutions, tmp_path / "site")
    assert index.is_file() and "A tiny lesson" in index.read_text()
    page = (index.parent / "99_tiny.html").read_text()
    assert "the answer is 42 FAST = True" in page  # executed in FAST mode, output kept
    assert "41 + 1" not in page and "NotImplementedError" in page  # the solution is not published
