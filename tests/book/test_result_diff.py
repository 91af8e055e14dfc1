"""Fresh results against committed ones: float noise passes, every real change fails, and says where."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import numpy as np
import pandas as pd
import pytest

from mechbook.book.result_diff import (
    ATOL,
    RANK_RTOL,
    column_kind,
    compare_chapter,
    compare_json,
    compare_tables,
    float_mismatches,
    rank_mismatches,
)
from mechbook.book.results import CSV_FLOAT_FORMAT, ChapterResults
from mechbook.core.errors import MechbookError

REPO = Path(__file__).resolve().parents[2]
COMMITTED = REPO / "results"


def _table(**columns) -> pd.DataFrame:
    """A table as the comparison reads it: every cell the string the CSV holds."""
    return pd.DataFrame({name: [str(v) for v in values] for name, values in columns.items()})


ITEMS = dict(item=["Afghanistan", "Armenia", "Austria"], answer=[" Kabul", " Yerevan", " Vienna"],
             answer_rank=[1, 1, 2], answer_prob=[0.5822, 0.73021, 0.00012], n=[84, 84, 84])


def _changed(**change) -> pd.DataFrame:
    columns = {k: list(v) for k, v in ITEMS.items()}
    for name, (row, value) in change.items():
        columns[name][row] = value
    return _table(**columns)


def test_the_same_table_has_no_differences():
    assert compare_tables("accuracy.csv", _table(**ITEMS), _table(**ITEMS)) == []


@pytest.mark.parametrize(
    "change",
    [
        {"answer_prob": (1, "0.73022")},  # one unit in the fifth digit: the rounding of the written table
        {"answer_prob": (2, "0.00022")},  # near zero, moved by 1e-4 in a column of order 1 (a4's mlp_effects)
        {"answer_prob": (2, "-1e-05")},  # a sign flip within the noise floor
    ],
)
def test_float_noise_passes(change):
    assert compare_tables("accuracy.csv", _table(**ITEMS), _changed(**change)) == []


@pytest.mark.parametrize(
    "change, why",
    [
        ({"answer": (1, " Paris")}, "text must be equal"),  # another token
        ({"item": (0, "afghanistan")}, "text must be equal"),
        ({"n": (2, "85")}, "whole numbers must be equal"),  # a count
        ({"answer_rank": (2, "3")}, "rank moved by 1"),  # a rank near the top is exact
        ({"answer_prob": (1, "0.7322")}, "beyond float noise"),  # 3e-3 in a column of order 1
        ({"answer_prob": (1, "-0.73021")}, "sign flip"),
        ({"answer_prob": (1, "")}, "one side only"),  # NaN against a value
    ],
)
def test_real_changes_fail(change, why):
    diffs = compare_tables("accuracy.csv", _table(**ITEMS), _changed(**change))
    assert len(diffs) == 1 and why in diffs[0].why, diffs


def test_a_failure_names_file_column_row_and_both_values():
    (diff,) = compare_tables("accuracy.csv", _table(**ITEMS), _changed(answer_prob=(1, "0.8")))
    assert (diff.file, diff.column, diff.committed, diff.fresh) == ("accuracy.csv", "answer_prob", "0.73021", "0.8")
    text = str(diff)
    for part in ("accuracy.csv", "column 'answer_prob'", "row 1 (item=Armenia, answer=' Yerevan', n=84)",
                 "committed 0.73021", "fresh 0.8"):
        assert part in text, text
    (diff,) = compare_tables("accuracy.csv", _table(**ITEMS), _changed(answer=(0, " Kandahar")))
    assert "committed ' Kabul', fresh ' Kandahar'" in str(diff)  # text quoted: the leading space shows


def test_nan_equals_nan_and_infinities_only_themselves():
    a, b = np.array([np.nan, np.inf, 1.0]), np.array([np.nan, np.inf, 1.0])
    assert float_mismatches(a, b) == []
    assert [i for i, _ in float_mismatches(a, np.array([0.0, -np.inf, 1.0]))] == [0, 1]


def test_float_scale_is_the_columns_largest_magnitude():
    # 1e-4 absolute is noise in a column of order 1, not in one whose values are all about 1e-3
    assert float_mismatches(np.array([1.0, 1e-3]), np.array([1.0, 1.1e-3])) == []
    assert float_mismatches(np.array([2e-3, 1e-3]), np.array([2e-3, 1.1e-3])) != []
    # the floor is ATOL of the scale: just under passes, twice over fails
    assert float_mismatches(np.array([10.0, 0.0]), np.array([10.0, 0.9 * ATOL * 10])) == []
    assert float_mismatches(np.array([10.0, 0.0]), np.array([10.0, 2 * ATOL * 10])) != []


def test_ranks_far_from_the_top_may_move_a_little():
    # a1's lens.csv on a fresh clone: ranks above 1,000 moved by up to 2
    assert rank_mismatches(np.array([5635, 1001, 25684]), np.array([5637, 1003, 25682])) == []
    assert rank_mismatches(np.array([1000.0]), np.array([1000 + 1000 * RANK_RTOL])) == []
    assert [i for i, _ in rank_mismatches(np.array([5635, 150, 5, 1]), np.array([5700, 151, 6, 2]))] == [0, 1, 2, 3]
    assert rank_mismatches(np.array([13.5]), np.array([13.5])) == []  # medians of ranks
    assert rank_mismatches(np.array([np.nan]), np.array([3.0])) != []


@pytest.mark.parametrize(
    "name, values, kind",
    [
        ("seconds", ["188.82", "572.98"], "timing"),  # b7's runs.csv
        ("wall_seconds", ["53.6"], "timing"),
        ("rank", ["5635", "25684"], "rank"),
        ("median_rank_next", ["2.1692e+05", "3"], "rank"),
        ("reciprocal_rank", ["0.00017746", "1"], "float"),
        ("n_prompts", ["16", "8"], "whole"),
        ("score", ["80.286", ""], "float"),
        ("head", ["2.1", "3.3"], "text"),  # head labels in the papers' notation
        ("sender", ["2.1", "12.0"], "text"),
        ("heads_lowest", ["12.0"], "text"),  # %.5g never writes 12.0: a label
        ("token lengths", ["29", "28, 29"], "text"),
        ("correct", ["True", "False"], "text"),
    ],
)
def test_column_kinds(name, values, kind):
    assert column_kind(name, values) == kind


def test_head_labels_compare_as_text():
    committed = _table(component=["2.1", "4.10"], score=[80.3, 79.1])
    assert compare_tables("edges.csv", committed, _table(component=["2.10", "4.10"], score=[80.3, 79.1])) != []
    assert compare_tables("edges.csv", committed, _table(component=["2.1", "4.11"], score=[80.3, 79.1])) != []


def test_timing_columns_are_not_results():
    committed = _table(task=["numerals"], score=[81.652], seconds=[188.82])
    assert compare_tables("runs.csv", committed, _table(task=["numerals"], score=[81.652], seconds=[250.1])) == []


def test_missing_rows_and_columns_fail():
    committed = _table(**ITEMS)
    fewer = committed.iloc[:2]
    (diff,) = compare_tables("accuracy.csv", committed, fewer)
    assert (diff.committed, diff.fresh) == ("3 rows", "2 rows")
    diffs = compare_tables("accuracy.csv", committed, committed.drop(columns=["answer_prob"]))
    assert [(d.column, d.committed, d.fresh) for d in diffs] == [("answer_prob", "present", "missing")]
    diffs = compare_tables("accuracy.csv", committed, committed.assign(extra="x"))
    assert [(d.column, d.committed, d.fresh) for d in diffs] == [("extra", "missing", "present")]
    reordered = committed[list(reversed(committed.columns))]
    assert [d.why for d in compare_tables("accuracy.csv", committed, reordered)] == ["columns in another order"]


def test_json_floats_within_noise_all_else_exactly():
    committed = {"vectors": [{"name": "capitals", "layer": 12, "norm": 3104.22998046875},
                             {"name": "capitalize", "layer": 15, "norm": 2589.23095703125}],
                 "provenance": {"started": "2026-12-02T12:53:55Z"}, "wall_seconds": 53.6}
    fresh = json.loads(json.dumps(committed))
    fresh["vectors"][0]["norm"] = 3104.2301  # float noise
    fresh["provenance"] = {"started": "2027-01-01T00:00:00Z"}  # provenance and timings are not results
    fresh["wall_seconds"] = 99.0
    assert compare_json("o_vectors.json", committed, fresh) == []
    fresh["vectors"][0]["norm"] = 3200.0
    fresh["vectors"][1]["layer"] = 14
    diffs = compare_json("o_vectors.json", committed, fresh)
    assert [(d.column, d.fresh) for d in diffs] == [("vectors[0].norm", "3200.0"), ("vectors[1].layer", "14")]
    assert compare_json("key_heads.json", {"key_heads": ["12.0", "9.3"]}, {"key_heads": ["12.0", "9.30"]}) != []
    assert compare_json("circuits.json", {"heads": [[2, 1], [3, 3]]}, {"heads": [[2, 1]]}) != []


def _copy(chapter: str, tmp_path: Path, model: str = "gemma3-270m") -> tuple[Path, Path]:
    committed = COMMITTED / model / chapter
    fresh = tmp_path / model / chapter
    shutil.copytree(committed, fresh)
    return committed, fresh


def _rewrite(path: Path, change) -> None:
    """Rewrite a committed CSV as the results writer would, after ``change`` edits its parsed table."""
    table = pd.read_csv(path)
    change(table)
    table.to_csv(path, index=False, float_format=CSV_FLOAT_FORMAT)


def test_committed_results_equal_themselves():
    folders = sorted(p for p in COMMITTED.glob("*/*") if p.is_dir())
    assert len(folders) >= 20
    for folder in folders:
        assert compare_chapter(folder, folder) == [], folder


def test_a_perturbed_copy_of_committed_results(tmp_path):
    """Float noise on a4's tables passes; a changed value, a new file and a lost file fail."""
    committed, fresh = _copy("a4_ffn_update", tmp_path)
    rng = np.random.default_rng(0)

    def noise(table):
        for col in ("answer_rr_before", "margin_after", "rr_jump", "margin_gain"):
            values = table[col].to_numpy()
            scale = np.abs(values).max()
            table[col] = values * (1 + 1e-6 * rng.standard_normal(len(values))) + 1e-4 * scale * (np.abs(values) < 1e-3)

    _rewrite(fresh / "mlp_effects.csv", noise)
    marker = json.loads((fresh / "_complete.json").read_text())
    marker["provenance"]["wall_seconds"] = 1.0  # the marker is not compared
    (fresh / "_complete.json").write_text(json.dumps(marker))
    assert (fresh / "mlp_effects.csv").read_bytes() != (committed / "mlp_effects.csv").read_bytes()
    assert compare_chapter(committed, fresh) == []

    def real(table):
        table.loc[7, "margin_gain"] = -table.loc[7, "margin_gain"]

    _rewrite(fresh / "function_layer_prompts.csv", real)
    (fresh / "o_vectors.json").unlink()
    (fresh / "notes.txt").write_text("new\n")
    diffs = compare_chapter(committed, fresh)
    assert [(d.file, d.column, d.row.split()[0] if d.row else None) for d in diffs] == [
        ("o_vectors.json", None, None), ("notes.txt", None, None), ("function_layer_prompts.csv", "margin_gain", "7")]
    assert "sign flip" in diffs[2].why and "row 7 (task=capitals, prompt=" in str(diffs[2])


