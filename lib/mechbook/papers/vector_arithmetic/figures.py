"""The figures of Paper A's chapters (a1-a6), one function per figure.

Each function draws a tidy table the chapter has computed and returns the matplotlib
figure; a chapter cell calls one of them and stays collapsed. The book's look (seaborn
theme, fonts, dpi) is set once per chapter by ``mechbook.book.plots.setup``. Merullo,
Eickhoff & Pavlick 2024: the section of each figure is named in its docstring.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from mechbook.core.errors import MechbookError
from mechbook.core.stats import seeded_numpy
from mechbook.papers.vector_arithmetic import reported
from mechbook.papers.vector_arithmetic.stages import STAGE_LABELS, STAGES, stages_long

# The two tokens the logit lens follows; the same colours in every chapter.
PALETTE = {"argument": "#4C72B0", "answer": "#DD8452"}
STAGE_COLORS = {"argument_formation": "#4C72B0", "function_application": "#DD8452", "saturation": "#55A868"}
VARIANT_PALETTE = {"abstractive": "#DD8452", "extractive": "#4C72B0"}
# BLOOM-176B with its top 24 of 70 FFNs removed: the one point of the FFN removal the paper reports (§5).
PAPER_POINT = reported.BLOOM_176B_POINT[0] / reported.BLOOM_176B_POINT[1]




# --- the logit lens (chapters a1 and a3, §3) -------------------------------------------------


def lens_over_layers(lens: pd.DataFrame, *, model_name: str, title: str | None = None, n_layers: int | None = None):
    """Median and interquartile band over prompts of reciprocal rank and probability, per layer (§3).

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


def lens_by_task(
    lens: pd.DataFrame,
    *,
    model_name: str,
    n_layers: int | None = None,
    summary: pd.DataFrame | None = None,
    task_labels: Mapping[str, str] | None = None,
    title: str | None = None,
):
    """Reciprocal rank (top row) and probability (bottom row) of argument and answer per layer, one column per task.

    Lines are medians over prompts, bands the interquartile range, as in
    :func:`lens_over_layers`. ``lens`` needs a ``task`` column. With a ``summary``
    from :func:`mechbook.papers.vector_arithmetic.stages.summarize_stages`
    (``by=["task"]``) the median stage layers are drawn as vertical lines (§3).
    """
    if "task" not in lens.columns:
        raise MechbookError("lens_by_task needs a 'task' column; add it with lens.assign(task=...) per task")
    tasks = list(dict.fromkeys(lens["task"]))
    labels = dict(task_labels or {})
    fig, axes = plt.subplots(2, len(tasks), figsize=(11, 6.4), sharex=True, sharey=True, squeeze=False)
    for j, task in enumerate(tasks):
        data = lens[lens["task"] == task]
        for i, (column, label) in enumerate([("reciprocal_rank", "reciprocal rank"), ("prob", "probability")]):
            ax = axes[i, j]
            sns.lineplot(
                data=data, x="layer", y=column, hue="target", hue_order=["argument", "answer"], palette=PALETTE,
                estimator=np.median, errorbar=("pi", 50), ax=ax, marker="o", markersize=3, legend=i == 0 and j == 0,
            )
            if summary is not None:
                for stage in STAGES:
                    row = summary[(summary["task"] == task) & (summary["stage"] == stage)]
                    if len(row) and pd.notna(row["median_layer"].iloc[0]):
                        ax.axvline(row["median_layer"].iloc[0], color=STAGE_COLORS[stage], ls=":", lw=1.6,
                                   label=STAGE_LABELS[stage] if i == 0 and j == 0 else None)
            ax.set_ylim(-0.02, 1.02)
            ax.set_ylabel(f"{label}\n(median, IQR)" if j == 0 else "")
            ax.set_xlabel("layer" if i == 1 else "")
            if i == 0:
                n = data["prompt"].nunique()
                ax.set_title(f"{labels.get(task, task)} ({n} prompts)")
    if n_layers:
        axes[0, 0].set_xlim(-0.5, n_layers - 0.5)
    axes[0, 0].legend(title=None, loc="upper left", fontsize="small")
    fig.suptitle(title or f"Logit lens at the last position, per task ({model_name})")
    fig.tight_layout()
    return fig


