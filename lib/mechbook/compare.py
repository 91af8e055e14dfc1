"""Setting models side by side: the chapters' saved results, stacked, beside the papers' numbers.

Reads whatever complete chapter results exist under the results folder (one folder per
model, see :mod:`mechbook.results`), so a new run on another model shows up without
code changes. Numbers the papers report for their own models are kept here, each with
where it comes from, and are always marked as the paper's.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from mechbook.errors import MechbookError
from mechbook.results import load_table

# The papers' numbers, as (quantity, task, model, value, source). Only what PAPERS.md lists.
PAPER_NUMBERS = pd.DataFrame(
    [
        ("function layer, fraction of depth", "capitals", "GPT-2 medium (paper)", 2 / 3, "Paper A §3: about 2/3 of the way"),
        ("transplant failure, in-domain", "capitals", "GPT-2 (paper)", 0.37, "Paper A §4"),
        ("transplant failure, out-of-domain", "capitals", "GPT-2 (paper)", 0.20, "Paper A §4"),
        ("transplant failure, in-domain", "uppercase", "GPT-2 (paper)", 0.04, "Paper A §4"),
        ("transplant failure, out-of-domain", "uppercase", "GPT-2 (paper)", 0.05, "Paper A §4"),
        ("transplant failure, in-domain", "past_tense", "GPT-2 (paper)", 0.19, "Paper A §4"),
        ("transplant failure, out-of-domain", "past_tense", "GPT-2 (paper)", 0.22, "Paper A §4"),
        ("circuit score on numerals (%)", "numerals circuit", "GPT-2 small (paper)", 81.0, "Paper B, cross-task table"),
        ("circuit score on number words (%)", "numerals circuit", "GPT-2 small (paper)", 48.4, "Paper B, cross-task table"),
        ("circuit score on numerals (%)", "numwords circuit", "GPT-2 small (paper)", 87.3, "Paper B, cross-task table"),
        ("circuit score on number words (%)", "numwords circuit", "GPT-2 small (paper)", 81.1, "Paper B, cross-task table"),
        ("circuit score on numerals (%)", "months circuit", "GPT-2 small (paper)", 43.7, "Paper B, cross-task table"),
        ("circuit score on number words (%)", "months circuit", "GPT-2 small (paper)", 32.4, "Paper B, cross-task table"),
        ("circuit heads", "numerals", "GPT-2 small (paper)", 14, "Paper B circuit files"),
        ("circuit heads", "numwords", "GPT-2 small (paper)", 19, "Paper B circuit files"),
        ("circuit heads", "months", "GPT-2 small (paper)", 13, "Paper B circuit files"),
    ],
    columns=["quantity", "task", "model", "value", "source"],
)


def collect(chapter: str, name: str, root: str | Path | None = None) -> pd.DataFrame | None:
    """A chapter's table across every model that has complete results, or None if no model has."""
    try:
        return load_table(chapter, name, root=root)
    except MechbookError:
        return None


def paper_rows(quantity_prefix: str) -> pd.DataFrame:
    """The papers' numbers whose quantity starts with ``quantity_prefix``."""
    return PAPER_NUMBERS[PAPER_NUMBERS.quantity.str.startswith(quantity_prefix)].reset_index(drop=True)
