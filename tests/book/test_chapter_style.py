"""The chapters' code fits the page: black's layout, no code line over 100 characters (mechbook.book.chapter_style)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import nbformat
import pytest

from mechbook.book import chapter_style
from mechbook.book.cli import find_chapters

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]


def _notebook(path: Path, *sources: str) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_markdown_cell("# A chapter with " + "a long title " * 20)]
    for source in sources:
        cell = nbformat.v4.new_code_cell(source)
        cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="kept as it is\n")]
        cell.metadata["tags"] = ["hide-input"]
        nb.cells.append(cell)
    nbformat.write(nb, path)
    return path


def test_chapter_code_lines_fit_the_page() -> None:
    chapters = [c.path for c in find_chapters(ROOT / "book")]
    longer = chapter_style.long_lines(chapters)
    assert not longer, (
        f"{len(longer)} code lines in the chapters are longer than {chapter_style.LINE_LENGTH} characters, which the "
        "page cuts off; run `python -m mechbook format`, then wrap by hand the lines it still lists:\n"
        + "\n".join(map(str, longer))
    )


def test_line_length_is_the_one_black_uses() -> None:
    black = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["black"]
    assert black["line-length"] == chapter_style.LINE_LENGTH, "pyproject.toml [tool.black] line-length differs from LINE_LENGTH"


def test_long_lines_names_notebook_cell_and_line(tmp_path: Path) -> None:
    short, long = "x = 1", "y = " + " + ".join(["1"] * 40)
    path = _notebook(tmp_path / "a9_test.ipynb", short, f"{short}\n{long}")
    found = chapter_style.long_lines([path])
    assert [(f.cell, f.line, f.length) for f in found] == [(2, 2, len(long))]
    assert chapter_style.long_lines([path], limit=len(long)) == []  # markdown cells never count


def test_format_breaks_code_and_long_strings_and_keeps_outputs(tmp_path: Path) -> None:
    pytest.importorskip("black")
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    call = ("result = dict(" + ", ".join(f"argument_{i}={i}" for i in range(12)) + ")\n"
            + 'text = f"{result} ' + "a sentence that goes on " * 6 + '"')
    path = _notebook(tmp_path / "a9_test.ipynb", call)
    before = json.loads(path.read_text())
    assert chapter_style.long_lines([path])
    assert chapter_style.format_chapters([path], root=tmp_path) == 0
    after = json.loads(path.read_text())
    assert chapter_style.long_lines([path]) == [], "black left a line over the limit"
    for old, new in zip(before["cells"], after["cells"]):
        assert {k: v for k, v in old.items() if k != "source"} == {k: v for k, v in new.items() if k != "source"}
    namespace: dict = {}
    exec("".join(after["cells"][1]["source"]), namespace)  # same program: the same values
    exec(call, expected := {})
    assert namespace["text"] == expected["text"] and namespace["result"] == expected["result"]
