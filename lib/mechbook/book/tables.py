"""How the chapters' tables look: a missing value is "–", the papers' numbers are marked.

:func:`install` (called by :func:`mechbook.book.plots.setup`, which every chapter runs
first) makes IPython render every DataFrame through :func:`to_html`. Where a row has no
number (the paper reports none for that task, a stage that never happened) the cell
shows "–" instead of NaN; columns whose name says they are the paper's ("GPT-2 small
(paper)", "paper_fraction") and rows that belong to a paper's model are set in grey
italics on a grey ground, with a caption saying so, as the figures draw the papers'
models in grey. The chapters' code and the tables they save are unchanged: only the
HTML the book shows is.

The HTML rounds floats to pandas' ``display.precision`` (3 in the book), and float noise
from another CPU or thread count can move a rounded digit. So each DataFrame's display
also carries the frame's unrounded content in the output's metadata
(:func:`table_content`, under :data:`METADATA_KEY`), which the nbval plugin
(:mod:`mechbook.book.nbval_tolerance`) compares when the rounded text differs. Renderers
(Jupyter, myst-nb) ignore output metadata, so the page is unchanged.
"""

from __future__ import annotations

import itertools
import math
import re
from typing import Any

import numpy as np
import pandas as pd

MISSING = "–"
PAPER = re.compile(r"(?<![a-z])paper(?![a-z])", re.IGNORECASE)  # "GPT-2 small (paper)", "paper_layer", "n_paper"
PAPER_ROW = re.compile(r"\(paper", re.IGNORECASE)  # a row naming a paper's model: "GPT-2 small (paper)", "(paper, BLOOM"
PAPER_STYLE = "color: #57606a; font-style: italic; background-color: #eef0f2"
CAPTION = "Grey, in italics: numbers the paper reports for its own models. –: no number for that row."
METADATA_KEY = "mechbook_table"  # output.metadata["text/html"][METADATA_KEY]: the unrounded content
_ids = itertools.count(1)


def _labels(label: Any) -> tuple:
    return label if isinstance(label, tuple) else (label,)


def paper_columns(frame: pd.DataFrame) -> list[bool]:
    """Per column: does its name (any level) say it holds a paper's numbers?"""
    return [any(PAPER.search(str(part)) for part in _labels(c)) for c in frame.columns]


def paper_rows(frame: pd.DataFrame) -> list[bool]:
    """Per row: does its index label (any level) or one of its text cells name a paper's model?"""
    text = frame.select_dtypes(include=["object", "string"])
    flags = []
    for i, label in enumerate(frame.index):
        in_label = any(PAPER_ROW.search(str(part)) or str(part).endswith("(paper)") for part in _labels(label))
        in_cells = any(isinstance(v, str) and PAPER_ROW.search(v) for v in text.iloc[i]) if len(text.columns) else False
        flags.append(bool(in_label or in_cells))
    return flags


def to_html(frame: pd.DataFrame) -> str:
    """The HTML of a DataFrame as the book shows it: "–" for missing values, the papers' numbers marked.

    Follows pandas' display options (precision, max_rows, max_columns); a frame too large
    to show whole is truncated as pandas would, with "–" but without the marking.
    """
    max_rows = pd.get_option("display.max_rows")
    max_cols = pd.get_option("display.max_columns")
    if (max_rows and len(frame) > max_rows) or (max_cols and len(frame.columns) > max_cols):
        shown = pd.get_option("display.min_rows") or max_rows  # pandas shows min_rows of a long frame, head and tail
        return frame.to_html(notebook=True, na_rep=MISSING, max_rows=shown, max_cols=max_cols,
                             show_dimensions=pd.get_option("display.show_dimensions"))
    styler = frame.style
    styler.set_uuid(f"mb{next(_ids)}")  # deterministic ids: the same notebook run gives the same HTML
    styler.cell_ids = False
    styler.format(precision=pd.get_option("display.precision"), na_rep=MISSING)
    styler.set_table_attributes('class="dataframe"')
    columns, rows = paper_columns(frame), paper_rows(frame)
    if any(columns) or any(rows):
        styles = pd.DataFrame([[PAPER_STYLE if col or row else "" for col in columns] for row in rows],
                              index=frame.index, columns=frame.columns)
        styler.apply(lambda _: styles, axis=None)
        styler.map_index(lambda label: PAPER_STYLE if PAPER.search(str(label)) else "", axis=1)
        styler.set_caption(CAPTION)
        styler.set_table_styles([{"selector": "caption", "props": "caption-side: bottom; font-size: 0.85em; "
                                  "color: #57606a; text-align: left; padding-top: 0.3em"}])
    return styler.to_html()


def _scalar(value: Any) -> Any:
    """One cell or label as JSON: text and whole numbers as they are, floats unrounded, missing as null.

    Non-finite floats become the strings "inf" / "-inf" (JSON has no infinity); anything
    else (tuples, timestamps, categories) becomes its ``str``, compared as text.
    """
    if value is None or value is pd.NaT or value is pd.NA:
        return None
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        if math.isnan(value):
            return None
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return value
    return str(value)


def _label(label: Any) -> Any:
    return [_scalar(part) for part in label] if isinstance(label, tuple) else _scalar(label)


def _shown(frame: pd.DataFrame) -> pd.DataFrame:
    """The part of a frame the display can show: all of it, or the head and tail of a truncated one."""
    max_rows = pd.get_option("display.max_rows")
    max_cols = pd.get_option("display.max_columns")
    if max_rows and len(frame) > max_rows:
        half = -(-(pd.get_option("display.min_rows") or max_rows) // 2)
        frame = pd.concat([frame.iloc[:half], frame.iloc[-half:]])
    if max_cols and len(frame.columns) > max_cols:
        half = -(-max_cols // 2)
        frame = pd.concat([frame.iloc[:, :half], frame.iloc[:, -half:]], axis=1)
    return frame


def table_content(frame: pd.DataFrame) -> dict:
    """A frame's unrounded content as JSON: index and column labels (and their names), every cell.

    What the nbval plugin compares when a table's rounded text differs from the committed
    one: text, whole numbers and labels exactly, floats within float noise. A truncated
    frame contributes the head and tail that the display shows.
    """
    shown = _shown(frame)
    return {
        "index_names": [_scalar(name) for name in shown.index.names],
        "column_names": [_scalar(name) for name in shown.columns.names],
        "index": [_label(label) for label in shown.index],
        "columns": [_label(label) for label in shown.columns],
        "data": [[_scalar(v) for v in row] for row in shown.itertuples(index=False, name=None)],
    }


def html_with_content(frame: pd.DataFrame) -> tuple[str, dict]:
    """IPython's text/html formatter for DataFrames: :func:`to_html`, and :func:`table_content` as metadata."""
    return to_html(frame), {METADATA_KEY: table_content(frame)}


def install() -> None:
    """Render DataFrames with :func:`to_html` in this IPython kernel, their unrounded content in the output's metadata.

    Nothing happens outside IPython. The metadata covers the whole display (its text/plain
    too): the nbval plugin reads it for every MIME type of that output.
    """
    try:
        from IPython import get_ipython
    except ImportError:
        return
    shell = get_ipython()
    if shell is None:
        return
    shell.display_formatter.formatters["text/html"].for_type(pd.DataFrame, html_with_content)