def stage_distribution(
    per_prompt: pd.DataFrame,
    *,
    model_name: str,
    n_layers: int | None = None,
    task_labels: Mapping[str, str] | None = None,
    title: str | None = None,
):
    """Each stage's layer over prompts, one row per task (needs a ``task`` column; §3).

    Dots are prompts (jittered, with a fixed seed), the bars the median and interquartile
    range: stage layers are integers that often coincide, which box plots draw as nothing.
    """
    if "task" not in per_prompt.columns:
        raise MechbookError("stage_distribution needs a 'task' column in the per-prompt stage table")
    long = stages_long(per_prompt).dropna(subset=["layer"])
    labels = dict(task_labels or {})
    order = [labels.get(t, t) for t in dict.fromkeys(per_prompt["task"])]
    long["task"] = long["task"].map(lambda t: labels.get(t, t))
    long["stage"] = long["stage"].astype(str).map(STAGE_LABELS)
    palette = {STAGE_LABELS[s]: STAGE_COLORS[s] for s in STAGES}
    hue_order = [STAGE_LABELS[s] for s in STAGES]
    fig, ax = plt.subplots(figsize=(10.5, 1.2 + 1.3 * len(order)))
    with seeded_numpy():
        sns.stripplot(data=long, x="layer", y="task", hue="stage", order=order, hue_order=hue_order,
                      palette=palette, dodge=True, jitter=0.25, size=3, alpha=0.35, ax=ax, legend=False)
    sns.pointplot(data=long, x="layer", y="task", hue="stage", order=order, hue_order=hue_order, palette=palette,
                  dodge=0.53, estimator=np.median, errorbar=("pi", 50), linestyle="none", marker="D",
                  markersize=7, capsize=0.1, ax=ax, native_scale=True)
    if n_layers:
        ax.set_xlim(-0.5, n_layers - 0.5)
        ax.set_xticks(range(n_layers))
    ax.set_xlabel("layer (0-based block index); dots: prompts, diamonds and bars: median and IQR")
    ax.set_ylabel("")
    ax.legend(title=None, loc="lower left", fontsize="small")
    ax.set_title(title or f"Stage layers over prompts the model answers correctly ({model_name})")
    fig.tight_layout()
    return fig


# --- in-context accuracy (chapter a2, §2.2 and §3) --------------------------------------------


def accuracy_bars(
    table: pd.DataFrame,
    *,
    model_name: str,
    task_labels: Mapping[str, str] | None = None,
    title: str | None = None,
):
    """Bar chart of in-context accuracy per task (one bar per group, "all" first) with 95% intervals and n.

    ``table`` is :func:`mechbook.papers.vector_arithmetic.stages.accuracy_by_group`
    output of one or more tasks; tasks keep their order.
    """
    labels = dict(task_labels or {})
    tasks = list(dict.fromkeys(table["task"]))
    groups = ["all", *sorted(g for g in table["group"].unique() if g != "all")]
    colors = dict(zip(groups, sns.color_palette("colorblind", len(groups))))
    fig, ax = plt.subplots(figsize=(10.5, 4.2))
    drawn: set[str] = set()
    for x, task in enumerate(tasks):
        rows = table[table["task"] == task].set_index("group")
        rows = rows.loc[[g for g in groups if g in rows.index]]
        width = 0.8 / max(len(rows), 2)
        for k, (group, row) in enumerate(rows.iterrows()):
            pos = x + (k - (len(rows) - 1) / 2) * width
            ax.bar(pos, row["accuracy"], width=width * 0.92, color=colors[group],
                   label=group if group not in drawn else None)
            drawn.add(group)
            ax.plot([pos, pos], [row["ci_low"], row["ci_high"]], color="black", lw=1.2)
            ax.annotate(f"{row['accuracy']:.2f}\nn={int(row['n'])}", (pos, row["ci_high"]), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize="x-small")
    ax.set_xticks(range(len(tasks)), [labels.get(t, t) for t in tasks])
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.grid(axis="x", visible=False)
    ax.set_ylabel("accuracy (top-1 = answer)")
    ax.legend(title="group", loc="upper right", fontsize="small", ncols=len(groups))
    ax.set_title(title or f"In-context accuracy per task, 95% Wilson intervals ({model_name})")
    fig.tight_layout()
    return fig


# --- the FFN update o (chapter a4, §3 and §4) ---------------------------------------------------


def function_layers(
    effects: pd.DataFrame, per_prompt: pd.DataFrame, function_layer: pd.DataFrame, *, model_name: str, n_layers: int
):
    """What each MLP does to the answer (mean rise of its reciprocal rank) and each prompt's function layer (§3).

    ``effects`` stacks :func:`mechbook.papers.vector_arithmetic.ffn_update.mlp_effects` of
    several tasks (with a ``task`` column), ``per_prompt`` their ``function_application_layers``
    and ``function_layer`` is ``function_layer_summary``; dashed lines mark each task's layer.
    """
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    sns.lineplot(data=effects, x="layer", y="rr_jump", hue="task", marker="o", markersize=4, errorbar=None,
                 ax=axes[0])
    axes[0].set(xlabel="layer", ylabel="rise of the answer's reciprocal rank", title="What each MLP does to the answer")
    sns.histplot(data=per_prompt, x="layer", hue="task", multiple="dodge", discrete=True, shrink=0.8, ax=axes[1])
    axes[1].set(xlabel="function-application layer", ylabel="prompts", title="Per prompt, the largest rise")
    for ax in axes:
        ax.set_xlim(-0.5, n_layers - 0.5)
        for color, layer in zip(sns.color_palette(), function_layer.median_layer):
            ax.axvline(layer, color=color, linestyle="--", linewidth=1)
    fig.suptitle(f"The function-application layer ({model_name}, {n_layers} layers)")
    fig.tight_layout()
    return fig


