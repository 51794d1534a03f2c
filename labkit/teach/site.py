"""Build the course site: every lesson executed, solutions hidden, as a Jupyter Book.

    make docs                                   # = python -m labkit.teach.site
    python -m labkit.teach.site --only 00_tour  # one lesson, for a quick look

A lesson's page is its full-mode run from `make full` (build/full/, when newer than the lesson), else a
run with papermill in FAST mode (FAST=True, SEED=0: what CI runs); a banner says which. Its solution
blocks are then replaced by the student stub while the outputs stay, so the site shows the figures and
numbers of a real run without giving the exercises away. The pages are written to build/site/src and rendered
with Jupyter Book (no re-execution) into build/site/_build/html; open index.html.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import nbformat

from labkit.teach.student import replace_markers

INJECTED = "injected-parameters"


def _title(nb) -> str:
    for cell in nb.cells:
        if cell.cell_type == "markdown" and cell.source.lstrip().startswith("#"):
            return cell.source.lstrip().splitlines()[0].lstrip("# ").strip()
    return "untitled"


def execute(src: Path, out: Path, parameters: dict | None = None, timeout: int = 600) -> None:
    """Run one lesson with papermill into `out` (cwd: the repository root, as the lessons expect)."""
    import papermill

    papermill.execute_notebook(str(src), str(out), parameters=dict(parameters or {"FAST": True, "SEED": 0}),
                               kernel_name="python3", cwd=str(src.resolve().parent.parent), progress_bar=False,
                               execution_timeout=timeout)


def publishable(nb) -> nbformat.NotebookNode:
    """An executed notebook as a page: solution code replaced by the stub, hidden tests removed, the
    injected-parameters cell hidden; outputs kept."""
    for i, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        cell.source = replace_markers(cell.source, where=f"cell {i}")
        tags = cell.metadata.get("tags", [])
        if INJECTED in tags:
            cell.metadata["tags"] = [*tags, "remove-cell"]
    return nb


def label(nb, mode: str) -> nbformat.NotebookNode:
    """Put a banner at the top of a page saying which run its outputs come from."""
    text = ("> **Full-mode run** (`make full`, `FAST=False`): the outputs below are the lesson's real results."
            if mode == "full" else
            "> **FAST-mode run** (tiny budgets, what CI runs): the outputs below check that the lesson runs; "
            "its numbers are not the lesson's results (`make full` produces those).")
    nb.cells.insert(0, nbformat.v4.new_markdown_cell(text))
    return nb


def write_book(pages: list[tuple[str, str]], src: Path, title: str) -> None:
    """The Jupyter Book around the pages [(file stem, title)]: config, table of contents, an index page."""
    (src / "_config.yml").write_text(
        f"title: {title!r}\nauthor: labkit\nexecute:\n  execute_notebooks: 'off'\n"
        "only_build_toc_files: true\nsphinx:\n  config:\n    html_show_copyright: false\n")
    toc = "format: jb-book\nroot: index\nchapters:\n" + "".join(f"  - file: {stem}\n" for stem, _ in pages)
    (src / "_toc.yml").write_text(toc)
    lines = [f"# {title}", "",
             "Every lesson below was executed top to bottom, in full mode where `make full` has run and in "
             "FAST mode (tiny budgets, what CI runs) otherwise; a banner on each page says which. Exercise "
             "solutions are hidden: run the student notebooks in `notebooks/` to do them.", ""]
    lines += [f"- [{t}]({stem}.ipynb)" for stem, t in pages]
    (src / "index.md").write_text("\n".join(lines) + "\n")


def build(solutions: Path = Path("solutions"), out: Path = Path("build/site"), only: list[str] | None = None,
          title: str = "labkit: a robot-learning course", parameters: dict | None = None,
          full_runs: Path = Path("build/full")) -> Path:
    """Execute, publish and render the lessons; return the path of the site's index.html."""
    lessons = sorted(solutions.glob("*.ipynb"))
    if only:
        unknown = set(only) - {p.stem for p in lessons}
        if unknown:
            raise ValueError(f"no lesson named {sorted(unknown)} in {solutions}/")
        lessons = [p for p in lessons if p.stem in only]
    if not lessons:
        raise ValueError(f"no solution notebooks in {solutions}/")
    src = out / "src"
    src.mkdir(parents=True, exist_ok=True)
    pages = []
    for lesson in lessons:
        start = time.perf_counter()
        executed = src / lesson.name
        full = full_runs / lesson.name
        if parameters is None and full.exists() and full.stat().st_mtime >= lesson.stat().st_mtime:
            mode, nb = "full", nbformat.read(full, as_version=4)
        else:
            execute(lesson, executed, parameters)
            mode, nb = "FAST", nbformat.read(executed, as_version=4)
        nb = label(publishable(nb), mode)
        nbformat.write(nb, executed)
        pages.append((lesson.stem, _title(nb)))
        print(f"{lesson.name}: {mode} run, {time.perf_counter() - start:.0f} s")
    write_book(pages, src, title)
    jb = Path(sys.executable).with_name("jupyter-book")  # the console script of this environment
    subprocess.run([str(jb), "build", str(src), "--path-output", str(out)],
                   check=True, stdout=subprocess.DEVNULL)
    index = out / "_build" / "html" / "index.html"
    print(f"site: {index}")
    return index


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m labkit.teach.site", description=__doc__.split("\n")[0])
    p.add_argument("--only", nargs="*", help="lesson file stems (default: all)")
    p.add_argument("--out", default="build/site")
    a = p.parse_args(argv)
    build(out=Path(a.out), only=a.only)
    return 0


if __name__ == "__main__":
    sys.exit(main())
