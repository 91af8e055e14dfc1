"""nbval's comparison made tolerant of float noise, and of nothing else."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys

import nbformat
import numpy as np
import pandas as pd
import pytest

from mechbook.book import tables
from mechbook.book.nbval_tolerance import (
    ATOL,
    MIN_DIGITS,
    RTOL,
    numbers_close,
    outputs_agree,
    tables_agree,
    tables_differ,
    values_agree,
)


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("3257.3701", "3257.3684"),  # a4's norm on another CPU: relative 5e-7
        ("22.628", "22.627"),  # 5 digits: one unit in the last is 4e-5 relative
        ("0.12346", "0.12345"),  # a rounding flip at 5 significant digits
        ("1.0000", "0.99999"),
        ("1.2346e-05", "1.2347e-05"),
        ("-3.1416", "-3.1415"),
    ],
)
def test_float_noise_at_five_significant_digits_is_accepted(committed, fresh):
    assert numbers_close(committed, fresh)
    assert abs(float(committed) - float(fresh)) <= RTOL * abs(float(committed)) + ATOL


@pytest.mark.parametrize("value", [3257.3701234, 0.123456789, 22.62843, 1.23456789e-5, -0.98765432, 7.5e-3 + 1e-9])
def test_relative_noise_of_1e_6_passes_at_five_significant_digits(value):
    # "#" keeps trailing zeros: "{:.5g}" prints 0.0075000 as "0.0075", 2 digits, which is exact
    for printed in ("{:#.5g}", "{:#.6g}", "{:.4e}"):
        committed, fresh = printed.format(value), printed.format(value * (1 + 1e-6))
        assert outputs_agree(f"p = {committed} ' Paris'", f"p = {fresh} ' Paris'")


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("0.0000", "-0.0000"),  # a zero whose sign is float noise
        ("0.00000", "3.0000e-07"),  # zero in exact arithmetic, computed in float32
        ("-2.0000e-07", "4.0000e-07"),  # both within the floor at zero
    ],
)
def test_values_at_zero_pass_within_the_floor(committed, fresh):
    assert numbers_close(committed, fresh)


@pytest.mark.parametrize(
    "committed, fresh",
    [
        ("3257.3701", "3300.0000"),  # a real change
        ("3257", "3258"),
        ("0.12346", "0.12360"),  # 1.1e-3 relative: beyond float noise
        ("0.0000", "0.0010"),  # 1e-3 away from zero
        ("-2.0000e-05", "2.0000e-05"),  # a sign flip beyond the floor
        ("12", "13"),  # whole numbers (ranks, counts, indices) are exact
        ("12", "12.000"),  # a whole number on one side is exact too
        ("1.0000", "nan"),
        ("1.0000", "inf"),
    ],
)
def test_real_changes_are_refused(committed, fresh):
    assert not numbers_close(committed, fresh)


# One test per case of issue 25, part 1: each change was accepted by the old rule.


def test_head_label_4_10_is_not_the_decimal_4_1():
    assert not outputs_agree("the shared heads include 4.10", "the shared heads include 4.11")
    assert not outputs_agree("head 4.10 then 6.1", "head 4.1 then 6.1")  # 4.10 is not 4.1


def test_head_label_5_1_is_a_label():
    assert not outputs_agree("5.1", "5.2")
    assert not outputs_agree("heads: 5.1 7.11 8.8", "heads: 5.2 7.11 8.8")


def test_c1_overlap_line_compares_heads_exactly():
    committed = "- In all three circuits: 8 heads (2.1 3.3 4.1 5.3 6.0 9.3 12.0 13.3) and 10 MLPs."
    assert not outputs_agree(committed, committed.replace("5.3", "5.2"))


def test_b3_edge_line_compares_heads_exactly():
    assert not outputs_agree("0  2.1 -> 13.3 (q)  4.637", "0  2.1 -> 13.2 (q)  4.637")
    assert not outputs_agree("0  2.1 -> 13.3 (q)  4.637", "0  2.0 -> 13.3 (q)  4.637")


def test_b5_twelve_point_zero_head_is_a_label():
    assert not outputs_agree("12.0 head", "12.1 head")
    assert not outputs_agree("12.0 head", "11.9 head")


def test_a_whole_number_before_a_full_stop_is_not_a_float():
    assert not outputs_agree("kept 84 of 246.", "kept 84 of 247.")


def test_a_layer_at_the_end_of_a_sentence_is_exact():
    assert not outputs_agree("the answer appears at layer 5.", "the answer appears at layer 6.")


def test_digits_in_prompt_text_are_exact():
    committed = "Van done in 1. Hat done in 2. Ring done in 3. Desk done in 4. Sun done in"
    assert not outputs_agree(committed, committed.replace("in 3.", "in 4."))
    tokens = "▁ | 1 | . | ▁Hat | ▁done | ▁in | ▁ | 2 | . |"
    assert not outputs_agree(tokens, tokens.replace("2", "3"))


def test_a_version_string_is_exact():
    assert not outputs_agree("torch 2.13.0+cpu, transformers 5.24.0", "torch 2.13.1+cpu, transformers 5.24.0")
    assert not outputs_agree("transformers 5.24.0", "transformers 5.25.0")


def test_a_coarse_number_is_exact():
    assert not outputs_agree("share 0.5", "share 0.6")


def test_a_sign_flip_at_zero_is_refused():
    assert not outputs_agree("effect 0.0", "effect -0.1")
    assert not outputs_agree("effect 0.0", "effect -0.0")  # a coarse zero is exact, sign included


def test_a_coarse_percentage_is_exact():
    assert not outputs_agree("solved 12.5% of the prompts", "solved 12.6% of the prompts")


def test_a_coarse_interval_is_exact():
    assert not outputs_agree("95% interval (0.81, 0.93)", "95% interval (0.82, 0.94)")


def test_a_float_with_fewer_than_min_digits_is_exact():
    assert MIN_DIGITS == 5
    assert not numbers_close("22.63", "22.62")  # 4 digits: could be a label, is exact
    assert numbers_close("22.628", "22.627")


def test_text_around_numbers_must_match():
    assert outputs_agree("capitals  rank 3  p=0.41235 ' Paris'", "capitals  rank 3  p=0.41234 ' Paris'")
    assert not outputs_agree("top token ' Paris' 0.41235", "top token ' Rome' 0.41235")  # a different top token
    assert not outputs_agree("L3H4 0.5", "L3H5 0.5")  # another head
    assert not outputs_agree("blocks.3.hook_mlp_out", "blocks.4.hook_mlp_out")
    assert not outputs_agree("a 1.0000 b 2.0000", "a 1.0000 b 2.0000 c 3.0000")  # another row
    assert outputs_agree("<td>3257.3701</td><td>L3H4</td>", "<td>3257.3684</td><td>L3H4</td>")


# Tables: the rounded text is the reader's; the unrounded content in the metadata is compared.


def _frame(scale: float = 1.0, **changes) -> pd.DataFrame:
    frame = pd.DataFrame(
        {"head": ["4.10", "5.1"], "kept": [84, 246], "score": [0.12350001, 0.98765432]},
        index=pd.Index(["capitals", "past_tense"], name="task"),
    )
    frame["score"] *= scale
    for column, values in changes.items():
        frame[column] = values
    return frame


def _display(frame: pd.DataFrame) -> tuple[str, str, dict]:
    """What the book's formatter writes for a frame: HTML and plain text (3 decimals), and the content."""
    tables._ids = itertools.count(1)  # the same table id, as the same cell of the same chapter gets
    with pd.option_context("display.precision", 3):
        html, metadata = tables.html_with_content(frame)
        plain = repr(frame)
    content = json.loads(json.dumps(metadata))[tables.METADATA_KEY]  # as the notebook stores it
    return html, plain, content


