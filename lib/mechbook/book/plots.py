"""Seaborn figures shared by chapters: one look, readable at book width."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

PALETTE = {"argument": "#4C72B0", "answer": "#DD8452"}


def setup() -> None:
    """The book's look: figures (white grid, large enough fonts, crisp PNGs) and tables.

    Tables: in a Jupyter kernel, DataFrames show a missing value as "–" and the papers'
    numbers in grey italics (:mod:`mechbook.book.tables`).
    """
    from mechbook.book import tables

    sns.set_theme(context="notebook", style="whitegrid", font_scale=1.05)
    plt.rcParams.update({"figure.dpi": 110, "savefig.dpi": 110, "figure.autolayout": False})
    tables.install()


def lens_over_layers(lens: pd.DataFrame, *, model_name: str, title: str | None = None, n_layers: int | None = None):
    """Median and interquartile band over prompts of reciprocal rank and probability, per layer.

    ``lens`` is :func:`mechbook.core.decoding.logit_lens` output (prompt, layer, target, ...).
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8), sharex=True)
    for ax, column, label in zip(axes, ["reciprocal_rank", "prob"], ["reciprocal rank", "probability"]):
        sns.lineplot(
            data=lens, x="layer", y=column, hue="target", palette=PALETTE, estimator=np.median,
            errorbar=("pi", 50), ax=ax, marker="o", markersize=4,
        )
        ax.set_ylabel(f"{label} (median, IQR)")
        ax.set_xlabel("layer (residual stream after the block)")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(title=None, loc="upper left")
    if n_layers:
        axes[0].set_xlim(-0.5, n_layers - 0.5)
    fig.suptitle(title or f"Logit lens at the last position, {model_name}")
    fig.tight_layout()
    return fig
