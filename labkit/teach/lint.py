"""Lesson lint: results printed, never typed, and checks that teach.

A result typed into markdown goes stale the first time the code changes, and the course site shows it
beside FAST-mode outputs that disagree with it. The rule, kept simple so that it can be read and
obeyed:

- In a markdown cell, a percentage (`83%`) or a decimal number (`0.93`, `6.2 min`) is a result unless
  it sits in a code span or in math, which is where a lesson writes its *parameters*
  (`coverage > 0.95`, $\\sigma = 0.1$, `sigma=0.05`).
- The confidence level of an interval ("a 95% interval", "Wilson 95%") names a method, not a result,
  and is allowed in prose; so are section numbers (§3.4).

Integers are not flagged: counts (200 demonstrations, chunks of 16) describe a set-up.

Checks that teach: every `check`, `check_close` and `check_shape` call in a lesson passes a `hint=`
(labkit.teach.checks prints what was expected and what came back; the hint says where to look).

    python -m labkit.teach.lint solutions/*.ipynb     # lists every problem, exit 1 if any
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import nbformat

# Code (fenced or inline) and math, where parameters are written; removed before the scan.
_EXEMPT = re.compile(r"```.*?```|`[^`\n]*`|\$\$.*?\$\$|\$[^$\n]+\$", re.S)
_LEVEL = re.compile(r"\b95\s*%\s*(?:confidence|interval|CI|Wilson)|Wilson\s+95\s*%", re.I)
_NUMBER = re.compile(r"(?<![\w.§])\d+(?:\.\d+)?\s*%|(?<![\w.§])\d+\.\d+(?![\w.])")


def typed_results(text: str) -> list[str]:
    """The numbers in markdown `text` that read as results, each with a little of its context."""
    prose = _LEVEL.sub(" ", _EXEMPT.sub(" ", text))
    return [" ".join(prose[max(0, m.start() - 40):m.end() + 20].split()) for m in _NUMBER.finditer(prose)]


_CHECKS = {"check": 2, "check_close": None, "check_shape": 3}  # name -> position of `hint` (None: keyword only)


def checks_without_hint(source: str) -> list[str]:
    """The `check*` calls in code `source` that give no hint, as source text."""
    # IPython magics and shell escapes are not Python; drop them before parsing.
    code = "\n".join("" if line.lstrip().startswith(("%", "!")) else line for line in source.splitlines())
    missing = []
    for node in ast.walk(ast.parse(code)):
        name = getattr(node, "func", None) and getattr(node.func, "id", None)
        if name not in _CHECKS:
            continue
        hint = next((k.value for k in node.keywords if k.arg == "hint"), None)
        pos = _CHECKS[name]
        if hint is None and pos is not None and len(node.args) > pos:
            hint = node.args[pos]
        if hint is None or (isinstance(hint, ast.Constant) and not str(hint.value).strip()):
            missing.append(" ".join(ast.get_source_segment(code, node).split())[:100])
    return missing


def scan(path: str | Path) -> list[tuple[int, str]]:
    """(cell index, problem) for every typed result and every check without a hint in notebook `path`."""
    nb = nbformat.read(str(path), as_version=4)
    found = []
    for i, cell in enumerate(nb.cells):
        if cell.cell_type == "markdown":
            found += [(i, f"typed result: ...{hit}...") for hit in typed_results(cell.source)]
        elif cell.cell_type == "code":
            found += [(i, f"check without a hint: {call}") for call in checks_without_hint(cell.source)]
    return found


def main(paths: list[str]) -> int:
    found = [(p, i, what) for p in paths for i, what in scan(p)]
    for p, i, what in found:
        print(f"{p} cell {i}: {what}")
    if found:
        print(f"{len(found)} problems: print results from variables (parameters go in `code` or $math$); "
              "give every check a hint=")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
