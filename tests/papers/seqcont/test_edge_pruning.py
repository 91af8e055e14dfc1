"""The kept edges of chapter b3, counted."""

from __future__ import annotations

import pytest

from mechbook import MechbookError
from mechbook.papers.seqcont.edge_pruning import edge_counts


def test_edge_counts(edge_table):
    counts = edge_counts(edge_table)
    assert list(counts["task"].unique()) == ["numerals", "months"]  # first-seen order of the tasks
    numerals = counts[counts.task == "numerals"].set_index("input")
    assert list(numerals.index) == ["q", "k", "v", "resid", "all"]
    assert numerals.loc["all", "tested"] == 4 and numerals.loc["all", "kept"] == 3
    assert numerals.loc["k", "kept"] == 0 and numerals.loc["v", "share_kept"] == 1.0
    with pytest.raises(MechbookError, match="task column"):
        edge_counts(edge_table.drop(columns="task"))
