"""nbval's comparison made tolerant of float noise, and of nothing else."""

from __future__ import annotations

import subprocess
import sys

import nbformat
import pytest

from mechbook.book.nbval_tolerance import numbers_close, outputs_agree


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("3257.370", "3257.368"),  # a4 on another CPU: relative 6e-7
        ("22.628", "22.627"),  # c1 on another CPU: one unit in the last digit
        ("0.012", "0.013"),
        ("-0.000", "0.000"),
        ("1.2346e-05", "1.2347e-05"),
    ],
)
def test_float_noise_is_accepted(committed, fresh):
    assert numbers_close(committed, fresh)


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("3257.370", "3300.000"),  # a real change
        ("3257", "3300"),
        ("22.628", "22.640"),
        ("0.012", "0.014"),
        ("12", "13"),  # whole numbers (ranks, counts, indices) are exact
        ("12", "13.0"),  # a whole number on one side is exact too
        ("12.0", "13"),
        ("1.0", "nan"),
    ],
)
def test_real_changes_are_refused(committed, fresh):
    assert not numbers_close(committed, fresh)


def test_text_around_numbers_must_match():
    assert outputs_agree("capitals  rank 3  p=0.412 ' Paris'", "capitals  rank 3  p=0.411 ' Paris'")
    assert not outputs_agree("top token ' Paris' 0.412", "top token ' Rome' 0.412")  # a different top token
    assert not outputs_agree("L3H4 0.5", "L3H5 0.5")  # another head
    assert not outputs_agree("a 1.0 b 2.0", "a 1.0 b 2.0 c 3.0")  # another row
    assert outputs_agree("<td>3257.370</td><td>L3H4</td>", "<td>3257.368</td><td>L3H4</td>")


def _notebook(path, source: str, committed: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=committed)]
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


@pytest.mark.parametrize(
    "printed, passes",
    [
        ("3257.368 ' Paris'", True),  # float noise
        ("3300.000 ' Paris'", False),  # 3257 -> 3300
        ("3257.370 ' Rome'", False),  # a different top token
    ],
)
def test_nbval_with_the_plugin(tmp_path, printed, passes):
    """The plugin inside a real nbval run: a committed '3257.370 ' Paris'' against what the cell prints now."""
    nb = tmp_path / "chapter.ipynb"
    _notebook(nb, f"print({printed!r})", "3257.370 ' Paris'\n")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
         "-p", "mechbook.book.nbval_tolerance", str(nb)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )
    assert (run.returncode == 0) == passes, run.stdout[-2000:]