def test_table_noise_across_a_rounding_boundary_passes_with_the_unrounded_content():
    committed_html, committed_plain, committed = _display(_frame())
    fresh_html, fresh_plain, fresh = _display(_frame(scale=1 - 1e-7))  # 0.12350001 -> 0.12349999
    assert "0.124" in committed_html and "0.123" in fresh_html  # the rounded text flips
    assert not outputs_agree(committed_html, fresh_html)  # 3 decimals: too few for the text rule
    assert values_agree(committed_html, fresh_html, committed, fresh)
    assert values_agree(committed_plain, fresh_plain, committed, fresh)  # the text/plain repr too
    assert not values_agree(committed_html, fresh_html, None, fresh)  # committed without content: text rule


@pytest.mark.parametrize(
    "change",
    [
        {"head": ["4.11", "5.1"]},  # a label cell
        {"kept": [84, 247]},  # a whole number
        {"score": [0.1265, 0.98765432]},  # a float beyond noise (2% relative)
        {"score": [0.12350001, -0.98765432]},  # a sign
    ],
)
def test_a_real_change_in_a_table_fails_with_the_content_present(change):
    committed_html, committed_plain, committed = _display(_frame())
    fresh_html, fresh_plain, fresh = _display(_frame(**change))
    assert not tables_agree(committed, fresh)
    assert not values_agree(committed_html, fresh_html, committed, fresh)
    assert not values_agree(committed_plain, fresh_plain, committed, fresh)


