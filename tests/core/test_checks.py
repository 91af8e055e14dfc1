"""The one table of run parameters: what the library's calls and ``mechbook run -p`` both accept."""

from __future__ import annotations

import numpy as np
import pytest

from mechbook.book import cli
from mechbook.core import checks
from mechbook.core.errors import MechbookError


def test_the_cli_reads_the_librarys_table():
    assert cli.PARAMETER_RANGES is checks.PARAMETERS


@pytest.mark.parametrize(("name", "value", "plain"), [
    ("n_prompts", np.int64(16), 16), ("seed", np.uint8(3), 3), ("threshold", np.float32(0.5), 0.5),
    ("threshold", 1, 1.0), ("sizes", [np.int32(8), 16], [8, 16]), ("add_scale", -2, -2.0),
])
def test_numpy_numbers_are_numbers(name, value, plain):
    got = checks.check(name, value)
    assert got == plain and type(got) is type(plain)  # handed on as plain Python numbers


@pytest.mark.parametrize(("name", "value", "message"), [
    ("threshold", 0, "threshold = 0 is out of range: it must be a fraction of the full model's score (> 0 and <= 1); "
                     "pass e.g. threshold=0.2"),
    ("n_prompts", True, "n_prompts = True is out of range"),
    ("n_prompts", np.bool_(True), "is out of range"),
    ("n_prompts", 2.0, "it must be a count of prompts (>= 1)"),
    ("ratio", float("nan"), "ratio = nan is out of range"),
    ("add_scale", 1e20, "add_scale = 1e+20 is out of range: it must be a weight (>= -100 and <= 100)"),
    ("seeds", [], "seeds = [] is out of range"),
    ("tasks", [], "tasks = [] is out of range: it must be a list of task names (a non-empty list of distinct names)"),
    ("tasks", ["a", "a"], "tasks = ['a', 'a'] is out of range"),
])
def test_values_outside_the_table_are_one_line_errors(name, value, message):
    with pytest.raises(MechbookError) as caught:
        checks.check(name, value)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_the_callers_argument_name_none_and_known_names():
    assert checks.check("n_prompts", None, none=True) is None
    with pytest.raises(MechbookError, match=r"^n = 0 is out of range: .* or None; pass e.g. n=1$"):
        checks.check("n_prompts", 0, argument="n", none=True)
    assert checks.check("tasks", ("b", "a"), known=["a", "b"]) == ["b", "a"]
    with pytest.raises(MechbookError, match=r"^tasks = \['a', 'x'\] names unknown 'x'; known: a, b$"):
        checks.check("tasks", ["a", "x"], known=["a", "b"])

