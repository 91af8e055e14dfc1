"""The layout of the chapters' code: formatted by black, no line longer than the page shows.

The book's theme does not wrap code, so a longer line is cut off on the page.
:func:`format_chapters` runs black (its settings are ``[tool.black]`` in pyproject.toml:
line length :data:`LINE_LENGTH`, string processing on) over the chapter notebooks, and
:func:`long_lines` lists the code lines still longer than that: comments and docstrings,
which no formatter breaks. ``python -m mechbook format`` does both;
tests/book/test_chapter_style.py fails on any line :func:`long_lines` finds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

LINE_LENGTH = 100  # the same as line-length in [tool.black] (tests/book/test_chapter_style.py checks)


@dataclass(frozen=True)
class LongLine:
    """A code line longer than :data:`LINE_LENGTH`: which notebook, cell (0-based) and line (1-based)."""

    notebook: Path
    cell: int
    line: int
    length: int
    text: str

    def __str__(self) -> str:
        return f"{self.notebook.name} cell {self.cell} line {self.line} ({self.length} characters): {self.text.strip()[:60]}"


def long_lines(notebooks: Sequence[Path], limit: int = LINE_LENGTH) -> list[LongLine]:
    """Every code-cell line of ``notebooks`` longer than ``limit`` characters."""
    found = []
    for path in notebooks:
        cells = json.loads(Path(path).read_text(encoding="utf-8"))["cells"]
        for index, cell in enumerate(cells):
            if cell.get("cell_type") != "code":
                continue
            source = "".join(cell["source"]) if isinstance(cell["source"], list) else cell["source"]
            for number, text in enumerate(source.splitlines(), start=1):
                if len(text) > limit:
                    found.append(LongLine(Path(path), index, number, len(text), text))
    return found


def format_chapters(notebooks: Sequence[Path], *, root: Path, check: bool = False) -> int:
    """Run black over the notebooks' code cells (``check``: only report), with the project's settings.

    Returns black's exit code (with ``check``, 1 when a notebook would change).
    """
    try:
        import black  # noqa: F401  (black[jupyter], from the test extra)
    except ImportError:
        from mechbook.core.errors import MechbookError

        raise MechbookError("black is not installed; pip install -e '.[test]' (or bash scripts/setup.sh)") from None
    command = [sys.executable, "-m", "black", "--config", str(root / "pyproject.toml"), *(["--check"] if check else []),
               *map(str, notebooks)]
    return subprocess.call(command, cwd=root)