def test_a_changed_index_label_fails_in_a_table():
    committed_html, _, committed = _display(_frame())
    frame = _frame()
    frame.index = pd.Index(["capitals", "capitalize"], name="task")
    fresh_html, _, fresh = _display(frame)
    assert not values_agree(committed_html, fresh_html, committed, fresh)


def test_a_change_that_rounding_hides_still_fails():
    committed_html, _, committed = _display(_frame())
    fresh_html, _, fresh = _display(_frame(score=[0.1238, 0.98765432]))
    assert committed_html == fresh_html  # nbval's text comparison alone would pass it
    outputs = [nbformat.v4.new_output("display_data", data={"text/html": committed_html},
                                      metadata={"text/html": {tables.METADATA_KEY: content}})
               for content in (committed, fresh)]
    assert "row 'capitals', column 'score': committed 0.12350001, now 0.1238" in tables_differ(outputs[1:], outputs[:1])
    assert tables_differ(outputs[:1], outputs[:1]) is None
    assert tables_differ(outputs[1:], [nbformat.v4.new_output("display_data", data={"text/html": ""})]) is None


def test_a_cell_near_zero_is_judged_against_its_columns_scale():
    committed = {"index_names": [None], "column_names": [None], "index": [0, 1], "columns": ["effect"],
                 "data": [[-125.31], [0.0123]]}
    noise = {**committed, "data": [[-125.31 * (1 + 1e-6)], [0.0123 + 2e-4]]}  # 2e-4 absolute: 1.6e-6 of 125
    assert tables_agree(committed, noise)
    for changed in ([[-125.31], [0.5]], [[-125.31], [-0.5]], [[-125.0], [0.0123]]):
        assert not tables_agree(committed, {**committed, "data": changed})
    alone = {**committed, "data": [[1.0], [0.0123]]}  # a column of scale 1: the same move is a change
    assert not tables_agree(alone, {**alone, "data": [[1.0], [0.0125]]})


def test_numbers_formatted_into_a_table_cell_follow_the_text_rule():
    """b4 prints "-4.0010 ± 6.8051" into a cell and a1 "'｣' 0.028890": with another SIMD kernel (AVX2 for
    AVX-512) they read "-4.0011 ± 6.8050" and "'｣' 0.028891", which is float noise; a label beside them is not."""
    def table(*cells):
        return {"index_names": [None], "column_names": [None], "index": ["numerals"], "columns": ["random"],
                "data": [list(cells)]}

    assert tables_agree(table("-4.0010 ± 6.8051"), table("-4.0011 ± 6.8050"))
    assert tables_agree(table("'｣' 0.028890"), table("'｣' 0.028891"))
    for changed in ("-4.0010 ± 6.9051", "4.0010 ± 6.8051", "'」' 0.028890", "-4.0 ± 6.8051"):
        assert not tables_agree(table("-4.0010 ± 6.8051" if "±" in changed else "'｣' 0.028890"), table(changed))
    head = {**table("x"), "columns": ["head"]}
    assert not tables_agree({**head, "data": [["4.10"]]}, {**head, "data": [["4.11"]]})  # too few digits: a label
    labels = {**table(1.0), "index": ["4.10 head"]}
    assert not tables_agree(labels, {**labels, "index": ["4.11 head"]})  # index labels exactly