def o_cosine_by_layer(cosine: pd.DataFrame, function_layer: pd.DataFrame, *, model_name: str, n_layers: int):
    """Mean cosine between the MLP outputs of two prompts, per layer: within each task and across tasks (§4).

    ``cosine`` is :func:`mechbook.papers.vector_arithmetic.ffn_update.o_cosine_table`;
    dotted lines mark each task's function-application layer.
    """
    fig, ax = plt.subplots(figsize=(11, 4))
    sns.lineplot(data=cosine[cosine.comparison == "within task"], x="layer", y="mean_cosine", hue="task",
                 marker="o", markersize=4, ax=ax)
    sns.lineplot(data=cosine[cosine.comparison == "across tasks"], x="layer", y="mean_cosine", color="grey",
                 linestyle="--", errorbar=None, label="across tasks (mean)", ax=ax)
    for color, layer in zip(sns.color_palette(), function_layer.median_layer):
        ax.axvline(layer, color=color, linestyle=":", linewidth=1.2)
    ax.set(
        xlabel="layer",
        ylabel="mean cosine between two prompts",
        xlim=(-0.5, n_layers - 0.5),
        title=f"How alike the MLP outputs of different prompts are ({model_name}); dotted: function layers",
    )
    ax.legend(title=None, loc="lower left")
    fig.tight_layout()
    return fig


# --- transplanting o (chapter a5, §4.1) -----------------------------------------------------------


def transplant_ranks(transplant_prompts: pd.DataFrame, *, model_name: str):
    """Every prompt's target rank before and after each transplant, log scales, one panel per method (§4.1).

    ``transplant_prompts`` is :func:`mechbook.papers.vector_arithmetic.transplant.run_transplants`
    output with ``task`` and ``domain`` columns; below the diagonal the target moved up.
    """
    grid = sns.relplot(data=transplant_prompts, x="rank_before", y="rank_after", hue="task", style="domain",
                       col="method", kind="scatter", height=3.6, aspect=0.85, alpha=0.7, s=25)
    top = max(transplant_prompts.rank_before.max(), transplant_prompts.rank_after.max()) * 1.5
    for ax in grid.axes.flat:
        ax.set(xscale="log", yscale="log", xlim=(0.7, top), ylim=(0.7, top))
        ax.plot([0.7, top], [0.7, top], color="grey", linewidth=1, linestyle="--")
    grid.set_axis_labels("target rank before", "target rank after")
    grid.set_titles("{col_name}")
    grid.figure.suptitle(f"Transplanting o into no-context prompts ({model_name})", y=1.03)
    return grid.figure


# --- removing the top FFNs (chapter a6, §5) -------------------------------------------------------


def ffn_removal_curves(items: pd.DataFrame, *, model_name: str, title: str | None = None):
    """Accuracy against the fraction of MLPs removed from the top, one panel per task (§5).

    ``items`` is the per-prompt table of
    :func:`mechbook.papers.vector_arithmetic.ffn_removal.ffn_removal_sweep` (``per_item=True``);
    bands are seeded bootstrap 95% intervals over prompts. The dotted line marks the
    paper's BLOOM-176B point.
    """
    tasks = list(dict.fromkeys(items.task))
    fig, axes = plt.subplots(1, len(tasks), figsize=(11, 3.9), sharey=True, squeeze=False)
    steps = items[["fraction_removed", "layers_removed", "n_layers"]].drop_duplicates().sort_values("fraction_removed")
    for ax, task in zip(axes[0], tasks):
        data = items[items.task == task].assign(correct=lambda d: d.correct.astype(float))
        sns.lineplot(data=data, x="fraction_removed", y="correct", hue="variant", palette=VARIANT_PALETTE,
                     hue_order=list(VARIANT_PALETTE), errorbar=("ci", 95), seed=0, marker="o", ax=ax)
        ax.axvline(PAPER_POINT, color="0.4", linestyle=":", label="paper's point (24 of 70 layers)")
        ax.set_xticks(steps.fraction_removed,
                      [f"{f:.2f}\n({k})" for f, k in zip(steps.fraction_removed, steps.layers_removed)])
        ax.set_ylim(-0.03, 1.03)
        ax.set_title(f"{task} (n={data.item.nunique()})")
        ax.set_xlabel("fraction of MLPs removed\n(layers removed from the top)")
        ax.set_ylabel("accuracy (top-1 = answer)")
        ax.get_legend().remove()
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, frameon=False, bbox_to_anchor=(0.5, -0.02))
    fig.suptitle(title or f"Removing the top MLPs: abstractive vs extractive prompts ({model_name})")
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
