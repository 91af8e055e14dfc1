"""The kept edges of chapter b3, counted."""

from __future__ import annotations

import pandas as pd
import pytest

from mechbook import MechbookError
from mechbook.core.circuits import RESID
from mechbook.papers.seqcont.edge_pruning import edge_counts


def _table():
    rows = [("numerals", "0.1", "2.0", "q", 70.0), ("numerals", "0.1", "2.0", "k", 90.0),
            ("numerals", "1.2", "2.0", "v", 50.0), ("numerals", "2.0", RESID, "resid", 40.0),
            ("months", "0.1", "1.2", "k", 95.0), ("months", "1.2", RESID, "resid", 60.0)]
    df = pd.DataFrame(rows, columns=["task", "sender", "receiver", "input", "score"])
    df["kept"] = df["score"] < 80
    df["sender_kind"] = "head"
    df["sender_layer"] = df["sender"].str.split(".").str[0].astype(int)
    df["sender_head"] = df["sender"].str.split(".").str[1].astype(int)
    return df


def test_edge_counts():
    counts = edge_counts(_table())
    assert list(counts["task"].unique()) == ["numerals", "months"]  # first-seen order of the tasks
    numerals = counts[counts.task == "numerals"].set_index("input")
    assert list(numerals.index) == ["q", "k", "v", "resid", "all"]
    assert numerals.loc["all", "tested"] == 4 and numerals.loc["all", "kept"] == 3
    assert numerals.loc["k", "kept"] == 0 and numerals.loc["v", "share_kept"] == 1.0
    with pytest.raises(MechbookError, match="task column"):
        edge_counts(_table().drop(columns="task"))
