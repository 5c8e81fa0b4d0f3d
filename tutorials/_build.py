"""Write the tutorial notebooks from their readable sources: `tutorials/src/*.py` -> `tutorials/*.ipynb`.

A source is a Python file in the "percent" format that Jupytext, VS Code and Spyder read: `# %%` opens
a code cell, `# %% [markdown]` a Markdown cell whose lines are comments (`# text`, `#` for a blank
line). Lines before the first `# %%` (linter directives) are not part of the notebook. The notebooks
are written without outputs and with `execution_count: null`, with stable cell ids, so a rebuild of
an unchanged source gives the same bytes and a diff shows only what changed.

    python tutorials/_build.py           # rewrite every notebook from its source
    python tutorials/_build.py --check   # exit 1, naming them, if any notebook is not its source's

`tests/test_tutorials.py` runs the check, then executes every notebook.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

TUTORIALS = Path(__file__).resolve().parent
SOURCES = TUTORIALS / "src"

CODE_MARKER = "# %%"
MARKDOWN_MARKER = "# %% [markdown]"

NOTEBOOK_METADATA: dict[str, Any] = {
    "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
    "language_info": {"name": "python"},
}


def parse_cells(text: str) -> list[tuple[str, str]]:
    """`(cell_type, source)` for each cell of a percent-format source, in order."""
    cells: list[tuple[str, list[str]]] = []
    for line in text.splitlines():
        stripped = line.rstrip()
        if stripped == MARKDOWN_MARKER:
            cells.append(("markdown", []))
        elif stripped == CODE_MARKER or stripped.startswith(CODE_MARKER + " "):
            cells.append(("code", []))
        elif cells:
            kind, lines = cells[-1]
            if kind == "markdown":
                if stripped and not stripped.startswith("#"):
                    raise ValueError(f"a Markdown cell line must be a comment: {line!r}")
                # "# text" -> "text", "#" -> "" (keeps the indentation after "# " for code blocks).
                line = stripped[2:] if stripped.startswith("# ") else stripped[1:]
            lines.append(line.rstrip())
    out = []
    for kind, lines in cells:
        # Blank lines between cells belong to neither.
        while lines and not lines[0]:
            lines.pop(0)
        while lines and not lines[-1]:
            lines.pop()
        if not lines:
            raise ValueError(f"an empty {kind} cell (two cell markers in a row)")
        out.append((kind, "\n".join(lines)))
    return out


def _source_lines(source: str) -> list[str]:
    # nbformat's on-disk convention: a list of lines, each but the last keeping its newline.
    lines = source.split("\n")
    return [line + "\n" for line in lines[:-1]] + [lines[-1]]


def build_notebook(source_path: Path) -> dict[str, Any]:
    """The nbformat-4.5 notebook (a dict) of one percent-format source, without outputs."""
    cells = []
    for number, (kind, source) in enumerate(parse_cells(source_path.read_text())):
        cell: dict[str, Any] = {
            "cell_type": kind,
            "id": f"{source_path.stem[:2]}-{number:03d}",
            "metadata": {},
            "source": _source_lines(source),
        }
        if kind == "code":
            cell["execution_count"] = None
            cell["outputs"] = []
        cells.append(cell)
    return {"cells": cells, "metadata": NOTEBOOK_METADATA, "nbformat": 4, "nbformat_minor": 5}


def notebook_text(notebook: dict[str, Any]) -> str:
    """The notebook as written to disk (what Jupyter writes: one-space indent, a final newline)."""
    return json.dumps(notebook, indent=1, ensure_ascii=False) + "\n"


def sources() -> list[Path]:
    """Every tutorial source, in file-name order."""
    return sorted(SOURCES.glob("[0-9]*.py"))


def notebook_path(source_path: Path) -> Path:
    """Where the notebook of a source lives: `tutorials/<stem>.ipynb`."""
    return TUTORIALS / f"{source_path.stem}.ipynb"


def stale_notebooks() -> list[Path]:
    """Notebooks that differ from their source's, are missing, or have no source."""
    stale = [
        notebook_path(src)
        for src in sources()
        if not notebook_path(src).is_file()
        or notebook_path(src).read_text() != notebook_text(build_notebook(src))
    ]
    expected = {notebook_path(src) for src in sources()}
    return stale + sorted(set(TUTORIALS.glob("*.ipynb")) - expected)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report notebooks that differ")
    args = parser.parse_args(argv)
    if args.check:
        stale = stale_notebooks()
        for path in stale:
            print(f"{path.relative_to(TUTORIALS.parent)} is not built from tutorials/src/", file=sys.stderr)
        if stale:
            print("run: python tutorials/_build.py", file=sys.stderr)
        return 1 if stale else 0
    for src in sources():
        target = notebook_path(src)
        text = notebook_text(build_notebook(src))
        if not target.is_file() or target.read_text() != text:
            target.write_text(text)
            print(f"wrote {target.relative_to(TUTORIALS.parent)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
