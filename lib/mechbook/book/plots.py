"""The book's look for figures and tables, set once per chapter by :func:`setup`.

The figures themselves are drawn by each paper's ``figures`` module
(``mechbook.papers.<paper>.figures``), inside this look.
"""

from __future__ import annotations

import matplotlib.pyplot as plt
import seaborn as sns


def setup() -> None:
    """The book's look: figures (white grid, large enough fonts, crisp PNGs) and tables.

    Tables: in a Jupyter kernel, DataFrames show a missing value as "–" and the papers'
    numbers in grey italics (:mod:`mechbook.book.tables`).
    """
    from mechbook.book import tables

    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.05)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.autolayout": False})
    tables.install()