def test_table_content_keeps_types_and_missing_values():
    frame = pd.DataFrame({"n": np.array([3, 4], dtype=np.int64), "x": np.array([0.5, np.nan], dtype=np.float32),
                          "ok": [True, False], "token": [" Paris", None]})
    content = json.loads(json.dumps(tables.table_content(frame), allow_nan=False))  # valid JSON: no NaN
    assert content["data"] == [[3, 0.5, True, " Paris"], [4, None, False, None]]
    assert content["columns"] == ["n", "x", "ok", "token"] and content["index"] == [0, 1]
    assert type(content["data"][0][0]) is int and type(content["data"][0][1]) is float
    assert not tables_agree(content, {**content, "data": [[3.0, 0.5, True, " Paris"], [4, None, False, None]]})


def test_a_truncated_table_carries_its_head_and_tail():
    frame = pd.DataFrame({"x": np.arange(100) / 7})
    with pd.option_context("display.max_rows", 20, "display.min_rows", 10):
        content = tables.table_content(frame)
    assert content["index"] == [0, 1, 2, 3, 4, 95, 96, 97, 98, 99]


def test_the_ipython_formatter_puts_the_content_in_metadata_and_leaves_the_html_unchanged():
    from IPython.core.formatters import DisplayFormatter

    formatter = DisplayFormatter()
    formatter.formatters["text/html"].for_type(pd.DataFrame, tables.html_with_content)
    frame = _frame()
    with pd.option_context("display.precision", 3):
        data, metadata = formatter.format(frame)
        expected_html = tables.to_html(frame)
    strip_ids = re.compile(r"mb\d+")
    assert strip_ids.sub("", data["text/html"]) == strip_ids.sub("", expected_html)  # what the book renders
    assert "text/plain" in data
    assert metadata["text/html"][tables.METADATA_KEY]["data"][0] == ["4.10", 84, 0.12350001]


def _notebook(path, source: str, committed: str) -> None:
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text=committed)]
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def _nbval(path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
         "-p", "mechbook.book.nbval_tolerance", str(path)],
        cwd=path.parent, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize(
    "printed, passes",
    [
        ("3257.3684 ' Paris' head 4.10", True),  # float noise
        ("3300.0000 ' Paris' head 4.10", False),  # 3257 -> 3300
        ("3257.3701 ' Rome' head 4.10", False),  # a different top token
        ("3257.3701 ' Paris' head 4.11", False),  # another head
    ],
)
def test_nbval_with_the_plugin(tmp_path, printed, passes):
    """The plugin inside a real nbval run: a committed line against what the cell prints now."""
    nb = tmp_path / "chapter.ipynb"
    _notebook(nb, f"print({printed!r})", "3257.3701 ' Paris' head 4.10\n")
    run = _nbval(nb)
    assert (run.returncode == 0) == passes, run.stdout[-2000:]


@pytest.mark.parametrize(
    "scores, passes",
    [
        ("0.12350001 * (1 - 1e-7), 0.98765432", True),  # noise that moves a rounded digit
        ("0.12350001 * 1.01, 0.98765432", False),  # visible in the rounded text
        ("0.12350001 * 1.003, 0.98765432", False),  # hidden by rounding: still a change
    ],
)
def test_nbval_reads_a_tables_unrounded_content(tmp_path, scores, passes):
    """A real nbval run of a cell that displays a table: the committed output is the book's, unscaled."""
    from IPython.core.formatters import DisplayFormatter

    formatter = DisplayFormatter()
    formatter.formatters["text/html"].for_type(pd.DataFrame, tables.html_with_content)
    tables._ids = itertools.count(1)  # the table id a fresh kernel gives its first table
    with pd.option_context("display.precision", 3):
        data, metadata = formatter.format(_frame())
    source = (
        "import pandas as pd\nfrom mechbook.book import tables\n"
        "get_ipython().display_formatter.formatters['text/html'].for_type(pd.DataFrame, tables.html_with_content)\n"
        "pd.set_option('display.precision', 3)\n"
        f"frame = pd.DataFrame({{'head': ['4.10', '5.1'], 'kept': [84, 246], "
        f"'score': [{scores}]}}, "
        "index=pd.Index(['capitals', 'past_tense'], name='task'))\nframe"
    )
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell(source, execution_count=1)
    cell.outputs = [nbformat.v4.new_output("execute_result", data=data, metadata=metadata, execution_count=1)]
    nb.cells = [cell]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    path = tmp_path / "chapter.ipynb"
    nbformat.write(nb, path)
    run = _nbval(path)
    assert (run.returncode == 0) == passes, run.stdout[-2000:]