def test_ranks_moved_as_on_a_fresh_clone(tmp_path):
    """a1's lens.csv: ranks above 1,000 moved by 2 pass; a rank near the top moved by 1 fails."""
    committed, fresh = _copy("a1_logit_lens_capitals", tmp_path)
    ranks = pd.read_csv(committed / "lens.csv")["rank"]
    far, near = ranks[ranks > 1000].index[:81], ranks[ranks.between(2, 100)].index[0]
    _rewrite(fresh / "lens.csv", lambda t: t.__setitem__("rank", t["rank"].where(~t.index.isin(far), t["rank"] + 2)))
    assert compare_chapter(committed, fresh) == []
    _rewrite(fresh / "lens.csv", lambda t: t.loc.__setitem__((near, "rank"), t.loc[near, "rank"] + 1))
    (diff,) = compare_chapter(committed, fresh)
    assert (diff.file, diff.column, diff.row.split()[0]) == ("lens.csv", "rank", str(near))


def test_safetensors_within_noise(tmp_path):
    """a4's o vectors: noise in the last bits passes; one element changed, another dtype or metadata fail."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    committed, fresh = _copy("a4_ffn_update", tmp_path)
    path = fresh / "o_vectors" / "capitals.safetensors"
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    (name, vector), = load_file(path).items()
    save_file({name: vector * (1 + 1e-7)}, path, metadata=metadata)
    assert compare_chapter(committed, fresh) == []
    changed = vector.clone()
    changed[3] = changed[3] + 0.01 * vector.abs().max()
    save_file({name: changed}, path, metadata=metadata)
    (diff,) = compare_chapter(committed, fresh)
    assert (diff.file, diff.column, diff.row) == ("o_vectors/capitals.safetensors", name, "(3,)")
    save_file({name: vector.to(torch.float16)}, path, metadata=metadata)
    assert "dtype" in compare_chapter(committed, fresh)[0].why
    save_file({name: vector}, path, metadata={**metadata, "layer": "13"})
    assert [d.column for d in compare_chapter(committed, fresh)] == ["(metadata)"]


def test_a_folder_that_is_not_committed(tmp_path):
    fresh = tmp_path / "gemma3-270m" / "z9_new"
    fresh.mkdir(parents=True)
    (diff,) = compare_chapter(tmp_path / "nowhere", fresh)
    assert "not committed" in diff.why
    with pytest.raises(MechbookError, match=r"is not a chapter's results folder; pass the folder") as caught:
        compare_chapter(COMMITTED / "gemma3-270m" / "a1_logit_lens_capitals", tmp_path / "nowhere")
    assert "\n" not in str(caught.value)


# The plugin inside a real nbval run: a tiny project whose chapters each publish a table.

CELL = """
import pandas as pd
from mechbook.book.results import ChapterResults
saved = ChapterResults({chapter!r}, "tiny")
saved.save("table", pd.DataFrame({{"item": ["a", "b"], "value": [0.5, {value}]}}))
path = saved.finish()
"""
# chapter -> what its cell publishes now (None: nothing); each has committed "value": [0.5, 0.25]
CHAPTERS = {"x1_same": "0.25", "x2_noise": "0.2500001", "x3_changed": "0.3", "x4_silent": None}


def _project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    (root / "book").mkdir(parents=True)
    (root / "_toc.yml").write_text("root: intro\n")
    for chapter, value in CHAPTERS.items():
        nb = nbformat.v4.new_notebook()
        source = CELL.format(chapter=chapter, value=value) if value else "x = 1"
        nb.cells = [nbformat.v4.new_code_cell(source, execution_count=1)]
        nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
        nbformat.write(nb, root / "book" / f"{chapter}.ipynb")
        saved = ChapterResults(chapter, "tiny", root=root / "results")
        saved.save("table", pd.DataFrame({"item": ["a", "b"], "value": [0.5, 0.25]}))
        saved.finish()
    return root


def _nbval(root: Path, results: Path | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "MECHBOOK_RESULTS"}
    if results is not None:
        shutil.copytree(root / "results", results)
        env["MECHBOOK_RESULTS"] = str(results)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "lib"), env.get("PYTHONPATH", "")])
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-v", "-p", "no:cacheprovider", "--nbval", "--nbval-current-env",
         "-p", "mechbook.book.nbval_results", "book"],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
    )


def test_plugin_compares_what_each_chapter_published(tmp_path):
    """Same and noise pass; a changed value fails naming it; a chapter that stopped publishing fails."""
    run = _nbval(_project(tmp_path), tmp_path / "fresh")
    out = run.stdout
    for chapter, outcome in [("x1_same", "PASSED"), ("x2_noise", "PASSED"), ("x3_changed", "FAILED"),
                             ("x4_silent", "FAILED")]:
        assert f"book/{chapter}.ipynb::published results {outcome}" in out, out[-4000:]
    assert "tiny/x3_changed: 1 difference(s)" in out, out[-4000:]
    assert "table.csv, column 'value', row 1 (item=b): committed 0.25, fresh 0.3" in out, out[-4000:]
    assert "x4_silent.ipynb ran every cell but re-published none of its committed results (tiny/x4_silent)" in out, \
        out[-4000:]
    assert "2 failed, 6 passed" in out, out[-4000:]  # the four cells ran without error


def test_plugin_adds_nothing_without_a_results_copy(tmp_path):
    run = _nbval(_project(tmp_path), None)  # the chapters publish into the project's results/ themselves
    assert run.returncode == 0 and "4 passed" in run.stdout and "published results" not in run.stdout, \
        run.stdout[-3000:]
